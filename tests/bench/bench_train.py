"""Benchmark: peak memory of the loss with labelled-only logits against full logits at a long sequence, and
streamvln-train's samples/s on the demo mix before and after the CPU options (output_vocab, freeze_embeddings,
batch 8, the demo's config), all in this one run. Prints numbers; asserts nothing. `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

MEMORY_PROBE = r"""
import resource, sys, torch
from streamvln.model import StreamVLNConfig, StreamVLNForCausalLM
torch.manual_seed(0)
length, full = int(sys.argv[1]), sys.argv[2] == "full"
config = StreamVLNConfig(vocab_size=151648, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, mm_vision_tower="tiny",
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14))
model = StreamVLNForCausalLM(config)
ids = torch.randint(0, 151000, (1, length))
labels = torch.full_like(ids, -100)
labels[:, ::10] = ids[:, ::10]  # one token in ten is labelled, as in navigation dialogues
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = model(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids, dtype=torch.bool),
            n_history=torch.zeros(1, dtype=torch.long), n_images=torch.zeros(1, dtype=torch.long), full_logits=full)
out["loss"].backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_mb(length: int, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(length), mode], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    print("peak memory of forward + backward, tiny model, vocabulary 151,648, one token in ten labelled:")
    for length in (1024, 4096):
        full, fast = peak_mb(length, "full"), peak_mb(length, "labelled")
        print(f"  {length:5d} tokens: full logits {full:7.0f} MB, labelled-only {fast:6.0f} MB ({full / fast:.1f}x)")
    # the demo's training, before and after the CPU options, in this one run (docs/training.md, "CPU throughput")
    demo = yaml.safe_load(Path(ROOT, "configs/train/demo.yaml").read_text())
    before = {**demo, "model_config": "configs/model/tiny.yaml", "output_vocab": "full", "freeze_embeddings": False}
    runs = [("before: tiny model (64 wide), full vocabulary, trained embedding, batch 2", before, 2),
            ("tiny model, output_vocab labels + freeze_embeddings, batch 2", {**before, "output_vocab": "labels",
                                                                          "freeze_embeddings": True}, 2),
            ("tiny model, both options, batch 8", {**before, "output_vocab": "labels", "freeze_embeddings": True}, 8),
            (f"after: the demo's config ({demo['model_config']}, batch 8)", demo, 8)]
    speeds = []
    print("streamvln-train on the demo mix (configs/data/demo.yaml), 2-core CPU, after 25 steps of warm-up:")
    for name, cfg, batch in runs:
        rows = train_rows(cfg, batch)
        per_s = sum(r["samples_per_s"] for r in rows) / len(rows)
        wait = sum(r["data_wait_share"] for r in rows) / len(rows)
        speeds.append(per_s)
        print(f"  {name}: {per_s:6.1f} samples/s ({per_s / speeds[0]:4.1f}x), {batch / per_s * 1e3:5.0f} ms a step, "
              f"data wait {wait:.1%}")


def train_rows(cfg: dict, batch: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "train.yaml").write_text(yaml.safe_dump({**cfg, "log_every": 5, "save_every": 10**6}))
        cmd = [sys.executable, "-m", "streamvln.train", "--shards", "configs/data/demo.yaml", "--config",
               str(Path(tmp, "train.yaml")), "--output-dir", str(Path(tmp, "run")), "--max-steps", "60",
               "--batch-size", str(batch)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r and r["step"] > 25]  # after start-up


if __name__ == "__main__":
    main()
