"""The trainer end to end on CPU: metrics, exact resume, a 2-process torchrun (gloo) run, export and eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import episode, write_source
from pipeline.config import NavShardConfig
from pipeline.nav import run_nav

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = dict(vocab_size=151648, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, mm_vision_tower="tiny", mm_vision_select_layer=-1,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=56, patch_size=14))


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("train")
    a = write_source(root / "data", "A", [episode(i, 20 + 7 * i, ("Go to the sofa.", "Walk left.")) for i in range(6)])
    run_nav([a], root / "shards", NavShardConfig(image_size=56, samples_per_shard=4), tokenizer_dir, progress=False)
    run_nav([a], root / "shards", NavShardConfig(image_size=56, samples_per_shard=4, split="val"), tokenizer_dir,
            progress=False)
    (root / "model.yaml").write_text(yaml.safe_dump(TINY))
    mix = {"tasks": [{"name": "nav", "shards": [str(root / "shards" / "nav")]}], "batch_size": 2, "image_size": 56,
           "augment": True, "uint8_images": True}
    (root / "mix.yaml").write_text(yaml.safe_dump(mix))
    val = {**mix, "tasks": [{"name": "nav", "shards": [str(root / "shards" / "nav")], "split": "val"}],
           "augment": False, "finite": True}
    (root / "val.yaml").write_text(yaml.safe_dump(val))
    train = {"model_config": str(root / "model.yaml"), "tokenizer": str(tokenizer_dir), "max_steps": 6, "lr": 1e-3,
             "vision_lr": 1e-3, "warmup_ratio": 0.2, "scheduler": "cosine_with_min_lr", "min_lr": 1e-4,
             "grad_accum": 2, "bf16": False, "gradient_checkpointing": True, "num_workers": 1, "log_every": 1,
             "save_every": 3, "keep_checkpoints": 2, "eval_shards": str(root / "val.yaml"), "eval_batches": 2}
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    return root


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-5000:])
    return result


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "eval" not in r}, rows


@pytest.mark.slow
def test_train_resume_exactly_export_and_eval(run_files, tmp_path):
    args = ["-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config", str(run_files / "train.yaml")]
    full = tmp_path / "full"
    out = run(*args, "--output-dir", str(full))
    assert "next-action accuracy" in out.stdout
    full_losses, rows = losses(full)
    assert sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    assert {"lr", "loss_per_task", "samples_per_s", "tokens_per_s", "data_wait_share"} <= set(rows[0])
    assert rows[0]["loss_per_task"]["nav"] == pytest.approx(rows[0]["loss"])
    assert any("eval" in r for r in rows)
    tags = sorted(p.name for p in (full / "checkpoints").glob("step-*"))
    assert tags == ["step-00000003", "step-00000006"]
    # an interrupted run: only the step-3 checkpoint exists; --resume continues exactly
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    run(*args, "--output-dir", str(resumed), "--resume")
    resumed_losses, _ = losses(resumed)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step
    # the export loads with from_pretrained and evaluates
    final = full / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    ev = run("-m", "streamvln.evaluate", "--checkpoint", str(final), "--shards", str(run_files / "val.yaml"),
             "--out", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["actions_scored"] > 0 and set(result["per_task"]) == {"nav"}
    assert set(result["per_action"]) <= {"FORWARD", "LEFT", "RIGHT", "STOP"}
    assert "majority baseline" in ev.stdout


@pytest.mark.slow
def test_two_process_torchrun_then_single_process_resume_is_refused(run_files, tmp_path):
    out = tmp_path / "dist"
    torchrun = Path(sys.executable).parent / "torchrun"
    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=3, save_every=3, eval_shards=None, num_workers=0)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29631",
                             str(ROOT / "tests" / "dist_check.py"), str(run_files / "mix.yaml"),
                             str(tmp_path / "train.yaml"), str(out)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "DIST-CHECK-OK" in result.stdout
    assert (out / "checkpoints" / "step-00000003").is_dir()
    _, rows = losses(out)  # metrics are summed over the ranks: 2 ranks x batch 2 x accumulation 2
    assert [r["samples"] for r in rows] == [8, 8, 8]
    refused = run("-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config",
                  str(tmp_path / "train.yaml"), "--output-dir", str(out), "--resume", check=False)
    assert refused.returncode != 0
    assert "world size 2, this run has 1" in refused.stderr


@pytest.mark.slow
def test_zero3_config_trains_and_exports(run_files, tmp_path):
    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=2, save_every=2, eval_shards=None, num_workers=0, gradient_checkpointing=False)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    run("-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
        "--deepspeed", "configs/deepspeed/zero3.json", "--output-dir", str(tmp_path / "z3"))
    from streamvln.model import StreamVLNForCausalLM

    model = StreamVLNForCausalLM.from_pretrained(tmp_path / "z3" / "final", local_files_only=True)
    assert all(p.numel() > 0 for p in model.parameters())  # gathered, not ZeRO-3 placeholders


def test_bad_train_config_and_checkpoint_are_clear_errors(run_files, tmp_path):
    from click.testing import CliRunner

    from streamvln.evaluate import main as evaluate_main
    from streamvln.train import main as train_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model_config: x.yaml\nlearning_rate: 0.1\n")
    result = CliRunner().invoke(train_main, ["--shards", str(run_files / "mix.yaml"), "--config", str(bad),
                                             "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1 and "unknown key(s) learning_rate" in result.output
    result = CliRunner().invoke(evaluate_main, ["--checkpoint", str(tmp_path), "--shards", str(run_files / "val.yaml")])
    assert result.exit_code == 1 and "is not a checkpoint directory (no config.json)" in result.output
