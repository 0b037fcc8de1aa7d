"""The trainer end to end on CPU: metrics, exact resume, a 2-process torchrun (gloo) run, export and eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def assert_close_losses(got, want, steps):
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_elastic_resume_two_ranks_to_one_and_one_to_two(run_files, tmp_path):
    """2 ranks x 2 and 1 rank x 4 are the same global batch: the same losses (the loss is normalised by the
    global batch's labelled tokens), and each resumes on the other's world size with the next losses and
    the final weights (Adam moments moved across world sizes) of the uninterrupted run."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29631"]
    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=4, save_every=2, eval_shards=None, num_workers=0, tokenizer=None)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    mix, train = str(run_files / "mix.yaml"), str(tmp_path / "train.yaml")
    args = ["--shards", mix, "--config", train]

    two = tmp_path / "two"  # 2 ranks x batch 2 x accumulation 2, with the cross-rank checks of dist_check.py
    result = subprocess.run([*torchrun, str(ROOT / "tests" / "dist_check.py"), mix, train, str(two)],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "DIST-CHECK-OK" in result.stdout
    two_losses, rows = losses(two)  # metrics are summed over the ranks
    assert [r["samples"] for r in rows] == [8, 8, 8, 8]
    one = tmp_path / "one"
    run("-m", "streamvln.train", *args, "--batch-size", "4", "--output-dir", str(one))
    one_losses, _ = losses(one)
    assert_close_losses(one_losses, two_losses, [1, 2, 3, 4])
    assert_close_weights(weights(one), weights(two))
    for source, target, ranks in ((two, tmp_path / "two_to_one", 1), (one, tmp_path / "one_to_two", 2)):
        (target / "checkpoints").mkdir(parents=True)
        shutil.copytree(source / "checkpoints" / "step-00000002", target / "checkpoints" / "step-00000002")
        if ranks == 1:
            run("-m", "streamvln.train", *args, "--batch-size", "4", "--output-dir", str(target), "--resume")
        else:
            result = subprocess.run([*torchrun, "-m", "streamvln.train", *args, "--output-dir", str(target),
                                     "--resume"], capture_output=True, text=True, env=ENV, cwd=ROOT)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        resumed, _ = losses(target)
        assert sorted(resumed) == [3, 4]
        assert_close_losses(resumed, two_losses, [3, 4])
        assert_close_weights(weights(target), weights(source))


@pytest.mark.slow
def test_resume_that_cannot_be_done_is_refused_with_the_reason(run_files, tmp_path):
    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=2, save_every=2, eval_shards=None, num_workers=0, tokenizer=None)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    args = ["-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
            "--output-dir", str(tmp_path / "run")]
    run(*args)
    other_mix = yaml.safe_load((run_files / "mix.yaml").read_text())
    other_mix["seed"] = 5
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(other_mix))
    refused = run(*args[:2], "--shards", str(tmp_path / "mix.yaml"), *args[4:], "--resume", "--max-steps", "3",
                  check=False)
    assert refused.returncode != 0 and "different mix (seed changed)" in refused.stderr


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


