"""`streamvln-rl`: load, then loop {roll out the groups, update, log, save}, then export. Resumes exactly.

Everything random is a function of (seed, update): which episodes an update draws, each sampled
rollout's generator, the minibatch order. So the state is the trainable weights, the optimizer's
state and the number of updates done; the update after a resume is the uninterrupted run's (B14:
a checkpoint records the updates it holds, not one less).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from streamvln.agent.rollout import rollout
from streamvln.agent.streaming import AgentConfig, StreamingAgent

from .config import RLConfig
from .plot import plot_metrics, read_metrics
from .policy import Member, RLPolicy
from .update import EngineStep, TorchStep, update_policy

CKPT = "update-"


def pick_episodes(episodes: list, cfg: RLConfig, update: int) -> list:
    """The update's episodes: consecutive draws from a seeded order, a fresh order per pass over the list."""
    out = []
    for k in range(update * cfg.num_episodes_per_update, (update + 1) * cfg.num_episodes_per_update):
        epoch, pos = divmod(k, len(episodes))
        out.append(episodes[int(np.random.default_rng([cfg.seed, epoch]).permutation(len(episodes))[pos])])
    return out


def load_policy_model(checkpoint: str, cfg: RLConfig):
    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.build import apply_lora, build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(None, checkpoint, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
    if cfg.lora is not None:
        model.requires_grad_(False)  # only the adapters train
        model = apply_lora(model, cfg.lora)
    size = model.config.vision_tower_config().image_size
    agent = StreamingAgent(model, load_tokenizer(checkpoint), AgentConfig(image_size=size, seed=cfg.seed),
                           num_envs=cfg.num_envs)
    agent.score_temperature = cfg.temperature
    return agent


def deepspeed_engine(model, optimizer, cfg: RLConfig):
    """The update through a DeepSpeed engine configured by cfg.deepspeed (configs/deepspeed/zero2.json):
    one micro-batch per step, the config's clipping, bf16 on GPUs."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from streamvln.train import init_distributed

    if not torch.distributed.is_initialized():
        init_distributed()
    ds = json.loads(Path(cfg.deepspeed).read_text())
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=cfg.max_grad_norm,
              bf16={"enabled": torch.cuda.is_available()}, steps_per_print=10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):
        zero.setdefault("elastic_checkpoint", True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def save(out: Path, model, optimizer, updates: int, cfg: RLConfig, engine=None, rank: int = 0, world: int = 1):
    """checkpoints/update-NNNNNN: trainable weights, optimizer state (a DeepSpeed engine's own files
    under engine/), state.json last (marks it complete). A collective when there are several ranks."""
    final = out / "checkpoints" / f"{CKPT}{updates:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="engine")
    _barrier(world)
    if rank == 0:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if engine is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"updates": updates, "config": asdict(cfg)}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in (out / "checkpoints").glob(f"{CKPT}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    _barrier(world)


# what may change on resume: how long to train, how often to save, where to log
RESUMABLE_CHANGES = {"num_updates", "save_every", "keep_checkpoints", "tensorboard", "use_wandb", "wandb_project",
                     "wandb_run_name"}


def resume(out: Path, model, optimizer, cfg: RLConfig, engine=None) -> int:
    """Updates done by the newest complete checkpoint (0 if none); refuses a config that changes the run."""
    found = sorted(p for p in (out / "checkpoints").glob(f"{CKPT}*") if (p / "state.json").exists())
    if not found:
        return 0
    state = json.loads((found[-1] / "state.json").read_text())
    mine = json.loads(json.dumps(asdict(cfg)))
    changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and state["config"].get(k) != mine[k])
    if changed:
        raise ValueError(f"{found[-1]} was written with another config ({', '.join(changed)} differ)")
    weights = load_file(found[-1] / "trainable.safetensors")
    missing = model.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{found[-1]}: unexpected weights {missing.unexpected_keys[:3]}")
    if engine is not None:
        from streamvln.checkpoint import load_engine

        load_engine(engine, found[-1], "engine")  # weights_only; on another number of ranks too
    else:
        optimizer.load_state_dict(torch.load(found[-1] / "optimizer.pt", weights_only=True))
    return int(state["updates"])


class Logger:
    """metrics.jsonl, its curves as metrics.png, TensorBoard and (optionally) Weights & Biases, offline unless
    WANDB_MODE says otherwise."""

    def __init__(self, out: Path, cfg: RLConfig, start: int = 0):
        path = out / "metrics.jsonl"
        # Only the updates before `start` (the checkpoint resumed from; 0 for a fresh run) stand: rows past it were
        # logged by a run that was cut off, or by an earlier run in this folder, and will be logged again.
        old = read_metrics(path) if path.exists() else []
        self.rows = {r["update"]: r for r in old if 0 < r.get("update", 0) <= start}
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(self.rows[u]) + "\n" for u in sorted(self.rows)))
        tmp.replace(path)
        self.png = out / "metrics.png"
        self.file = open(path, "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.use_wandb:
            import os

            import wandb  # an optional extra: pip install wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, dir=str(out),
                                    config=asdict(cfg))

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows[row["update"]] = row
        plot_metrics([self.rows[u] for u in sorted(self.rows)], self.png)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "update"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["update"])
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["update"])

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def gather(obj, world: int) -> list:
    """Every rank's obj, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def summaries(trajectories: list[dict]) -> list[dict]:
    return [{k: t[k] for k in ("success", "spl", "expert_steps", "interventions", "return", "outcome")}
            | {"steps": len(t["steps"])} for t in trajectories]


def rollout_stats(runs: list[dict], seconds: float) -> dict:
    """Per-update rollout metrics over every rank's rollouts (runs: summaries())."""
    steps = sum(t["steps"] for t in runs)
    n = max(1, len(runs))
    return {
        "rollouts": len(runs), "sr": float(np.mean([t["success"] for t in runs])),
        "spl": float(np.mean([t["spl"] for t in runs])),
        "oracle_rate": sum(t["expert_steps"] for t in runs) / max(1, steps),
        "intervention_rate": sum(t["interventions"] for t in runs) / n,
        "episode_length": steps / n, "return": float(np.mean([t["return"] for t in runs])),
        "outcomes": {o: sum(t["outcome"] == o for t in runs) for o in sorted({t["outcome"] for t in runs})},
        "rollout_time": seconds, "env_steps_per_s": steps / max(seconds, 1e-9),
    }


def merge_update_stats(stats: list[dict]) -> dict:
    """Counts summed over ranks, everything else averaged (each rank's minibatch means)."""
    counts = ("policy_decisions", "sft_samples")
    out = {k: sum(s[k] for s in stats) for k in counts}
    for k in stats[0]:
        if k not in counts:
            out[k] = max(s[k] for s in stats) if k in ("ratio_max", "logp_drift", "update_time") else float(
                np.mean([s[k] for s in stats]))
    out["first_ratio"] = stats[0]["first_ratio"]
    return out


def train_rl(cfg: RLConfig, checkpoint: str, episodes: list, out: Path, sims, do_resume: bool = False,
             log=print, rank: int = 0, world: int = 1) -> dict:
    """With several ranks (torchrun), each runs whole groups of its share of every update's episodes
    on its own simulators, and the gradients are averaged over the ranks at every optimizer step."""
    # ------------------------------------------------------------ load
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "rl_config.json").write_text(json.dumps({"checkpoint": checkpoint, **asdict(cfg)}, indent=1) + "\n")
    agent = load_policy_model(checkpoint, cfg)
    params = [p for p in agent.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    engine = deepspeed_engine(agent.model, optimizer, cfg) if cfg.deepspeed else None
    step = EngineStep(engine, params) if engine else TorchStep(optimizer, params, cfg.max_grad_norm, world)
    start = resume(out, agent.model, optimizer, cfg, engine) if do_resume else 0
    if not do_resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or another --output-dir")
    policy = RLPolicy(agent, sims, cfg)
    logger = Logger(out, cfg, start) if rank == 0 else None
    row = {}
    # ------------------------------------------------------------ loop
    for u in range(start, cfg.num_updates):
        agent.model.eval()
        mine = pick_episodes(episodes, cfg, u)[rank::world]
        members = [Member(ep, m, u, cfg.seed) for ep in mine for m in range(cfg.group_size)]
        t0 = time.perf_counter()
        trajectories = [r.info for r in rollout(sims, policy, members)]  # step: roll out the groups
        seconds = time.perf_counter() - t0
        stats = update_policy(agent, step, trajectories, cfg, u, rank, world)  # step: the update
        runs, updates = gather(summaries(trajectories), world), gather(stats, world)
        row = {"update": u + 1, **rollout_stats([t for r in runs for t in r], seconds), **merge_update_stats(updates)}
        if rank == 0:  # log
            logger.write(row)
            log(f"update {u + 1}/{cfg.num_updates} SR {row['sr']:.2f} SPL {row['spl']:.2f} return {row['return']:+.2f} "
                f"oracle {row['oracle_rate']:.2f} policy loss {row['policy_loss']:+.4f} sft {row['sft_loss']:.3f} "
                f"(w {row['sft_weight']:.2f}) rollouts {row['rollout_time']:.1f}s update {row['update_time']:.1f}s")
        if (u + 1) % cfg.save_every == 0 or u + 1 == cfg.num_updates:  # save
            save(out, agent.model, optimizer, u + 1, cfg, engine, rank, world)
    if logger:
        logger.close()
    return {"agent": agent, "last": row}


def export(agent, out_dir: Path, checkpoint: str, cfg: RLConfig) -> None:
    """final/: the adapters folded into the weights, loadable like any StreamVLN checkpoint."""
    from pipeline.qwen_tokenizer import load_tokenizer

    model = agent.model.merge_and_unload() if hasattr(agent.model, "merge_and_unload") else agent.model
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(checkpoint).save_pretrained(out_dir)
    (out_dir / "rl_config.json").write_text(json.dumps({"checkpoint": checkpoint, **asdict(cfg)}, indent=1) + "\n")
