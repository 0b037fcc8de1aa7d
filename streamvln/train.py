"""Train: stream shards through the loader into the model with a DeepSpeed engine (torchrun or single process)."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import click
import torch
from tqdm import tqdm

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
import deepspeed  # noqa: E402

from . import checkpoint  # noqa: E402
from .config import ConfigError, TrainConfig, load_train_config  # noqa: E402
from .data import MixConfig, build_loader, load_mix  # noqa: E402
from .data.collate import to_device  # noqa: E402
from .data.loader import label_token_ids  # noqa: E402
from .evaluate import evaluate, format_report  # noqa: E402
from .model.build import apply_lora, build_model, optimizer_groups, set_tunable_parts  # noqa: E402
from .model.modeling import IGNORE_INDEX  # noqa: E402


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine to 0 (cosine) or to min_lr (cosine_with_min_lr), as a factor of each group's lr."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    floor = cfg.min_lr / cfg.lr if cfg.scheduler == "cosine_with_min_lr" else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; a plain `streamvln-train` is a world of one on a free local port."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cuda" if cuda else "cpu")


def deepspeed_config(path: str | None, cfg: TrainConfig, mix: MixConfig, bf16: bool) -> dict:
    """The JSON file's settings (configs/deepspeed/) with the run's batch, accumulation, clipping and precision."""
    ds = json.loads(Path(path).read_text()) if path else {"zero_optimization": {"stage": cfg.zero_stage}}
    ds.update(train_micro_batch_size_per_gpu=mix.batch_size, gradient_accumulation_steps=cfg.grad_accum,
              gradient_clipping=cfg.max_grad_norm, bf16={"enabled": bf16}, steps_per_print=10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW: no JIT-built optimizer op
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2):  # optimizer partitions saved per group: resumable on another world size
        zero.setdefault("elastic_checkpoint", True)
    return ds


def optimizer_steps(loader, grad_accum: int):
    """One optimizer step's micro-batches at a time, with the seconds spent waiting for them; endless
    (a finite loader starts its next epoch)."""
    group, start = [], time.perf_counter()
    while True:
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group, time.perf_counter() - start
                group, start = [], time.perf_counter()


def labelled_tokens(batches: list[dict], world_size: int, device, count=None) -> float:
    """Labelled (trained-on) tokens of an optimizer step's global batch: all micro-batches of all ranks.
    `count`: the model's own count of what its loss averages over (the VLA model: action chunk positions)."""
    count = count or (lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum()))  # position 0 is never a target
    n = sum(count(b) for b in batches)
    total = torch.tensor([float(n)], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    return float(total.item())


def check_manip_data(config, tasks) -> None:
    """Refuse manipulation shards written with another action normalisation, or without a camera the VLA model uses."""
    for t in tasks:
        opts = t.options
        if opts.get("normalization") != config.action_normalization or (
                opts.get("normalization") == "q99" and (opts.get("q01"), opts.get("q99")) !=
                (config.action_q01, config.action_q99)):
            raise ValueError(f"task {t.name!r}: shards normalised with {opts.get('normalization')!r}, the model "
                             f"expects {config.action_normalization!r} (action_normalization in the model config)")
        if opts.get("use_hand_rgb") is False and config.use_hand_rgb:
            raise ValueError(f"task {t.name!r}: shards without the gripper camera, the model has use_hand_rgb: true")


def apply_small_model_options(model, cfg: TrainConfig, loader, rank: int) -> None:
    """output_vocab and freeze_embeddings (docs/training.md); each refuses a model it cannot apply to."""
    if cfg.output_vocab == "labels":
        if hasattr(model, "count_targets"):  # the VLA model's loss is on its action head, not the LM head
            raise ConfigError("output_vocab: labels applies to StreamVLN models, not the VLA model")
        ids = set(label_token_ids(loader.plan)) | set(model.config.output_vocab or [])  # a checkpoint's stay
        model.set_output_vocab(sorted(ids))
        if rank == 0:
            print(f"output_vocab: labels -> the head predicts {len(ids)} token ids")
    elif getattr(model.config, "output_vocab", None):
        raise ConfigError(f"the checkpoint predicts a restricted output vocabulary ({len(model.config.output_vocab)} "
                          f"ids): train it on with `output_vocab: labels`")
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)