@pytest.mark.slow
def test_resume_with_another_global_batch_under_torchrun_sees_no_sample_twice(run_files, tmp_path):
    """2 ranks x 2 (global batch 4) for 2 steps, then 1 rank x 3 (global batch 3): in the order the samples
    were trained on, nothing repeats before the task's epoch is through (but for batch mode's dropped tail)."""
    from streamvln.data.shards import load_task

    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=2, save_every=2, eval_shards=None, num_workers=0, tokenizer=None, log_samples=True)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29633", "-m", "streamvln.train",
                             "--shards", str(run_files / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
                             "--output-dir", str(out)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run("-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
        "--output-dir", str(out), "--resume", "--batch-size", "3", "--max-steps", "6")

    def lines(rank):
        return [json.loads(line) for line in (out / f"samples.rank{rank}.jsonl").read_text().splitlines()]

    first = [(r0["step"], r0["micro"], r0["keys"] + r1["keys"]) for r0, r1 in zip(lines(0)[:4], lines(1))]
    assert [s for s, _, k in first] == [1, 1, 2, 2] and all(len(k) == 4 for _, _, k in first)
    resumed = [r for r in lines(0) if r["step"] > 2]
    assert [r["step"] for r in resumed] == [3, 3, 4, 4, 5, 5, 6, 6] and all(len(r["keys"]) == 3 for r in resumed)
    order = [k for _, _, keys in first for k in keys] + [k for r in resumed for k in r["keys"]]
    n = len(load_task("nav", [str(run_files / "shards" / "nav")], "train"))
    tail = max(n % 4, n % 3)  # batch mode drops each epoch's last partial global batch
    repeat = next((i for i, k in enumerate(order) if k in order[:i]), len(order))
    assert len(order) > n and n - tail <= repeat <= n, (repeat, n, len(order))


@pytest.mark.slow
def test_small_model_options_restrict_the_head_and_freeze_the_embedding(run_files, tmp_path):
    """output_vocab: labels puts exactly the mix's label ids into the exported config; freeze_embeddings leaves
    the (tied) embedding at its initial values while the rest trains; a restricted checkpoint trained on
    without the option is refused, saying why."""
    from streamvln.data import load_mix
    from streamvln.data.loader import MixPlan
    from streamvln.data.shards import SampleReader
    from streamvln.model.build import build_model

    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=3, eval_shards=None, output_vocab="labels", freeze_embeddings=True, save_every=100)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    mix = ["--shards", str(run_files / "mix.yaml")]
    out = run("-m", "streamvln.train", *mix, "--config", str(tmp_path / "train.yaml"), "--output-dir", str(tmp_path / "run"))
    exported = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["output_vocab"]
    plan = MixPlan(load_mix(str(run_files / "mix.yaml")), 0, 1)
    labels, reader = set(), SampleReader()
    for data in plan.tasks:
        for row in range(len(data)):
            s = reader.read(data.shard_paths[data.shard[row]], int(data.offset[row]), int(data.size[row]),
                            str(data.keys[row]))
            labels |= {int(t) for t in s["labels"] if t >= 0}
    assert exported == sorted(labels) and f"predicts {len(labels)} token ids" in out.stdout
    torch.manual_seed(cfg.get("seed", 0))  # the trainer seeds, then builds the model first
    initial = build_model(cfg["model_config"], None).state_dict()
    trained = weights(tmp_path / "run")
    assert torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    cfg.update(model_config=None, checkpoint=str(tmp_path / "run" / "final"), output_vocab="full")
    (tmp_path / "on.yaml").write_text(yaml.safe_dump(cfg))
    refused = run("-m", "streamvln.train", *mix, "--config", str(tmp_path / "on.yaml"), "--output-dir", str(tmp_path / "on"),
                  check=False)
    assert refused.returncode != 0 and "train it on with `output_vocab: labels`" in refused.stderr


@pytest.mark.slow
def test_two_runs_give_identical_weights_and_losses(run_files, tmp_path):
    """The same configs, data and seed: byte-identical weights and the same logged losses (make demo's numbers
    do not change between two runs on one machine; docs/results.md, "Reproducibility")."""
    cfg = yaml.safe_load((run_files / "train.yaml").read_text())
    cfg.update(max_steps=4, eval_shards=None, save_every=100, num_workers=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("a", "b"):
        run("-m", "streamvln.train", "--shards", str(run_files / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
            "--output-dir", str(tmp_path / name))
    assert (tmp_path / "a/final/model.safetensors").read_bytes() == (tmp_path / "b/final/model.safetensors").read_bytes()
    assert losses(tmp_path / "a")[0] == losses(tmp_path / "b")[0]


def test_output_vocab_is_refused_for_the_vla_model():
    """The VLA model's loss is on its action head: restricting its LM head would be silently meaningless."""
    from streamvln.config import ConfigError, TrainConfig
    from streamvln.model.build import build_model
    from streamvln.train import apply_small_model_options

    vla = build_model(str(ROOT / "configs/model/tiny_vla.yaml"), None)
    with pytest.raises(ConfigError, match="not the VLA model"):
        apply_small_model_options(vla, TrainConfig(model_config="x", output_vocab="labels"), None, 0)
