"""Checkpoints: DeepSpeed engine checkpoints read without unpickling code, retention, and the HF export."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

TAG_PREFIX = "step-"


def _deepspeed_safe_globals() -> list:
    """The plain data classes DeepSpeed puts in its checkpoints, allowed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's engine loads with weights_only=False; this one never runs pickled code."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def save(engine, checkpoint_dir: Path, step: int, trainer_state: dict, keep: int) -> None:
    """Engine (model, optimizer, scheduler) under step-NNNNNNNN, plus trainer_state.json (step, loader,
    config: plain JSON, readable before anything is loaded); keeps the newest `keep` checkpoints."""
    tag = tag_of(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag)
    if engine.global_rank == 0:
        tmp = checkpoint_dir / tag / "trainer_state.json.tmp"
        tmp.write_text(json.dumps(trainer_state, indent=1) + "\n")
        tmp.replace(checkpoint_dir / tag / "trainer_state.json")  # written last: marks the checkpoint complete
        if keep > 0:
            for old in sorted(p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())[:-keep]:
                shutil.rmtree(old)


def latest(checkpoint_dir: Path) -> tuple[str, dict] | None:
    """(tag, trainer state) of the newest complete checkpoint, or None."""
    tags = sorted(p.name for p in checkpoint_dir.glob(f"{TAG_PREFIX}*") if (p / "trainer_state.json").exists())
    if not tags:
        return None
    return tags[-1], json.loads((checkpoint_dir / tags[-1] / "trainer_state.json").read_text())


def load_engine(engine, checkpoint_dir: Path, tag: str) -> None:
    """Model, optimizer and scheduler state into the engine, read with weights_only=True."""
    engine.checkpoint_engine = SafeCheckpointEngine()
    path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint_dir / tag}")


def export(model, out_dir: Path, *, tokenizer: str | None, train_config, mix_config, state_dict=None) -> None:
    """The HF layout (safetensors + config.json [+ tokenizer]) that from_pretrained and streamvln-eval load."""
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer:
        from pipeline.qwen_tokenizer import load_tokenizer

        load_tokenizer(tokenizer).save_pretrained(out_dir)
    (out_dir / "train_config.json").write_text(json.dumps(
        {"train": asdict(train_config), "mix": asdict(mix_config)}, indent=1) + "\n")
