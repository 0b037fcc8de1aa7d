"""Training and control agree: a tiny VLA overfit on a handful of one-block demonstrations replays them in closed
loop, through the evaluation's own rollout (closed_loop.run_chains) and policy, to success.

The demonstrations are the scripted expert's, written by synth, sharded by `streamvln-shards calvin`'s code and
trained on by `streamvln-train`. The replay starts from the same initial states (the tabletop is deterministic), so
a policy that feeds the model what the shards fed it and executes what it predicts the way the data meant it
repeats the demonstrations action for action. It goes off the demonstrated path if the action normalisation or its
inverse, chunk execution, the camera order or the gripper sign differ between the shards and the policy
(docs/manip.md lists the breakages this test was checked against).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.calvin import read_split
from pipeline.config import CalvinShardConfig
from pipeline.manip import run_calvin
from pipeline.qwen_tokenizer import load_tokenizer
from streamvln.manip.closed_loop import Chain, TabletopSim, run_chains
from streamvln.manip.policy import VLAPolicy
from streamvln.manip.synth import SynthConfig, synthesize
from streamvln.manip.tabletop import TabletopConfig
from streamvln.manip.tasks import instruction
from streamvln.model.build import build_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
SIZE, W, N = 56, 1, 3
MODEL = dict(model_type="streamvln_vla", vocab_size=151648, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1,
             mm_vision_tower="tiny", mm_vision_select_layer=-1, mm_spatial_pool_stride=1,
             vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIZE, patch_size=14),
             window=W, chunk=N, head_hidden=128, lstm_layers=1, gripper_loss_weight=1.0)
PROMPT = "What action should the robot take to {instruction}?"


class Recorder:
    """The policy as the evaluation drives it, keeping the actions it returns per environment."""

    def __init__(self, policy):
        self.policy, self.needs_images, self.actions = policy, policy.needs_images, {}

    def reset(self, i, task, instruction):
        self.actions[i] = []
        self.policy.reset(i, task, instruction)

    def act(self, envs, obs, active):
        out = self.policy.act(envs, obs, active)
        for i, a in zip(active, out):
            self.actions[i].append(np.asarray(a, dtype=np.float64))
        return out


@pytest.mark.slow
def test_overfit_one_block_demonstrations_replay_to_success(tmp_path, tokenizer_dir):
    cfg = SynthConfig(episodes=1, val_episodes=0, seed=5, max_tasks=1, static_size=SIZE, gripper_size=SIZE,
                      rung="one-block")
    synthesize(tmp_path / "data", cfg, progress=False)
    # one instruction for every span, the one the evaluation gives: the text cannot tell the demonstrations apart
    # (synth draws a paraphrase per span); only the frames can
    ann_path = tmp_path / "data" / "training" / "lang_annotations" / "auto_lang_ann.npy"
    ann = np.load(ann_path, allow_pickle=True).item()  # written by this test's synth run a line above
    ann["language"]["ann"] = [instruction(t) for t in ann["language"]["task"]]
    np.save(ann_path, np.array(ann, dtype=object), allow_pickle=True)
    split = read_split(tmp_path / "data" / "training")
    demos = {}  # episode -> its relative actions, as the expert executed them
    for span in split.spans:
        ids = range(span.start, span.end + 1)
        demos[span.start // 1000] = np.stack([np.load(split.frame_path(i))["rel_actions"] for i in ids])
    run_calvin(tmp_path / "data" / "training", tmp_path / "shards",
               CalvinShardConfig(window=W, chunk=N, image_size=SIZE, samples_per_shard=64), tokenizer_dir,
               progress=False)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({
        "tasks": [{"name": "tabletop", "shards": [str(tmp_path / "shards" / "manip")]}], "batch_size": 8,
        "image_size": SIZE, "uint8_images": True, "augment": False}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model_config": str(tmp_path / "model.yaml"), "tokenizer": str(tokenizer_dir), "max_steps": 1500, "lr": 1e-3,
        "vision_lr": 1e-3, "warmup_ratio": 0.05, "scheduler": "cosine", "grad_accum": 1, "bf16": False,
        "gradient_checkpointing": False, "num_workers": 0, "log_every": 100, "save_every": 1000,
        "freeze_embeddings": True}))
    result = subprocess.run([sys.executable, "-m", "streamvln.train", "--shards", str(tmp_path / "mix.yaml"), "--config",
                             str(tmp_path / "train.yaml"), "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-5000:]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] < 0.02, f"the model did not overfit its demonstrations: loss {last['loss']:.4f}"

    # the replay: the evaluation's rollout from the demonstration's own initial state, executing the first action of
    # each chunk (RoboVLMs) and whole chunks
    model = build_model(None, str(tmp_path / "run" / "final"))
    seeds = {e: int(np.random.default_rng([cfg.seed, e]).integers(2**31)) for e in demos}  # synth's reset seeds
    chains = [Chain(e, seeds[e], ["lift_red_block"]) for e in sorted(demos)]
    for execute in ("first", "chunk"):
        policy = Recorder(VLAPolicy(model.eval(), load_tokenizer(str(tmp_path / "run" / "final")), PROMPT, SIZE, execute))
        results = run_chains(policy, chains, tmp_path / f"replay-{execute}.jsonl", num_envs=1, max_steps=150,
                             sim=TabletopSim(TabletopConfig(SIZE, SIZE, ("red",))), progress=False)
        assert [r["completed"] for r in results] == [1] * len(chains), (execute, results)
        for r in results:
            done, demo = np.stack(policy.actions[r["chain"]]), demos[r["chain"]]
            assert len(done) <= 1.5 * len(demo), (execute, len(done), len(demo))
            # the first steps move sideways and down at the expert's full rate (0.65): the same actions, to well under
            # what a skipped or doubled (de)normalisation changes (0.35)
            assert np.abs(demo[:3, :3]).min() > 0.6, demo[:3, :3]
            if execute == "first":  # (a chunk's later actions are predicted less closely)
                assert np.abs(done[:3, :3] - demo[:3, :3]).max() < 0.15, (done[:3, :3], demo[:3, :3])
