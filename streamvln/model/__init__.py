"""The StreamVLN model (LLaVA-Video layout on transformers' Qwen2 and SigLIP classes) and its builders."""

from .config import StreamVLNConfig
from .modeling import StreamVLNForCausalLM

__all__ = ["StreamVLNConfig", "StreamVLNForCausalLM"]
