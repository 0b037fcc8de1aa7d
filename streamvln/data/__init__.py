"""Streaming data: the mix config and the resumable, rank-balanced shard loader."""

from .config import MixConfig, TaskMix, load_mix
from .loader import ShardLoader, build_loader

__all__ = ["MixConfig", "TaskMix", "load_mix", "ShardLoader", "build_loader"]
