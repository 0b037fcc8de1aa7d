"""Build the model for training: from a config or a local checkpoint; tunable parts, LoRA, optimiser groups."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import yaml

from .modeling import StreamVLNForCausalLM
from .vla import StreamVLNVLA, VLAConfig

NO_DECAY = ("bias", "norm", "image_newline")  # biases, RMS/LayerNorm weights, the newline embedding


def model_class(model_type: str | None):
    """llava_qwen (StreamVLN, LLaVA-Video) or streamvln_vla (the manipulation VLA model)."""
    return StreamVLNVLA if model_type == VLAConfig.model_type else StreamVLNForCausalLM


def build_model(model_config: str | None, checkpoint: str | None, dtype=torch.float32, vla: dict | None = None,
                attn_implementation: str = "sdpa"):
    """From scratch (a YAML of config keys; `model_type: streamvln_vla` for the VLA model) or from a local
    checkpoint directory (never a hub id). `vla`: VLA keys to load a StreamVLN / LLaVA-Video checkpoint's
    backbone into a VLA model (its action token and head start fresh). `attn_implementation`: the language
    model's attention (sdpa; flash_attention_2 where the flash-attn package is installed; eager)."""
    if checkpoint is not None:
        if not (Path(checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json)")
        raw = json.loads((Path(checkpoint) / "config.json").read_text())
        cls = StreamVLNVLA if vla is not None else model_class(raw.get("model_type"))
        unknown = cls.config_class.unrecognised_keys(raw)
        if unknown:
            warnings.warn(f"{checkpoint}/config.json: keys this model neither uses nor knowingly ignores: "
                          f"{', '.join(unknown)} (see docs/model.md)", stacklevel=2)
        extra = {}
        if vla is not None:
            raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
            extra["config"] = VLAConfig(**{**raw, **vla}, attn_implementation=attn_implementation)
        return cls.from_pretrained(checkpoint, local_files_only=True, dtype=dtype,
                                   attn_implementation=attn_implementation, **extra)
    keys = yaml.safe_load(Path(model_config).read_text())
    model_type = keys.pop("model_type", None)
    cls = model_class(model_type)
    unknown = cls.config_class.unrecognised_keys(keys)
    if unknown:  # a misspelt key would otherwise become an unused attribute and the model a default one
        raise ValueError(f"{model_config}: unknown model config key(s) {', '.join(unknown)} (see docs/model.md)")
    config = cls.config_class(**keys, attn_implementation=attn_implementation)
    return cls(config).to(dtype)


def part_of(name: str) -> str:
    """Which of the reference's tunable parts a parameter belongs to."""
    if name.startswith(("action_head.", "action_token")):
        return "action_head"
    if ".vision_tower." in name:
        return "mm_vision_tower"
    if ".mm_projector." in name or name.endswith("image_newline"):
        return "mm_mlp_adapter"
    return "mm_language_model"


def set_tunable_parts(model: torch.nn.Module, parts: str) -> None:
    chosen = {p for p in parts.split(",") if p}
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in chosen | {"action_head"})  # the head always trains (RoboVLMs)


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
    rates = {"mm_vision_tower": vision_lr or lr, "mm_mlp_adapter": projector_lr or lr, "mm_language_model": lr,
             "action_head": lr}
    groups: dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name.replace("base_model.model.", "", 1))
        decay = 0.0 if any(k in name.lower() for k in NO_DECAY) else weight_decay
        groups.setdefault((part, decay), []).append(param)
    return [{"params": params, "lr": rates[part], "weight_decay": decay, "name": f"{part}/decay={decay}"}
            for (part, decay), params in sorted(groups.items())]
