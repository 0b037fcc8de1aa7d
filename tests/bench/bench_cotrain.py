"""Benchmark: video QA sharding throughput (videos/s per worker) against the floor of decoding the same frames.

Prints numbers; asserts nothing. Run with `make bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import VideoQAShardConfig  # noqa: E402
from pipeline.convo_reader import read_conversations  # noqa: E402
from pipeline.cotrain import build_videoqa, plan_task, run_cotrain  # noqa: E402
from pipeline.images import encode_array  # noqa: E402
from pipeline.qwen_tokenizer import load_tokenizer  # noqa: E402
from pipeline.runner import write_shard  # noqa: E402
from pipeline.synth_cotrain import write_video  # noqa: E402
from pipeline.tokens import TokenIds  # noqa: E402
from pipeline.video_frames import open_video  # noqa: E402

VIDEOS, SECONDS, FPS = 64, 20, 30  # 600 frames a video; the reference's defaults take 32 of them


def write_videos(root: Path) -> Path:
    """mp4 files of 20 s at 30 fps (opencv's MPEG-4 part 2, 160x120 scaled up to 640x360 by re-encoding)."""
    import cv2

    rng = np.random.default_rng(0)
    records = []
    for i in range(VIDEOS):
        small = root / f"small_{i}.mp4"
        write_video(small, "red", "left" if i % 2 else "right", SECONDS, FPS, rng)
        reader = cv2.VideoCapture(str(small))
        path = root / "bench" / f"v{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (640, 360))
        noise = rng.integers(0, 40, (360, 640, 3), dtype=np.uint8)  # texture, so frames are not trivially small
        ok, frame = reader.read()
        while ok:
            writer.write(cv2.add(cv2.resize(frame, (640, 360)), noise))
            ok, frame = reader.read()
        writer.release()
        small.unlink()
        records.append({"id": f"v{i}", "video": f"v{i:03d}.mp4", "data_source": "bench", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the ball?"}, {"from": "gpt", "value": "Red."}]})
    (root / "bench.json").write_text(json.dumps(records))
    return root / "bench.json"


def main():
    tokenizer = os.environ.get("STREAMVLN_TOKENIZER", str(ROOT / "build" / "qwen2_tokenizer"))
    work = Path(tempfile.mkdtemp(prefix="bench-cotrain-"))
    try:
        annotations = write_videos(work)
        cfg = VideoQAShardConfig(samples_per_shard=4, add_time_instruction=True)
        print(f"{VIDEOS} videos of {SECONDS} s at {FPS} fps, 640x360 mp4 -> {cfg.frames_upbound} frames each "
              f"(linspace), {cfg.image_size}x{cfg.image_size} JPEG")
        records, _, _ = read_conversations(annotations)
        start = time.perf_counter()
        for r in records:
            open_video(str(work / r.media), cfg.frames_upbound, cfg.video_fps, cfg.force_sample).decode()
        decode = time.perf_counter() - start
        start = time.perf_counter()
        for r in records:
            clip = open_video(str(work / r.media), cfg.frames_upbound, cfg.video_fps, cfg.force_sample)
            for f in clip.decode():
                encode_array(f, cfg.image_size, cfg.jpeg_quality)
        floor = time.perf_counter() - start
        print(f"decord decode of the sampled frames only: {VIDEOS / decode:.2f} videos/s")
        print(f"floor (decode + resize + JPEG encode, 1 process): {VIDEOS / floor:.2f} videos/s")

        tok = load_tokenizer(tokenizer)
        _, groups = plan_task("videoqa", [(annotations, None)], cfg, {})
        ids = TokenIds.of(tok)
        (work / "steady").mkdir()
        start = time.perf_counter()
        for i, g in enumerate(groups):
            write_shard(work / "steady", "train", i, g, lambda r: build_videoqa(r, work, cfg, tok, ids))
        steady = time.perf_counter() - start
        print(f"one worker, steady state (no start-up): {VIDEOS / steady:.2f} videos/s, {steady / floor:.2f}x the floor")
        print(f"{'workers':>8} {'wall s':>8} {'videos/s':>9} {'videos/s/worker':>16} {'MB/s':>7}")
        for workers in (1, 2):
            start = time.perf_counter()
            summary = run_cotrain("videoqa", [(annotations, None)], work, work / f"out{workers}", cfg, tokenizer,
                                  workers=workers, progress=False)
            wall = time.perf_counter() - start
            written = summary["manifest"]["counts"]["samples_written"]
            mb = sum(s["bytes"] for s in summary["manifest"]["shards"]) / 1e6
            print(f"{workers:>8} {wall:>8.2f} {written / wall:>9.2f} {written / wall / workers:>16.2f} {mb / wall:>7.1f}")
        print("(wall time includes start-up: reading the JSON, loading the tokenizer, forking workers)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
