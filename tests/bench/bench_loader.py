"""Benchmark: the shard loader against an on-the-fly baseline (the reference's per-sample work) and the
decode floor, on demo data at 384x384. Prints numbers; asserts nothing. Run with `make bench`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from pipeline.config import NavShardConfig  # noqa: E402
from pipeline.dialogue import nav_dialogue  # noqa: E402
from pipeline.frames import plan_chunks  # noqa: E402
from pipeline.nav import run_nav  # noqa: E402
from pipeline.qwen_tokenizer import load_tokenizer  # noqa: E402
from pipeline.shard_writer import read_sample_bytes  # noqa: E402
from pipeline.synth import write_demo  # noqa: E402
from pipeline.tokens import TokenIds, tokenize_dialogue  # noqa: E402
from streamvln.data import MixConfig, TaskMix, build_loader  # noqa: E402
from streamvln.data.decode import decode_jpeg, normalize_  # noqa: E402

torch.set_num_threads(1)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(fn, n_samples: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return n_samples / (time.perf_counter() - wall), (cpu_seconds() - cpu) / n_samples


def on_the_fly(rows: list[dict], data: Path, tok, ids: TokenIds):
    """What the reference does per sample: list the folder, open each JPEG, run the SigLIP image
    processor (transformers' PIL implementation: resize bicubic, rescale, normalise), build and
    tokenise the dialogue."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    annotations = {s: {str(e["id"]): e for e in json.loads((data / s / "annotations.json").read_text())}
                   for s in ("R2R", "RxR")}
    rng = __import__("random").Random(0)
    for row in rows:
        ep = annotations[row["source"]][row["episode"]]
        frame_dir = data / row["source"] / ep["video"] / "rgb"
        files = sorted(os.listdir(frame_dir))
        chunk = next(c for c in plan_chunks(ep["actions"]) if c.start == row["start"])
        images = [Image.open(frame_dir / files[i]).convert("RGB") for i in chunk.history_frames + chunk.current_frames]
        processor.preprocess(images, return_tensors="pt")["pixel_values"]
        turns = nav_dialogue(ep["instructions"][row["instruction"]], chunk.actions, has_history=chunk.start != 0,
                             num_future_steps=4, rng=rng)
        tokenize_dialogue(tok, ids, turns)


def floor(rows: list[dict], task: Path):
    """Decode and normalise the same stored frames, nothing else (read outside the timing)."""
    frames = []
    for row in rows:
        members = read_sample_bytes(task / row["shard"], row["offset"], row["size"])
        frames.append([v for k, v in sorted(members.items()) if k.endswith(".jpg")])

    def run():
        for jpgs in frames:
            batch = torch.from_numpy(np.stack([decode_jpeg(j, 384) for j in jpgs])).permute(0, 3, 1, 2)
            normalize_(batch)
    return run


def main():
    tokenizer = os.environ.get("STREAMVLN_TOKENIZER", str(ROOT / "build" / "qwen2_tokenizer"))
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        write_demo(work / "data", episodes=40, val_episodes=0, seed=2)
        run_nav([work / "data" / "R2R", work / "data" / "RxR"], work / "shards", NavShardConfig(samples_per_shard=32),
                tokenizer, progress=False)
        task = work / "shards" / "nav"
        rows = pq.read_table(task / "index.parquet").to_pylist()
        n = len(rows)
        frames = sum(r["n_frames"] for r in rows)
        tok = load_tokenizer(tokenizer)
        print(f"demo data: {n} samples, {frames / n:.1f} frames per sample at 384x384 "
              f"(sources 640x480); 1 torch thread per process")
        results = {}
        results["on-the-fly baseline (reference per-sample work)"] = measure(
            lambda: on_the_fly(rows, work / "data", tok, TokenIds.of(tok)), n)
        results["floor: decode + normalise only"] = measure(floor(rows, task), n)
        for augment in (False, True):
            for uint8 in (False, True):
                for workers in (0, 2):
                    mix = MixConfig(tasks=[TaskMix("nav", [str(task)])], batch_size=4, finite=True, augment=augment,
                                    uint8_images=uint8)
                    loader = build_loader(mix, num_workers=workers)
                    start = time.perf_counter()
                    first = []

                    def run():
                        for b in loader:
                            if not first:
                                first.append(time.perf_counter() - start)

                    total = len(loader) * 4
                    sps, cps = measure(run, total)
                    label = (f"loader: {'uint8' if uint8 else 'float'}, augment {'on ' if augment else 'off'}, "
                             f"{workers} workers")
                    results[label] = (sps, cps)
                    results[label + " (first batch s)"] = first[0]
        base_cps = results["on-the-fly baseline (reference per-sample work)"][1]
        floor_cps = results["floor: decode + normalise only"][1]
        print(f"{'':58s} {'samples/s':>10} {'CPU ms/sample':>14} {'vs baseline':>12} {'vs floor':>9}")
        for label, value in results.items():
            if label.endswith("(first batch s)"):
                continue
            sps, cps = value
            first = results.get(label + " (first batch s)")
            extra = f"   first batch after {first:.2f}s" if first is not None else ""
            print(f"{label:58s} {sps:>10.1f} {cps * 1e3:>14.2f} {base_cps / cps:>11.1f}x {cps / floor_cps:>8.2f}x{extra}")
        print("'vs baseline' = how many times less CPU per sample than the on-the-fly baseline (per core);")
        print("'vs floor' = CPU per sample relative to decoding + normalising the same frames")
        mix = MixConfig(tasks=[TaskMix("nav", [str(task)])], batch_size=4, finite=True, uint8_images=True)
        loader = build_loader(mix, num_workers=2)
        sizes = []
        for _ in range(4):
            for _ in loader:
                pass
            sizes.append(rss_mb())
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"resident memory of the main process after epochs 1-4: {', '.join(f'{s:.0f}' for s in sizes)} MB; "
              f"largest worker: {kids:.0f} MB")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
