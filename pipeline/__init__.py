"""Offline pipeline: StreamVLN source data -> pre-tokenised WebDataset shards per task."""
