"""Manipulation: CALVIN shards (hand-written split), the VLA model's heads, losses and history types, training with
streamvln-train, offline and closed-loop evaluation, the pybullet tabletop, its expert and the synth writer."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.calvin import ActionTokenizer
from pipeline.config import CalvinShardConfig
from pipeline.manip import run_calvin
from pipeline.shard_writer import read_sample_bytes
from streamvln.data import build_loader
from streamvln.data.config import MixConfig, TaskMix
from streamvln.model.build import build_model
from test_calvin import write_calvin

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY_VLA = dict(model_type="streamvln_vla", vocab_size=151648, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                mm_vision_tower="tiny", mm_vision_select_layer=-1,
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14),
                window=3, chunk=3, head_hidden=32, lstm_layers=2, gpt_layers=2, gpt_heads=2)
W, N = 3, 3


def shard_cfg(**kw) -> CalvinShardConfig:
    return CalvinShardConfig(**{"window": W, "chunk": N, "image_size": 28, "samples_per_shard": 4, **kw})


def members(folder: Path, key: str) -> dict:
    import pyarrow.parquet as pq

    row = pq.read_table(folder / "index.parquet", filters=[("key", "==", key)]).to_pylist()[0]
    return read_sample_bytes(folder / row["shard"], row["offset"], row["size"])


@pytest.fixture(scope="module")
def manip_shards(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("manip")
    split = write_calvin(root / "calvin" / "training")
    summary = run_calvin(split, root / "shards", shard_cfg(), tokenizer_dir, progress=False)
    return root, summary


def test_calvin_shards_windows_chunks_masks_and_values_worked_out(manip_shards):
    root, summary = manip_shards
    folder = root / "shards" / "manip"
    # spans (2, 12) and (15, 20) with W = 3: starts 2..9 and 15..17 -> 8 + 3 samples
    assert summary["manifest"]["counts"]["samples_written"] == 11
    key = "calvin-span000001-0000017"  # the last window of span (15, 20): frames 17, 18, 19
    m = members(folder, key)
    meta = json.loads(m["json"])
    actions = np.load(io.BytesIO(m["actions.npy"]), allow_pickle=False)
    mask = np.load(io.BytesIO(m["action_mask.npy"]), allow_pickle=False).astype(bool)
    assert meta["frame_ids"] == [17, 18, 19] and meta["span"] == [15, 20] and meta["manip_task"] == "task_1"
    assert actions.shape == (W, N, 7) and actions.dtype == np.float32
    # step t holds the actions of frames 17+t..19+t; frame 21 is past the span: frame 20 repeated, masked.
    # The span's last frame (20) is valid (RoboVLMs' reader masks it: the fixed off-by-one).
    assert mask.tolist() == [[True, True, True], [True, True, True], [True, True, False]]
    frames = np.array([[17, 18, 19], [18, 19, 20], [19, 20, 20]])
    expected_x = 2 * (frames / 100 + 0.65) / 1.3 - 1  # clip to +-0.65, scale to [-1, 1]
    np.testing.assert_allclose(actions[..., 0], expected_x, atol=1e-6)
    np.testing.assert_allclose(actions[..., 2], 1.0)  # 0.7 clipped to 0.65 -> 1
    np.testing.assert_allclose(actions[..., 3], -1.0)
    np.testing.assert_allclose(actions[..., 4], 2 * (0.3 + 0.65) / 1.3 - 1, atol=1e-6)
    np.testing.assert_array_equal(actions[..., 6], frames % 2)  # odd frames open (+1 -> 1), even closed (-1 -> 0)
    ids = np.load(io.BytesIO(m["input_ids.npy"]), allow_pickle=False)
    assert meta["prompt"] == "What action should the robot take to do thing 1?" and len(ids) == meta["n_tokens"]
    # both cameras, each frame of a span stored once and referenced by its samples
    assert meta["n_frames"] == 2 * W and len(meta["frame_ranges"]) == 2 * W
    assert summary["manifest"]["per_source"]["calvin"]["samples_written"] == 11


def test_loader_batches_manip_samples(manip_shards):
    root, _ = manip_shards
    mix = MixConfig(tasks=[TaskMix(name="m", shards=[str(root / "shards" / "manip")])], image_size=28, batch_size=3,
                    uint8_images=True)
    batch = next(iter(build_loader(mix)))
    assert batch["actions"].shape == (3, W, N, 7) and batch["action_mask"].dtype == torch.bool
    assert batch["images"].shape == (3, 2 * W, 3, 28, 28) and len(batch["manip_tasks"]) == 3
    first_gray = batch["images"][:, 0].float().mean((1, 2, 3))  # frame f is filled with value f
    starts = [int(k.rsplit("-", 1)[1]) for k in batch["keys"]]
    assert torch.allclose(first_gray, torch.tensor(starts, dtype=torch.float32), atol=2)


def test_calvin_rejects_are_counted_with_reasons(tmp_path, tokenizer_dir):
    split = write_calvin(tmp_path / "training", frames=30, spans=((2, 12), (15, 16), (20, 27)))
    os.unlink(split / "episode_0000025.npz")
    summary = run_calvin(split, tmp_path / "shards", shard_cfg(exclude_tasks=["task_0"]), tokenizer_dir, progress=False)
    c = summary["manifest"]["counts"]
    assert (c["episodes_in"], c["episodes_written"], c["episodes_rejected"]) == (3, 0, 3)
    reasons = summary["manifest"]["rejects_by_reason"]
    assert set(reasons) == {"task excluded (exclude_tasks)", "span of 2 frames is too short for a window of 3",
                            "missing frame file episode_0000025.npz"}


def test_shards_are_deterministic_and_resume(tmp_path, tokenizer_dir):
    split = write_calvin(tmp_path / "training")
    a = run_calvin(split, tmp_path / "a", shard_cfg(), tokenizer_dir, progress=False)["manifest"]
    run_calvin(split, tmp_path / "b", shard_cfg(), tokenizer_dir, progress=False)
    (tmp_path / "b" / "manip" / "train-000001.stats.json").unlink()  # as if killed before this shard was done
    b = run_calvin(split, tmp_path / "b", shard_cfg(), tokenizer_dir, progress=False)["manifest"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_model_discretisation_matches_robovlms_tokenizer():
    model = build_model_from(TINY_VLA, head="discrete")
    tokenizer = ActionTokenizer(model.config.discrete_orig)
    a = torch.tensor([[-1.0, -0.999, -0.3, 0.0, 0.2, 0.9999, 1.0]])
    ids = model.discrete_ids(torch.cat([a[:, :6], torch.ones(1, 1)], -1))
    ref = a.numpy().copy()
    ref[0, 6] = 1.0  # the gripper's 1 (open) is +1: the top bin
    np.testing.assert_array_equal(ids.numpy(), tokenizer.encode(ref))
    decoded = model.decode_ids(ids)
    np.testing.assert_allclose(decoded[0, :6].numpy(), tokenizer.decode(ids[0, :6].numpy()), atol=1e-6)
    assert decoded[0, 6] == 1.0 and float((decoded[0, :6] - a[0, :6]).abs().max()) <= 1 / 255 + 1e-6


def test_discrete_orig_is_robovlms_for_the_qwen2_tokenizer(tok):
    from streamvln.model.vla import VLAConfig

    assert ActionTokenizer.for_tokenizer(tok).orig == VLAConfig().discrete_orig


def build_model_from(keys: dict, **overrides):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({**keys, **overrides}, f)
    torch.manual_seed(0)
    model = build_model(f.name, None)
    os.unlink(f.name)
    return model


@pytest.mark.parametrize("head", ["lstm", "fc", "gpt", "discrete"])
@pytest.mark.parametrize("history", ["one-step", "post", "pre"])
def test_heads_shapes_losses_and_a_training_step(manip_shards, head, history):
    root, _ = manip_shards
    mix = MixConfig(tasks=[TaskMix(name="m", shards=[str(root / "shards" / "manip")])], image_size=28, batch_size=2,
                    uint8_images=True)
    batch = next(iter(build_loader(mix)))
    model = build_model_from(TINY_VLA, head=head, history_type=history)
    out = model(**batch)
    assert out["pred_actions"].shape == (2, W, N, 7)
    assert torch.isfinite(out["loss"]) and out["sample_tokens"].sum() == model.count_targets(batch)
    torch.testing.assert_close(out["loss"], out["loss_sum"] / model.count_targets(batch))
    if head == "discrete":  # CE over 7 tokens per valid chunk position and eos per step, near log(vocab) at init
        assert 8 < float(out["loss"]) < 14
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        losses.append(loss.item())
        if head != "discrete":
            assert model.action_head.out.arm[0].weight.grad.abs().sum() > 0
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # through the backbone
        optimizer.step()
    assert losses[-1] < losses[0]
    model.eval()
    chunk = model.predict(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert chunk.shape == ((2, 1, 7) if head == "discrete" else (2, N, 7))


def test_continuous_loss_is_huber_plus_weighted_bce_over_the_mask():
    from streamvln.model.heads import continuous_loss

    arm = torch.zeros(1, 1, 2, 6)
    logits = torch.zeros(1, 1, 2)
    target = torch.tensor([[[[2.0, 0, 0, 0, 0, 0, 1.0], [0.5, 0, 0, 0, 0, 0, 0.0]]]])
    mask = torch.tensor([[[1.0, 0.0]]])
    per, _ = continuous_loss(arm, logits, target, mask, "huber", 0.01)
    # position 0: huber(2) = 1.5 over one of 6 dims -> 0.25; BCE(logit 0) = ln 2; position 1 masked
    assert per[0, 0, 0].item() == pytest.approx(1.5 / 6 + 0.01 * np.log(2), abs=1e-6) and per[0, 0, 1] == 0
    per, _ = continuous_loss(arm, logits, target, mask, "mse", 0.01)
    assert per[0, 0, 0].item() == pytest.approx(4 / 6 + 0.01 * np.log(2), abs=1e-6)


def test_post_features_cached_by_the_policy_equal_the_training_forward(manip_shards):
    """What the closed-loop policy computes step by step (cached ACT features, head over the window) is what
    training computes over the whole window."""
    root, _ = manip_shards
    mix = MixConfig(tasks=[TaskMix(name="m", shards=[str(root / "shards" / "manip")])], image_size=28, batch_size=2,
                    uint8_images=True)
    batch = next(iter(build_loader(mix)))
    model = build_model_from(TINY_VLA, head="gpt").eval()
    with torch.no_grad():
        full = model(**batch)["pred_actions"][:, -1]
        images = batch["images"]
        feats = [model.step_feature(images[:, [t, W + t]], batch["input_ids"], batch["attention_mask"]) for t in range(W)]
        step = model.predict_from_features(torch.stack(feats, 1))
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def train_run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamvln.train", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)


def test_train_with_streamvln_train_export_resume_and_offline_eval(manip_shards, tmp_path, tokenizer_dir):
    root, _ = manip_shards
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TINY_VLA))
    mix = {"tasks": [{"name": "tabletop", "shards": [str(root / "shards" / "manip")]}], "batch_size": 2,
           "image_size": 28, "uint8_images": True}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    (tmp_path / "val.yaml").write_text(yaml.safe_dump({**mix, "finite": True}))
    train = {"model_config": str(tmp_path / "model.yaml"), "tokenizer": str(tokenizer_dir), "max_steps": 3, "lr": 1e-3,
             "grad_accum": 1, "bf16": False, "gradient_checkpointing": False, "num_workers": 0, "log_every": 1,
             "save_every": 2}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    common = ["--shards", str(tmp_path / "mix.yaml"), "--config", str(tmp_path / "train.yaml")]
    run = train_run([*common, "--output-dir", str(tmp_path / "run")])
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # an interrupted run: only the step-2 checkpoint exists; --resume gives the third step exactly
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000002",
                    tmp_path / "resumed" / "checkpoints" / "step-00000002")
    again = train_run([*common, "--output-dir", str(tmp_path / "resumed"), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3] and resumed[0]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("run", "resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    model = build_model(None, str(tmp_path / "run" / "final"))
    assert type(model).__name__ == "StreamVLNVLA" and model.config.head == "lstm"
    assert model.action_token.abs().sum() > 0  # trained, saved and loaded
    out = subprocess.run([sys.executable, "-m", "streamvln.evaluate", "--checkpoint", str(tmp_path / "run" / "final"),
                          "--shards", str(tmp_path / "val.yaml"), "--out", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())["manipulation"]
    assert set(result) == {"all", "task_0", "task_1"} and result["all"]["samples"] == 10  # 11 windows, batches of 2
    for key in ("arm_l1_first", "gripper_accuracy_first", "zero_action_arm_l1_first", "majority_gripper_accuracy"):
        assert 0 <= result["all"][key] <= 2


def test_mixing_manip_with_text_tasks_and_a_normalisation_mismatch_are_refused(manip_shards):
    from streamvln.train import check_manip_data

    root, _ = manip_shards
    model = build_model_from(TINY_VLA, action_normalization="q99", action_q01=[0] * 7, action_q99=[1] * 7)
    loader = build_loader(MixConfig(tasks=[TaskMix(name="m", shards=[str(root / "shards" / "manip")])],
                                    image_size=28, batch_size=2))
    with pytest.raises(ValueError, match="shards normalised with 'calvin', the model expects 'q99'"):
        check_manip_data(model.config, loader.plan.tasks)


# ---------------------------------------------------------------- the tabletop, its expert, synth and closed loop


def test_expert_solves_each_kind_of_task_in_closed_loop(tmp_path):
    from streamvln.manip.closed_loop import Chain, run_chains
    from streamvln.manip.policy import ExpertPolicy, ZeroPolicy

    chains = [Chain(0, 3, ["lift_red_block"]), Chain(1, 3, ["push_blue_block_right"]),
              Chain(2, 5, ["place_green_block_in_tray"])]
    results = run_chains(ExpertPolicy(), chains, tmp_path / "expert.jsonl", num_envs=2, progress=False)
    assert [r["completed"] for r in results] == [1, 1, 1]
    zero = run_chains(ZeroPolicy(), chains, tmp_path / "zero.jsonl", num_envs=3, max_steps=20, progress=False)
    assert [r["completed"] for r in zero] == [0, 0, 0]


def test_chain_summary_and_resume_after_a_kill(tmp_path):
    from streamvln.manip.closed_loop import Chain, read_results, run_chains, summarize
    from streamvln.manip.policy import ExpertPolicy

    results = [{"chain": 0, "tasks": ["lift_red_block", "place_red_block_in_tray"], "completed": 2},
               {"chain": 1, "tasks": ["push_red_block_left", "lift_blue_block"], "completed": 0},
               {"chain": 2, "tasks": ["push_red_block_left", "lift_blue_block"], "completed": 1}]
    s = summarize(results, "chains")
    assert s["chain_success"]["1"] == pytest.approx(2 / 3) and s["chain_success"]["2"] == pytest.approx(1 / 3)
    assert s["average_length"] == pytest.approx(1.0)
    assert s["per_task"]["push_red_block_left"] == {"success": 0.5, "attempts": 2}
    assert s["per_task"]["lift_blue_block"] == {"success": 0.0, "attempts": 1}  # chain 1 never reached it
    chains = [Chain(0, 3, ["push_blue_block_right"]), Chain(1, 4, ["lift_green_block"])]
    full = run_chains(ExpertPolicy(), chains, tmp_path / "a.jsonl", num_envs=1, progress=False)
    first = (tmp_path / "a.jsonl").read_text().splitlines()[0]
    (tmp_path / "b.jsonl").write_text(first + "\n" + '{"chain": 1, "se')  # killed while writing chain 1
    assert list(read_results(tmp_path / "b.jsonl")) == [0]
    assert run_chains(ExpertPolicy(), chains, tmp_path / "b.jsonl", num_envs=1, progress=False) == full


def test_vla_policy_acts_in_the_tabletop_first_action_and_chunk_execution(tmp_path, tok):
    from streamvln.manip.closed_loop import Chain, run_chains
    from streamvln.manip.policy import VLAPolicy

    for head, history, execute in (("lstm", "post", "first"), ("fc", "pre", "chunk"), ("discrete", "post", "first")):
        model = build_model_from(TINY_VLA, head=head, history_type=history)
        calls = []
        predict = model.predict_from_features if history != "pre" and head != "discrete" else model.predict
        name = "predict_from_features" if history != "pre" and head != "discrete" else "predict"
        setattr(model, name, lambda *a, _f=predict: calls.append(1) or _f(*a))
        policy = VLAPolicy(model, tok, "What action should the robot take to {instruction}?", 28, execute)
        results = run_chains(policy, [Chain(0, 1, ["lift_red_block"]), Chain(1, 2, ["push_red_block_left"])],
                             tmp_path / f"{head}-{history}.jsonl", num_envs=2, max_steps=6, progress=False)
        assert [r["completed"] for r in results] == [0, 0]  # an untrained model does nothing useful in 6 steps
        assert all(len(h) <= W for h in policy.history.values())
        # first: one model call per step for both envs together; chunk: a call every N steps
        assert len(calls) == (6 if execute == "first" else 6 // N)


@pytest.mark.slow
def test_synth_writes_calvin_format_deterministically_and_resumes(tmp_path, tokenizer_dir):
    from pipeline.calvin import read_split
    from streamvln.manip.synth import SynthConfig, synthesize

    cfg = SynthConfig(episodes=3, val_episodes=1, seed=3, max_tasks=2, static_size=32, gripper_size=24)
    a = synthesize(tmp_path / "a", cfg, progress=False)
    assert a["training"]["spans"] >= 2 and not a["training"]["expert_failures"]
    split = read_split(tmp_path / "a" / "training")
    frame = np.load(split.frame_path(split.spans[0].start), allow_pickle=False)
    assert frame["rgb_static"].shape == (32, 32, 3) and frame["rgb_gripper"].shape == (24, 24, 3)
    assert frame["robot_obs"].shape == (15,) and frame["scene_obs"].shape == (24,) and frame["rel_actions"].shape == (7,)
    assert np.abs(frame["rel_actions"][:6]).max() <= 0.65 and frame["rel_actions"][6] in (-1, 1)
    # two workers (episodes in other processes and orders), then a resume: the same bytes
    synthesize(tmp_path / "b", cfg, workers=2, progress=False)
    (tmp_path / "b" / "training" / ".done" / "000001.json").unlink()  # killed before episode 1 was marked done
    b = synthesize(tmp_path / "b", cfg, progress=False)
    assert b["written_now"] == 1
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    summary = run_calvin(tmp_path / "a" / "training", tmp_path / "shards", shard_cfg(image_size=28), tokenizer_dir,
                         progress=False)
    assert summary["manifest"]["counts"]["samples_written"] == sum(
        max(0, s.end + 1 - W - s.start) for s in split.spans)


def test_a_streamvln_checkpoint_loads_as_the_vla_backbone(tmp_path):
    keys = {k: v for k, v in TINY_VLA.items() if k not in ("model_type", "window", "chunk", "head_hidden",
                                                              "lstm_layers", "gpt_layers", "gpt_heads")}
    nav = build_model_from(keys)
    nav.save_pretrained(tmp_path / "nav", safe_serialization=True)
    vla = build_model(None, str(tmp_path / "nav"), vla={"window": W, "chunk": N, "head_hidden": 32, "lstm_layers": 1})
    assert type(vla).__name__ == "StreamVLNVLA" and vla.config.model_type == "streamvln_vla"
    nav_state = nav.state_dict()
    for name, value in vla.state_dict().items():
        if name.startswith(("action_head.", "action_token")):
            continue
        torch.testing.assert_close(value, nav_state[name], msg=name)
    assert vla.action_head.rnn.num_layers == 1
