"""Build the model for training: from a config or a local checkpoint; tunable parts, LoRA, optimiser groups."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import yaml

from .config import StreamVLNConfig
from .modeling import StreamVLNForCausalLM

NO_DECAY = ("bias", "norm", "image_newline")  # biases, RMS/LayerNorm weights, the newline embedding


def build_model(model_config: str | None, checkpoint: str | None, dtype=torch.float32) -> StreamVLNForCausalLM:
    """From scratch (a YAML of StreamVLNConfig keys) or from a local checkpoint directory (never a hub id)."""
    if checkpoint is not None:
        if not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json)")
        unknown = StreamVLNConfig.unrecognised_keys(json.loads((Path(checkpoint) / "config.json").read_text()))
        if unknown:
            warnings.warn(f"{checkpoint}/config.json: keys this model neither uses nor knowingly ignores: "
                          f"{', '.join(unknown)} (see docs/model.md)", stacklevel=2)
        return StreamVLNForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=dtype,
                                                    attn_implementation="sdpa")
    config = StreamVLNConfig(**yaml.safe_load(Path(model_config).read_text()), attn_implementation="sdpa")
    return StreamVLNForCausalLM(config).to(dtype)


def part_of(name: str) -> str:
    """Which of the reference's tunable parts a parameter belongs to."""
    if ".vision_tower." in name:
        return "mm_vision_tower"
    if ".mm_projector." in name or name.endswith("image_newline"):
        return "mm_mlp_adapter"
    return "mm_language_model"


def set_tunable_parts(model: torch.nn.Module, parts: str) -> None:
    chosen = {p for p in parts.split(",") if p}
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in chosen)


def apply_lora(model, settings):
    """LoRA adapters on the language model (peft); the language model's own weights are frozen."""
    from peft import LoraConfig, get_peft_model

    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, bias="none")
    model = get_peft_model(model, lora)
    # peft freezes everything but the adapters: give the vision tower and projector back their choice
    for name, param in model.named_parameters():
        base = name.replace("base_model.model.", "", 1)
        if "lora_" not in name and part_of(base) != "mm_language_model":
            param.requires_grad_(base not in frozen_before)
    return model


def optimizer_groups(model: torch.nn.Module, lr: float, vision_lr: float | None, projector_lr: float | None,
                     weight_decay: float) -> list[dict]:
    """Per part its learning rate; no weight decay on biases and norms. Frozen parameters are left out."""
    rates = {"mm_vision_tower": vision_lr or lr, "mm_mlp_adapter": projector_lr or lr, "mm_language_model": lr}
    groups: dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name.replace("base_model.model.", "", 1))
        decay = 0.0 if any(k in name.lower() for k in NO_DECAY) else weight_decay
        groups.setdefault((part, decay), []).append(param)
    return [{"params": params, "lr": rates[part], "weight_decay": decay, "name": f"{part}/decay={decay}"}
            for (part, decay), params in sorted(groups.items())]
