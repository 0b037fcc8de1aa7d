"""The one-shot GPU check (`make gpu-check`): trainer, streaming agent and loader at real shapes on one GPU, one table.

On a machine with a CUDA device it writes its own data (simulator frames at 384, sharded with the reference's
options), then measures:
- streamvln-train on a Qwen2-1.5B-shaped language model with a SigLIP-so400m-shaped tower (random weights,
  the real vocabulary), bf16, gradient checkpointing, single-GPU DeepSpeed ZeRO-2: unpacked with the
  labelled-only head, packed, and with the reference's full logits; samples/s, language-model tokens/s, MFU
  (FLOPs counted as docs/gpu.md counts them), peak memory, the share of time waiting for data;
- the streaming agent at the Qwen2-7B shape, bf16, inference: ms per decision at the first turn, mid-window,
  the window's end and the next window's opening (with memory), KV-cached against recomputed;
- the loader alone with 1 and 2 workers, against what the trainer consumed.
It prints one table and writes results.json. Without a GPU it exits at once (status 2) saying so; `--dry-run`
runs the same code on CPU at tiny shapes (tests/test_gpu_check.py runs it in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VISION_384 = {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_select_layer": -2}
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, **VISION_384)
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                tie_word_embeddings=False, **VISION_384)
TINY = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM

SHAPES = {
    "gpu": {"train_model": QWEN2_1_5B, "agent_model": QWEN2_7B, "image": 384, "episodes": 24, "steps": 14,
            "warmup_rows": 4, "batch": 2, "agent_frames": 34, "loader_batches": 40},
    "dry": {"train_model": TINY, "agent_model": TINY, "image": 112, "episodes": 4, "steps": 2, "warmup_rows": 1,
            "batch": 2, "agent_frames": 10, "loader_batches": 4},
}


def sh(*args, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def make_shards(out: Path, shape: dict, tokenizer: Path) -> tuple[Path, str]:
    """Room-rung expert walks rendered at the shape's size, sharded with the reference's options; the
    pillar world (`streamvln-shards synth`) where the simulator cannot render."""
    size = shape["image"]
    src, source = out / "trajectories" / "SimRoom", "simulator (room rung)"
    try:
        sh("-m", "streamvln.sim.cli", "episodes", "--tier", "room", "--out", str(out / "episodes"), "--split", "train",
           "--scenes", str(shape["episodes"] // 2), "--per-scene", "2", "--seed", "0")
        sh("-m", "streamvln.sim.cli", "trajectories", "--episodes", str(out / "episodes" / "train.json.gz"),
           "--out", str(src), "--width", str(size), "--height", str(size), "--workers", "4")
    except RuntimeError as e:
        print(f"the simulator could not render here ({str(e).strip().splitlines()[-1][:200]}); using the pillar world")
        sh("-m", "pipeline.cli", "synth", "--out", str(out / "synth"), "--episodes", str(shape["episodes"]),
           "--val-episodes", "1", "--width", str(size), "--height", str(size), "--cotrain", "0")
        src, source = next((out / "synth" / "trajectory_data").iterdir()), "pillar world (synth)"
    sh("-m", "pipeline.cli", "nav", "--src", str(src), "--tokenizer", str(tokenizer), "--out", str(out / "shards"),
       "--image-size", str(size), "--samples-per-shard", "32", "--quiet")
    return out / "shards" / "nav", source


def param_counts(model_keys: dict) -> tuple[int, int, int]:
    """(language-model parameters, vision-tower parameters, patches a frame), from the shapes alone."""
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM
    with torch.device("meta"):
        model = StreamVLNForCausalLM(StreamVLNConfig(**model_keys))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".vision_tower." in n)
    lm = sum(p.numel() for n, p in model.named_parameters() if ".vision_tower." not in n and "mm_projector" not in n)
    vc = model.config.vision_tower_config()
    return lm, vision, (vc.image_size // vc.patch_size) ** 2


def train_runs(out: Path, shards: Path, shape: dict, tokenizer: Path, peak_tflops: float | None) -> list[dict]:
    (out / "model.yaml").write_text(yaml.safe_dump(shape["train_model"]))
    lm_params, vision_params, patches = param_counts(shape["train_model"])
    runs = [("train: unpacked, labelled-only head", {}, {}),
            ("train: packed", {}, {"pack_tokens": "auto"}),
            ("train: unpacked, full logits (reference)", {"full_logits": True}, {})]
    rows = []
    for label, train_extra, mix_extra in runs:
        name = label.split(": ")[1].split(",")[0].replace(" ", "_") + ("_full" if train_extra else "")
        mix = {"tasks": [{"name": "nav", "shards": [str(shards)]}], "batch_size": shape["batch"],
               "image_size": shape["image"], "uint8_images": True, "augment": True}
        if mix_extra:  # two samples' worth of tokens a row: the longest sample at this shape, twice
            mix["pack_tokens"] = 2 * longest_sample(shards, shape)
        train = {"model_config": str(out / "model.yaml"), "max_steps": shape["steps"], "lr": 1e-5, "vision_lr": 1e-5,
                 "warmup_ratio": 0.0, "grad_accum": 1, "bf16": True, "gradient_checkpointing": True,
                 "zero_stage": 2, "num_workers": 2, "log_every": 1, "save_every": 10**6, **train_extra}
        (out / f"{name}.mix.yaml").write_text(yaml.safe_dump(mix))
        (out / f"{name}.train.yaml").write_text(yaml.safe_dump(train))
        run_dir = out / "runs" / name
        sh("-m", "streamvln.train", "--shards", str(out / f"{name}.mix.yaml"), "--config",
           str(out / f"{name}.train.yaml"), "--output-dir", str(run_dir), env={"OMP_NUM_THREADS": "4"})
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = metrics[shape["warmup_rows"]:] or metrics
        mean = {k: float(np.mean([m[k] for m in steady])) for k in
                ("samples_per_s", "lm_tokens_per_s", "frames_per_s", "data_wait_share")}
        flops = 6 * lm_params * mean["lm_tokens_per_s"] + 6 * vision_params * patches * mean["frames_per_s"]
        rows.append({"what": label, **mean, "pack_tokens": mix.get("pack_tokens", 0),
                     "peak_memory_gb": max((m["peak_memory_gb"] for m in metrics if "peak_memory_gb" in m),
                                           default=None),  # CUDA only
                     "tflops": flops / 1e12, "mfu": flops / (peak_tflops * 1e12) if peak_tflops else None,
                     "final_loss": metrics[-1]["loss"]})
    return rows


def longest_sample(shards: Path, shape: dict) -> int:
    """The longest sample's language-model length: its text, less the placeholders, plus its frames' tokens."""
    import math

    from streamvln.data import build_loader
    from streamvln.data.config import MixConfig, TaskMix
    from streamvln.model.config import StreamVLNConfig
    cfg = StreamVLNConfig(**shape["train_model"])
    vc = cfg.vision_tower_config()
    side = vc.image_size // vc.patch_size
    stride = cfg.mm_spatial_pool_stride or 1
    pooled = math.ceil(side / stride) if cfg.mm_spatial_pool_mode == "bilinear" else side // stride
    mix = MixConfig(tasks=[TaskMix(name="nav", shards=[str(shards)])], image_size=shape["image"], batch_size=1,
                    uint8_images=True, finite=True)
    longest = 0
    for batch in build_loader(mix):
        n, h = batch["n_images"], batch["n_history"]
        text = batch["attention_mask"].sum(1) - (n - h) - (h > 0).long()  # less <image> and <memory>
        longest = max(longest, int((text + n * pooled**2).max()))
    return longest


def agent_timings(shape: dict, device: torch.device, dtype: torch.dtype, tokenizer: Path) -> list[dict]:
    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.agent.streaming import AgentConfig, StreamingAgent
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: a 7B model is never materialised in fp32
    try:
        with device:
            model = StreamVLNForCausalLM(StreamVLNConfig(**shape["agent_model"], attn_implementation="sdpa")).eval()
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    tok = load_tokenizer(tokenizer)
    size = model.config.vision_tower_config().image_size
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(shape["agent_frames"])]
    num_frames = shape["agent_frames"] - 2
    marks = {"first turn": 0, "mid-window": num_frames // 2, "window end": num_frames - 1,
             "next window (memory)": num_frames}
    rows = []
    for use_cache in (True, False):
        # a random model writes no actions: every step is a decision, answers capped at 6 tokens (a trained
        # model writes about 6: four actions, then the end)
        agent = StreamingAgent(model, tok, AgentConfig(num_frames=num_frames, num_history=8, image_size=size,
                                                       max_new_tokens=6, use_cache=use_cache))
        agent.reset(0, "bench", "Walk down the hallway, turn left at the plant and stop next to the red chair.")
        times = []
        for f in frames:
            sync(device)
            t = time.perf_counter()
            agent.act([f])
            sync(device)
            times.append(time.perf_counter() - t)
        for mark, k in marks.items():
            rows.append({"what": f"agent: {mark}, {'KV-cached' if use_cache else 'recomputed'}", "ms": times[k] * 1e3})
    del model
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_rates(shards: Path, shape: dict) -> list[dict]:
    from streamvln.data import build_loader
    from streamvln.data.config import MixConfig, TaskMix
    rows = []
    for workers in (1, 2):
        mix = MixConfig(tasks=[TaskMix(name="nav", shards=[str(shards)])], image_size=shape["image"],
                        batch_size=shape["batch"], uint8_images=True, augment=True)
        loader = iter(build_loader(mix, num_workers=workers))
        next(loader)  # workers started
        t = time.perf_counter()
        for _ in range(shape["loader_batches"]):
            next(loader)
        dt = time.perf_counter() - t
        rows.append({"what": f"loader: {workers} worker{'s' * (workers > 1)}",
                     "samples_per_s": shape["loader_batches"] * shape["batch"] / dt})
        del loader
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| what | samples/s | LM tokens/s | TFLOP/s | MFU | peak GB | data wait | ms |", "|" + " --- |" * 8]
    for r in rows:
        def cell(key, fmt):
            v = r.get(key)
            return "" if v is None else format(v, fmt)
        lines.append(f"| {r['what']} | {cell('samples_per_s', '.2f')} | {cell('lm_tokens_per_s', '.0f')} | "
                     f"{cell('tflops', '.1f')} | {cell('mfu', '.1%')} | {cell('peak_memory_gb', '.1f')} | "
                     f"{cell('data_wait_share', '.1%')} | {cell('ms', '.1f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU at tiny shapes (CI)")
    parser.add_argument("--out", default="runs/gpu_check", help="data, runs and results.json [runs/gpu_check]")
    parser.add_argument("--tokenizer", default="build/qwen2_tokenizer")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (MFU); "
                        "default: known cards by name")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False). Run `make gpu-check` on a GPU "
              "machine (docs/gpu.md), or `python tests/bench/bench_gpu.py --dry-run` for the CPU rehearsal.")
        return 2
    t0 = time.perf_counter()
    shape = SHAPES["dry" if args.dry_run else "gpu"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    card = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = (ROOT / args.tokenizer).resolve()
    print(f"bench_gpu on {card}, torch {torch.__version__}: writing {out}")
    shards, source = make_shards(out / "data", shape, tokenizer)
    print(f"data: {source}, {shape['image']}x{shape['image']} frames ({time.perf_counter() - t0:.0f} s)")
    rows = train_runs(out, shards, shape, tokenizer, peak)
    print(f"trainer done ({time.perf_counter() - t0:.0f} s)")
    rows += agent_timings(shape, device, torch.bfloat16, tokenizer)
    rows += loader_rates(shards, shape)
    consumed = rows[0]["samples_per_s"]
    result = {"card": card, "torch": torch.__version__, "data": source, "shape": "dry" if args.dry_run else "gpu",
              "trainer_consumes_samples_per_s": consumed, "seconds": time.perf_counter() - t0, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"the trainer consumed {consumed:.2f} samples/s; {time.perf_counter() - t0:.0f} s in all; {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
