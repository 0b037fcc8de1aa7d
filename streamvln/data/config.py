"""Data-mix config: which task folders are mixed, with which weights, batch size, seed and options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, load_config

MIX_MODES = ("batch", "sample")


@dataclass
class TaskMix:
    """One entry of the mix. Several folders of the same task are read as one (e.g. R2R+RxR and ScaleVLN)."""

    name: str
    shards: list[str]
    split: str = "train"
    sources: list[str] | None = None  # only these sources of the folders' index (None: all)
    weight: float | None = None  # None: proportional to its samples, as the reference's group_by_task
    augment: bool | None = None  # None: the mix's `augment`

    def validate(self):
        if not self.shards:
            raise ConfigError(f"task {self.name!r}: shards must list at least one task folder")
        if self.weight is not None and self.weight <= 0:
            raise ConfigError(f"task {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass
class MixConfig:
    tasks: list[TaskMix] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 2  # per device; a global batch is world_size x batch_size samples
    mix: str = "batch"  # batch: each global batch from one task (group_by_task); sample: tasks within a batch
    augment: bool = False  # the reference's train-time colour/posterize/sharpness/autocontrast
    image_size: int = 384  # every task folder must have been written at this size
    max_tokens: int = 32768  # longer samples are left out (and counted); the reference cuts them
    uint8_images: bool = False  # leave normalisation to the model, on the device
    finite: bool = False  # stop iterating at the end of each epoch (default: an endless stream)
    shuffle_window: int = 4  # shards whose samples are shuffled together (bounds reads to a few files)
    skip_corrupt: bool = False  # replace an unreadable sample by the next one (counted, logged)
    # pack each batch's samples into language-model rows of at most this many tokens (text plus frames), in
    # order, positions restarting per sample (streamvln/model/packing.py); 0: one sample a row, as the reference.
    # The same samples, loss and gradients; less padding. Batches and their order do not change.
    pack_tokens: int = 0

    def validate(self):
        if not self.tasks:
            raise ConfigError("a mix needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be distinct: {names}")
        if self.mix not in MIX_MODES:
            raise ConfigError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        weights = [t.weight is None for t in self.tasks]
        if any(weights) and not all(weights):
            raise ConfigError("give every task a weight, or none (proportional to samples)")
        for name in ("batch_size", "image_size", "max_tokens", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pack_tokens < 0:
            raise ConfigError(f"pack_tokens must be >= 0 (0: no packing), got {self.pack_tokens}")

    def order_fields(self) -> dict:
        """Everything the batch order depends on (resuming under other values is refused)."""
        return {
            "seed": self.seed, "batch_size": self.batch_size, "mix": self.mix, "shuffle_window": self.shuffle_window,
            "tasks": [{"name": t.name, "shards": t.shards, "split": t.split, "sources": t.sources, "weight": t.weight}
                      for t in self.tasks],
        }


def load_mix(path: str | Path, **overrides) -> MixConfig:
    """Load a mix YAML; relative shard folders are taken relative to the current directory."""
    return load_config(MixConfig, path, overrides)