class Metrics:
    """Accumulates one optimizer step's losses per task, tokens and data-wait time; writes metrics.jsonl."""

    def __init__(self, out_dir: Path, task_names: list[str], rank: int, tensorboard: bool, device):
        self.names, self.rank, self.device = task_names, rank, device
        self.file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.tb = None
        if tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.reset()

    def reset(self):
        self.loss_sum, self.loss_tokens = defaultdict(float), defaultdict(int)
        self.samples = self.tokens = self.lm_tokens = self.frames = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, batch: dict, out: dict, wait: float = 0.0):
        for mix_id, loss, n in zip(batch["mix_ids"].tolist(), out["sample_loss_sum"].tolist(), out["sample_tokens"].tolist()):
            self.loss_sum[self.names[mix_id]] += loss
            self.loss_tokens[self.names[mix_id]] += n
        self.samples += len(batch["mix_ids"])
        self.tokens += int(batch["attention_mask"].sum())
        self.lm_tokens += out.get("lm_tokens", 0)  # text plus visual tokens: what the language model ran on
        self.frames += int(batch["n_images"].sum())
        self.wait += wait

    def write(self, step: int, lr: float, world_size: int, extra: dict | None = None) -> dict:
        """Sum this interval over all ranks (every rank logs at the same steps), then write on rank 0."""
        elapsed = time.perf_counter() - self.start
        totals = torch.tensor([*(self.loss_sum[t] for t in self.names), *(self.loss_tokens[t] for t in self.names),
                               self.samples, self.tokens, self.lm_tokens, self.frames, self.wait],
                              dtype=torch.float64, device=self.device)
        if world_size > 1:
            torch.distributed.all_reduce(totals)
        n = len(self.names)
        totals = totals.tolist()
        losses, counts = totals[:n], totals[n : 2 * n]
        samples, tokens, lm_tokens, frames, wait = totals[2 * n :]
        row = {"step": step, "loss": sum(losses) / max(1.0, sum(counts)), "lr": lr,
               "loss_per_task": {t: loss / c for t, loss, c in zip(self.names, losses, counts) if c},
               "samples": int(samples), "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
               "lm_tokens_per_s": lm_tokens / elapsed, "frames_per_s": frames / elapsed,
               "data_wait_share": wait / world_size / elapsed, **(extra or {})}
        if self.device.type == "cuda":  # this rank's peak since the last row
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        self.reset()
        return row


