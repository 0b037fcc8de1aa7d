"""Streaming inference: the StreamVLN agent (windowed KV cache, slow memory) and batched rollouts."""
