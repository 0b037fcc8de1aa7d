"""The numbers of an update: the SFT weight schedule, group-relative advantages, the clipped policy loss."""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import RLConfig


def sft_weight(update: int, cfg: RLConfig) -> float:
    """The SFT coefficient at update u (0-based): p = min(1, u / max(1, decay_updates)) from start to end.

    linear: s + (e - s) p; cosine: e + (s - e)(1 + cos(pi p)) / 2; exponential: s (e / s) ** p (start
    and end > 0, checked by the config). 0 when hybrid training is off. Past decay_updates: e.
    """
    if not cfg.use_hybrid_training:
        return 0.0
    s, e = cfg.sft_loss_start_weight, cfg.sft_loss_end_weight
    p = min(1.0, max(0, update) / max(1, cfg.sft_loss_decay_updates))
    if cfg.sft_loss_decay_type == "linear":
        return s + (e - s) * p
    if cfg.sft_loss_decay_type == "cosine":
        return e + 0.5 * (s - e) * (1.0 + math.cos(math.pi * p))
    return s * math.exp(math.log(e / s) * p)


def group_advantages(returns: list[float], std_floor: float) -> list[float]:
    """(R_i - mean R) / max(std R, std_floor), population std over the group.

    The floor (in return units) is what keeps G = 2 from turning any return gap, however small,
    into +-1 (the guide's normalisation): a 0.05 gap with floor 0.5 gives +-0.05; gaps larger than
    the floor are normalised as usual. A group whose returns are all equal gets 0 everywhere.
    """
    r = np.asarray(returns, dtype=np.float64)
    centred = r - r.mean()
    return (centred / max(float(r.std()), std_floor)).tolist()


def clipped_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with the true ratio against the behaviour log-probabilities (B2); (loss, ratio)."""
    ratio = torch.exp(new_logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return -surrogate.mean(), ratio.detach()
