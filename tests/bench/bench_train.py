"""Benchmark: the tiny model's training step on CPU (data wait vs compute, from the trainer's own metrics),
and peak memory of the loss with labelled-only logits against full logits at a long sequence.
Prints numbers; asserts nothing. Run with `make bench` (after `make shards`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "streamvln.train", "--shards", "configs/data/demo.yaml", "--config",
               "configs/train/demo.yaml", "--output-dir", tmp, "--max-steps", "60"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "eval" not in r and r["step"] > 25]  # after start-up
    step_s = sum(2 / r["samples_per_s"] for r in rows) / len(rows)  # batch 2, grad_accum 1
    wait = sum(r["data_wait_share"] for r in rows) / len(rows)
    print(f"tiny model on CPU (demo mix, batch 2): {step_s * 1e3:.0f} ms per step, data wait {wait:.1%} "
          f"({step_s * wait * 1e3:.1f} ms), compute {step_s * (1 - wait) * 1e3:.0f} ms; "
          f"{sum(r['tokens_per_s'] for r in rows) / len(rows):.0f} text tokens/s")


if __name__ == "__main__":
    main()
