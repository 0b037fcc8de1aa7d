"""One GRPO + SFT update over a set of groups: advantages, PPO epochs over minibatches, the hybrid SFT term.

Per update u: each group's returns give advantages (objective.group_advantages), shared by every
policy decision of a rollout. The policy decisions are shuffled (seeded by u) into minibatches; before
any optimizer step, the old log-probabilities are recomputed for epoch 0's minibatches exactly as the
update will compute the new ones, so the first minibatch's ratio is exactly 1 and every later ratio
is the true one (B2); their distance to the rollout's own log-probabilities is logged (`logp_drift`).
Each minibatch: L = L_clip - entropy_coef H + (1/n) sum_i w_i CE_i over its share of the SFT samples
(expert-driven chunks at oracle_weight x w(u), policy decisions on the expert's labels at w(u)),
then clipped gradients and one optimizer step. The model is in train mode here and in eval mode for
rollouts (B17).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from .config import RLConfig
from .logprob import chains, sequence_logprobs
from .objective import clipped_policy_loss, group_advantages, sft_weight


def collect_items(trajectories: list[dict], cfg: RLConfig, update: int):
    """(policy items: (decision, advantage)), (SFT items: (decision, weight)), advantages per trajectory."""
    groups = defaultdict(list)
    for t in trajectories:
        groups[t["member"].key].append(t)
    w = sft_weight(update, cfg)
    pg, sft = [], []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda t: t["member"].member)
        for t, a in zip(group, group_advantages([t["return"] for t in group], cfg.advantage_std_floor)):
            t["advantage"] = a
            for d in t["decisions"]:
                if d.kind == "policy" and d.steps:
                    pg.append((d, a))
                if w > 0 and d.sft:
                    if d.kind == "oracle":
                        sft.append((d, cfg.oracle_weight * w))
                    elif cfg.sft_use_policy_steps and not cfg.sft_oracle_only:
                        sft.append((d, w))
    return pg, sft, w


def _minibatches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[k : k + size] for k in range(0, n, size)]


def _window_minibatches(pg: list, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Whole windows (chains of a window's decisions) in a seeded order, gathered until each minibatch holds
    at least `size` decisions."""
    groups = chains([(d.frames, d.context, d.tokens) for d, _ in pg])
    batches, current = [], []
    for g in rng.permutation(len(groups)):
        current += groups[g]
        if len(current) >= size:
            batches.append(np.array(current))
            current = []
    if current:
        batches.append(np.array(current))
    return batches


def _steps_everywhere(n: int, world: int) -> int:
    """The most optimizer steps any rank has: every rank takes that many (the gradient all-reduce is a
    collective); a rank out of minibatches contributes zero gradients."""
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


class TorchStep:
    """zero grads, backward, average over ranks (all-reduce), clip, AdamW step; returns the grad norm."""

    def __init__(self, optimizer, params: list, max_grad_norm: float, world: int = 1):
        self.optimizer, self.params, self.max_grad_norm, self.world = optimizer, params, max_grad_norm, world

    def __call__(self, loss) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None and loss.requires_grad:
            loss.backward()
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1).float().cpu() for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in self.params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
                offset += p.numel()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        return norm


class EngineStep:
    """The same through a DeepSpeed engine (its ZeRO optimizer averages over ranks and clips)."""

    def __init__(self, engine, params: list):
        self.engine, self.params = engine, params

    def __call__(self, loss) -> float:
        if loss is None or not loss.requires_grad:  # a zero-gradient step: the engine's collectives still run
            loss = sum((p * 0).sum() for p in self.params)
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0


