"""Benchmark: shard-writing throughput against the floor of decoding, resizing and re-encoding the same JPEGs.

Prints numbers; asserts nothing. Run with `make bench`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import NavShardConfig  # noqa: E402
from pipeline.images import resize_frame  # noqa: E402
from pipeline.nav import episode_chunks, nav_builder, plan_nav, run_nav  # noqa: E402
from pipeline.runner import write_shard  # noqa: E402
from pipeline.qwen_tokenizer import load_tokenizer  # noqa: E402
from pipeline.reader import list_frames, read_source  # noqa: E402
from pipeline.synth import write_demo  # noqa: E402


def floor_seconds(sources: list[Path], cfg: NavShardConfig) -> tuple[float, int]:
    """Decode + resize + encode every frame the shards need, once each (what the writer must do at least)."""
    paths = []
    for src in sources:
        for ep in read_source(src)[0]:
            chunks = episode_chunks(ep, cfg)
            files = list_frames(ep)
            needed = sorted({i for c in chunks for i in c.history_frames + c.current_frames})
            paths += [os.path.join(ep.frame_dir, files[i]) for i in needed]
    start = time.perf_counter()
    for path in paths:
        resize_frame(path, cfg.image_size, cfg.jpeg_quality)
    return time.perf_counter() - start, len(paths)


def main():
    tokenizer = os.environ.get("STREAMVLN_TOKENIZER", str(ROOT / "build" / "qwen2_tokenizer"))
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        write_demo(work / "data", episodes=100, val_episodes=0, seed=1)  # 640x480 frames, as Habitat renders
        sources = [work / "data" / "R2R", work / "data" / "RxR"]
        cfg = NavShardConfig(samples_per_shard=32)
        floor, n_frames = floor_seconds(sources, cfg)
        print(f"demo data: 200 episodes, 640x480 JPEG frames -> {cfg.image_size}x{cfg.image_size}")
        print(f"floor (decode+resize+encode only, 1 process): {n_frames} frames in {floor:.2f}s = "
              f"{n_frames / floor:.0f} frames/s")
        tok = load_tokenizer(tokenizer)
        _, groups = plan_nav(sources, cfg, {})
        (work / "steady").mkdir()
        start = time.perf_counter()
        build = nav_builder(cfg, tok)
        stats = [write_shard(work / "steady", cfg.split, i, g, build) for i, g in enumerate(groups)]
        steady = time.perf_counter() - start
        samples = sum(s["samples"] for s in stats)
        episodes = sum(len(g) for g in groups)
        print(f"one worker, steady state (no start-up): {episodes / steady:.1f} episodes/s, "
              f"{samples / steady:.1f} samples/s, {sum(s['bytes'] for s in stats) / 1e6 / steady:.1f} MB/s, "
              f"{steady / floor:.2f}x the floor")
        print(f"{'workers':>8} {'wall s':>8} {'episodes/s':>11} {'samples/s':>10} {'samples/s/worker':>17} "
              f"{'MB/s':>7} {'vs floor':>9}")
        for workers in (1, 2):
            out = work / f"shards{workers}"
            start = time.perf_counter()
            summary = run_nav(sources, out, cfg, tokenizer, workers=workers, progress=False)
            wall = time.perf_counter() - start
            counts = summary["manifest"]["counts"]
            mb = sum(s["bytes"] for s in summary["manifest"]["shards"]) / 1e6
            print(f"{workers:>8} {wall:>8.2f} {counts['episodes_written'] / wall:>11.1f} "
                  f"{counts['samples_written'] / wall:>10.1f} {counts['samples_written'] / wall / workers:>17.1f} "
                  f"{mb / wall:>7.1f} {wall * workers / floor:>8.2f}x")
        print("(wall time includes start-up: reading annotations, loading the tokenizer, spawning workers;"
              " 'vs floor' = worker-seconds / floor-seconds)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
