"""`make gpu-check` (tests/bench/bench_gpu.py): it refuses a machine without a GPU at once, and its CPU dry run
goes through every stage (data, three trainer runs, the agent, the loader) so the script cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path, capsys):
    assert bench_gpu.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.slow
def test_the_dry_run_goes_through_every_stage_and_writes_one_table(tmp_path, tokenizer_dir, capsys):
    assert bench_gpu.main(["--dry-run", "--out", str(tmp_path / "check"), "--tokenizer", str(tokenizer_dir)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "check" / "results.json").read_text())
    rows = {r["what"]: r for r in result["rows"]}
    train = [r for w, r in rows.items() if w.startswith("train:")]
    assert len(train) == 3 and all(r["samples_per_s"] > 0 and r["lm_tokens_per_s"] > 0 for r in train)
    assert rows["train: packed"]["pack_tokens"] > 0
    # packing and the full logits change the work, not the loss: the three runs trained on the same batches
    losses = [r["final_loss"] for r in train]
    assert max(losses) - min(losses) < 0.01 * losses[0], losses
    agent = [r for w, r in rows.items() if w.startswith("agent:")]
    assert len(agent) == 8 and all(r["ms"] > 0 for r in agent)
    assert {"loader: 1 worker", "loader: 2 workers"} <= set(rows)
    assert "| train: unpacked, labelled-only head |" in printed and result["data"].startswith("simulator")