def update_policy(agent, step, trajectories: list[dict], cfg: RLConfig, update: int, rank: int = 0,
                  world: int = 1) -> dict:
    """This rank's groups; `step(loss)` is one optimizer step (TorchStep or EngineStep), which averages
    the gradients over the ranks."""
    start = time.perf_counter()
    model = agent.model
    pg, sft, w = collect_items(trajectories, cfg, update)
    rng = np.random.default_rng([cfg.seed, update, rank])
    if cfg.window_minibatches:
        plans = [_window_minibatches(pg, cfg.mini_batch_size, rng) for _ in range(cfg.ppo_epochs)]
    else:
        plans = [_minibatches(len(pg), cfg.mini_batch_size, rng) for _ in range(cfg.ppo_epochs)]
    sft_orders = [rng.permutation(len(sft)) for _ in range(cfg.ppo_epochs)]
    model.train()
    old = torch.zeros(len(pg))
    with torch.no_grad():  # before any step, as the update will compute them (see the module doc)
        for batch in plans[0] if pg else []:
            lp, _, _ = sequence_logprobs(agent, [(pg[k][0].frames, pg[k][0].context, pg[k][0].tokens) for k in batch],
                                         cfg.temperature)
            old[batch] = lp.cpu()
    drift = max((abs(float(old[k]) - pg[k][0].logp) for k in range(len(pg))), default=0.0)
    stats = defaultdict(list)
    for epoch in range(cfg.ppo_epochs):
        batches = plans[epoch] if pg else [np.array([], dtype=int)] * (-(-len(sft) // cfg.mini_batch_size))
        batches = list(batches) + [None] * (_steps_everywhere(len(batches), world) - len(batches))
        for j, batch in enumerate(batches):
            if batch is None:  # out of minibatches here, not on another rank: a zero-gradient step
                stats["grad_norm"].append(step(None))
                continue
            loss = torch.zeros((), device=agent.device)
            if len(batch):
                items = [pg[k] for k in batch]
                new, entropy, _ = sequence_logprobs(agent, [(d.frames, d.context, d.tokens) for d, _ in items],
                                                    cfg.temperature)
                adv = torch.tensor([a for _, a in items], dtype=new.dtype, device=new.device)
                policy_loss, ratio = clipped_policy_loss(new, old[batch].to(new.device), adv, cfg.clip_eps)
                loss = loss + policy_loss - cfg.entropy_coef * entropy.mean()
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["entropy"].append(float(entropy.mean().detach()))
                stats["ratio"] += ratio.cpu().tolist()
                stats["clipped"] += ((ratio - 1).abs() > cfg.clip_eps).float().cpu().tolist()
            if sft:
                size = len(batch) if len(batch) else cfg.mini_batch_size
                take = [sft[sft_orders[epoch][(j * size + k) % len(sft)]] for k in range(min(size, len(sft)))]
                _, _, nll = sequence_logprobs(agent, [(d.frames, d.context, d.sft) for d, _ in take], 1.0)
                weights = torch.tensor([wt for _, wt in take], dtype=nll.dtype, device=nll.device)
                sft_loss = (weights * nll).sum() / len(take)
                loss = loss + sft_loss
                stats["sft_loss"].append(float((nll * weights).sum().detach() / weights.sum()))
            stats["grad_norm"].append(step(loss))
    model.eval()
    ratios = np.array(stats["ratio"]) if stats["ratio"] else np.ones(1)
    return {
        "policy_loss": float(np.mean(stats["policy_loss"])) if stats["policy_loss"] else 0.0,
        "sft_loss": float(np.mean(stats["sft_loss"])) if stats["sft_loss"] else 0.0,
        "sft_weight": w, "entropy": float(np.mean(stats["entropy"])) if stats["entropy"] else 0.0,
        "ratio_mean": float(ratios.mean()), "ratio_std": float(ratios.std()), "ratio_max": float(ratios.max()),
        "clip_fraction": float(np.mean(stats["clipped"])) if stats["clipped"] else 0.0,
        "first_ratio": float(ratios[0]), "logp_drift": drift, "grad_norm": float(np.mean(stats["grad_norm"] or [0])),
        "policy_decisions": len(pg), "sft_samples": len(sft), "update_time": time.perf_counter() - start,
    }
