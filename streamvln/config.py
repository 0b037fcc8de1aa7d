"""Training config: typed dataclasses loaded strictly from YAML (configs/train/*.yaml)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, load_config

SCHEDULERS = ("cosine", "cosine_with_min_lr")
LOSS_NORMALIZATIONS = ("global_tokens", "micro_batch")
ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # a regex over module names: the language model's attention and MLP projections, not SigLIP's
    target_modules: str = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class TrainConfig:
    model_config: str | None = None  # YAML of StreamVLNConfig keys: a model built from scratch (e.g. tiny)
    checkpoint: str | None = None  # or a local checkpoint directory (LLaVA-Video / StreamVLN / our export)
    tokenizer: str | None = None  # copied into the final export
    max_steps: int | None = None  # optimizer steps; None: `epochs` of the mix
    epochs: float = 1.0
    lr: float = 2e-5
    vision_lr: float | None = 5e-6  # None: lr
    projector_lr: float | None = None  # None: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.075
    scheduler: str = "cosine_with_min_lr"
    min_lr: float = 1.85e-5  # cosine_with_min_lr only
    grad_accum: int = 2
    # global_tokens: the mean over all labelled tokens of an optimizer step's global batch, the same however
    # it is split over ranks and micro-batches (resumable on another world size); micro_batch: each
    # micro-batch's mean, averaged over micro-batches and ranks (the reference's HF Trainer)
    loss_normalization: str = "global_tokens"
    max_grad_norm: float = 1.0
    bf16: bool = True  # DeepSpeed bf16 (fp32 master weights), on GPUs and on the CPU accelerator alike
    gradient_checkpointing: bool = True
    # the language model's attention: sdpa (the default; packed batches get a block-diagonal mask), or
    # flash_attention_2 (its varlen kernels for packed batches; needs the flash-attn package, GPUs only), or eager
    attn_implementation: str = "sdpa"
    # the reference's loss: the LM head over every position (~6 GB of logits a 7B sample), not only the
    # labelled ones; the same loss, for measuring what the labelled-only head saves (tests/bench/bench_gpu.py)
    full_logits: bool = False
    mm_tunable_parts: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    # Options for small models trained on CPU (docs/training.md), off by default as in the reference:
    # output_vocab "labels": the LM head predicts only the token ids the training mix has as labels (scanned
    # at start, kept in the exported config, masked the same way at inference); "full": the whole vocabulary.
    output_vocab: str = "full"
    # freeze the input embedding (and so the tied LM head): no gradient or Adam state over ~152K x hidden
    freeze_embeddings: bool = False
    lora: LoraSettings | None = None
    zero_stage: int = 2  # used when no --deepspeed config file is given
    num_workers: int = 2
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end (when eval_shards is set)
    eval_shards: str | None = None  # a data-mix YAML of held-out shards
    eval_batches: int | None = None  # None: the whole eval epoch
    tensorboard: bool = False
    log_samples: bool = False  # samples.rank<r>.jsonl: the keys of every micro-batch each rank trained on

    def validate(self):
        if (self.model_config is None) == (self.checkpoint is None):
            raise ConfigError("give exactly one of model_config (build from scratch) or checkpoint (load)")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ConfigError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}")
        parts = [p for p in self.mm_tunable_parts.split(",") if p]
        unknown = set(parts) - {"mm_vision_tower", "mm_mlp_adapter", "mm_language_model"}
        if unknown or not parts:
            raise ConfigError(f"mm_tunable_parts: unknown or empty {sorted(unknown)}")
        if self.output_vocab not in ("full", "labels"):
            raise ConfigError(f"output_vocab must be 'full' or 'labels', got {self.output_vocab!r}")
        if self.attn_implementation not in ATTENTION:
            raise ConfigError(f"attn_implementation must be one of {ATTENTION}, got {self.attn_implementation!r}")
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package (GPU machines); "
                              "it is not installed: use sdpa")
        if self.grad_accum < 1 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("grad_accum must be >= 1 and warmup_ratio in [0, 1)")


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