def train(cfg: TrainConfig, mix: MixConfig, out_dir: Path, ds_config_path: str | None = None, resume: bool = False) -> dict:
    # ------------------------------------------------------------ load
    rank, world_size, device = init_distributed()
    torch.manual_seed(cfg.seed)
    bf16 = cfg.bf16
    model = build_model(cfg.model_config, cfg.checkpoint, attn_implementation=cfg.attn_implementation)
    set_tunable_parts(model, cfg.mm_tunable_parts)
    loader = build_loader(mix, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                          pin_memory=device.type == "cuda")
    apply_small_model_options(model, cfg, loader, rank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = apply_lora(model, cfg.lora)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * loader.batches_per_epoch / cfg.grad_accum)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.lr, cfg.vision_lr, cfg.projector_lr, cfg.weight_decay),
                                  betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(ds_config_path, cfg, mix, bf16))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps({"train": asdict(cfg), "mix": asdict(mix)}, indent=1) + "\n")
    ckpt_dir, step = out_dir / "checkpoints", 0
    if resume and (found := checkpoint.latest(ckpt_dir)) is not None:
        tag, state = found
        loader.load_state_dict(state["loader"])  # first: refuses another world size or mix, saying why
        checkpoint.load_engine(engine, ckpt_dir, tag)
        step = state["step"]
    names = [t.name for t in mix.tasks]
    count = getattr(model, "count_targets", None)
    if count is not None:  # the VLA model: its action normalisation must be the shards'
        check_manip_data(model.config, loader.plan.tasks)
    metrics = Metrics(out_dir, names, rank, cfg.tensorboard, device)
    sample_log = open(out_dir / f"samples.rank{rank}.jsonl", "a", buffering=1) if cfg.log_samples else None
    eval_mix = load_mix(cfg.eval_shards, finite=True, batch_size=mix.batch_size) if cfg.eval_shards else None
    result = {}

    # ------------------------------------------------------------ loop
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train", disable=rank != 0)
    steps = optimizer_steps(loader, cfg.grad_accum)
    full_logits = {"full_logits": True} if cfg.full_logits else {}
    while step < total_steps:
        batches, wait = next(steps)
        # step: forward and backward per micro-batch, the optimizer at the last. global_tokens: each labelled
        # token weighs 1 / (labelled tokens of the global batch), however the batch is split over ranks and
        # micro-batches (DeepSpeed divides by world size x accumulation, so that factor is put back)
        scale = world_size * cfg.grad_accum / max(1.0, labelled_tokens(batches, world_size, device, count))
        for i, batch in enumerate(batches):
            out = engine(**to_device(batch, device), predictions=False, **full_logits)
            engine.backward(out["loss_sum"] * scale if cfg.loss_normalization == "global_tokens" else out["loss"])
            engine.step()
            metrics.add(batch, out, wait if i == 0 else 0.0)
            if sample_log:
                sample_log.write(json.dumps({"step": step + 1, "micro": i, "keys": batch["keys"]}) + "\n")
        step += 1
        bar.update()
        if step % cfg.log_every == 0 or step == total_steps:  # log
            row = metrics.write(step, scheduler.get_last_lr()[0], world_size, {"skipped_samples": loader.skipped})
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}")
            if rank == 0:
                bar.write(f"step {step}/{total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                          f"{row['samples_per_s']:.1f} samples/s data wait {row['data_wait_share']:.0%}")
        if step % cfg.save_every == 0 or step == total_steps:  # save
            checkpoint.save(engine, ckpt_dir, step, {"step": step, "world_size": world_size,
                                                     "loader": loader.state_dict(),
                                                     "config": {"train": asdict(cfg), "mix": asdict(mix)}},
                            cfg.keep_checkpoints)
        if eval_mix and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):  # eval
            result = evaluate(engine.module, build_loader(eval_mix, rank=rank, world_size=world_size), names,
                              cfg.eval_batches, device)
            metrics.write(step, scheduler.get_last_lr()[0], world_size, {"eval": result})
            if rank == 0:
                bar.write(format_report(result))
    steps.close()  # stops the loader's workers
    if sample_log:
        sample_log.close()
    bar.close()

    # ------------------------------------------------------------ export
    # ZeRO-3 partitions the weights: gather them (a collective, so on every rank) before rank 0 writes
    full_state = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    if rank == 0:
        checkpoint.export(engine.module, out_dir / "final", tokenizer=cfg.tokenizer, train_config=cfg, mix_config=mix,
                          state_dict=full_state)
    torch.distributed.barrier()
    return {"step": step, "eval": result, "model": engine.module, "loader": loader}


@click.command()
@click.option("--shards", "mix_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Data-mix YAML (configs/data/*.yaml).")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Train YAML (configs/train/*.yaml).")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--deepspeed", "ds_config", type=click.Path(dir_okay=False, exists=True),
              help="DeepSpeed JSON (configs/deepspeed/zero2.json or zero3.json) [ZeRO stage from the train config].")
@click.option("--resume", is_flag=True, help="Continue exactly from the newest checkpoint in the run folder.")
@click.option("--max-steps", type=int, help="Override max_steps.")
@click.option("--batch-size", type=int, help="Override the mix's per-rank batch_size (e.g. to keep the global batch "
                                             "when resuming on fewer ranks).")
@click.option("--grad-accum", type=int, help="Override grad_accum.")
def main(mix_path, config_path, output_dir, ds_config, resume, max_steps, batch_size, grad_accum):
    """Train a StreamVLN model on shards; `torchrun -m streamvln.train` for several processes. --resume works
    on another number of ranks too (docs/training.md: elastic resume)."""
    try:
        cfg = load_train_config(config_path, max_steps=max_steps, grad_accum=grad_accum)
        mix = load_mix(mix_path, batch_size=batch_size)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    train(cfg, mix, Path(output_dir), ds_config, resume)


if __name__ == "__main__":
    main()
