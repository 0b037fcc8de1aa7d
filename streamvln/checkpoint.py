"""Checkpoints: DeepSpeed engine checkpoints read without unpickling code, retention, and the HF export."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, BASE_OPTIMIZER_STATE_STEP, OPTIMIZER_STATE_DICT
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


def saved_world_size(checkpoint_dir: Path, tag: str) -> int | None:
    """How many data-parallel ranks wrote a ZeRO checkpoint (one optimizer partition each); None: not ZeRO."""
    return len(list((checkpoint_dir / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def load_engine(engine, checkpoint_dir: Path, tag: str) -> None:
    """Model, optimizer and scheduler state into the engine, read with weights_only=True, on any world size.

    DeepSpeed refuses ZeRO optimizer partitions written by another number of ranks (its way round,
    ds_to_universal, unpickles everything). ZeRO-1/2 checkpoints are saved elastic (per parameter
    group, see train.deepspeed_config), so here the saved partitions are merged and cut for this
    world size, Adam moments and fp32 master weights included, with DeepSpeed's own elastic routines.
    """
    engine.checkpoint_engine = SafeCheckpointEngine()
    saved, here, stage = saved_world_size(checkpoint_dir, tag), engine.dp_world_size, engine.zero_optimization_stage()
    states = _read_partitions(engine, checkpoint_dir / tag, saved) if stage in (1, 2) and saved else None
    rigid = states is not None and any(isinstance(s[BASE_OPTIMIZER_STATE], dict) for s in states)
    if saved is not None and saved != here and (states is None or rigid):
        why = ("its optimizer partitions are rigid (saved without elastic_checkpoint)" if rigid
               else f"only ZeRO-1/2 optimizer state moves across world sizes (this is stage {stage})")
        raise RuntimeError(f"{checkpoint_dir / tag} was saved by {saved} ranks and this run has {here}: {why}; "
                           f"resume on {saved} ranks")
    elastic = states is not None and not rigid
    # elastic: module, scheduler and step counters from DeepSpeed; the optimizer state below
    path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=not elastic)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint_dir / tag}")
    if elastic:
        for state in states:  # torch's AdamW keeps its step per parameter, where DeepSpeed does not look for it
            state.setdefault(BASE_OPTIMIZER_STATE_STEP, state[BASE_OPTIMIZER_STATE][0].get("step", 0))
        optimizer = engine.optimizer
        optimizer._load_global_state(states[0])  # loss scaler and clipping: the same on every rank
        optimizer._restore_elastic_base_optimizer_state(states)  # Adam moments and step, merged and re-cut
        optimizer._restore_from_elastic_fp32_weights(states)  # fp32 master weights, merged and re-cut
        optimizer._link_all_hp_params()
        if engine.lr_scheduler is not None:  # the groups' lr came with the rigid state; the scheduler knows it
            for group, lr in zip(optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr


def _read_partitions(engine, folder: Path, saved: int) -> list[dict]:
    """Every rank's saved ZeRO optimizer partition (each rank needs all of them to cut its own)."""
    prefix = "bf16_" if engine.bfloat16_enabled() else ""
    states = []
    for rank in range(saved):
        path = folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if not path.exists():
            raise RuntimeError(f"{path} is missing: written with another precision, or an incomplete checkpoint")
        states.append(engine.checkpoint_engine.load(str(path), map_location="cpu")[OPTIMIZER_STATE_DICT])
    return states


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
