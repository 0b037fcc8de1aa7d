"""Benchmark: the padding share of the demo mix's batches with and without sample packing, and the demo model's
forward + backward time on them, in one run. Prints numbers; asserts nothing. `make bench`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from streamvln.data import build_loader, load_mix
from streamvln.model.build import build_model

ROOT = Path(__file__).resolve().parents[2]
BATCHES = 24


def main():
    torch.set_num_threads(2)
    mix = load_mix(str(ROOT / "configs/data/demo.yaml"))
    if not all(Path(s).exists() for t in mix.tasks for s in t.shards):
        print("packing: skipped, no shards/ladder/nav (make ladder-shards writes it)")
        return
    torch.manual_seed(0)
    model = build_model(str(ROOT / "configs/model/demo.yaml"), None)
    batches = [b for _, b in zip(range(BATCHES), build_loader(mix))]
    with torch.no_grad():
        model(**batches[0], predictions=False)  # warm-up: the first call's allocations are not timed
        embedded = [model.embed_multimodal(b["input_ids"], b["labels"], b["attention_mask"], b["images"],
                                           b["n_images"], b["n_history"])[2].sum(1) for b in batches]
    lengths = torch.cat(embedded)
    longest = int(lengths.max())
    print(f"demo mix (configs/data/demo.yaml, batch {mix.batch_size}), demo model: {BATCHES} batches, "
          f"language-model lengths {int(lengths.min())}-{longest} tokens (mean {float(lengths.float().mean()):.0f})")
    for label, budget in (("unpacked (the reference)", 0), (f"packed, pack_tokens {longest}", longest),
                          (f"packed, pack_tokens {2 * longest}", 2 * longest)):
        tokens = positions = rows = 0
        t = time.perf_counter()
        for b in batches:
            model.zero_grad()
            out = model(**b, predictions=False, pack_tokens=budget)
            out["loss_sum"].backward()
            tokens, positions, rows = tokens + out["lm_tokens"], positions + out["lm_positions"], rows + out["lm_rows"]
        dt = time.perf_counter() - t
        print(f"  {label:28s}: padding {1 - tokens / positions:5.1%} of {positions} positions, "
              f"{rows / BATCHES:.1f} rows a batch, forward + backward {BATCHES * mix.batch_size / dt:5.1f} samples/s")


if __name__ == "__main__":
    main()
