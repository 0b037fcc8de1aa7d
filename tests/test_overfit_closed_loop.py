"""Training and inference agree: a tiny model overfit on a handful of room-tier expert episodes drives the same
episodes closed loop, through the streaming agent, to their goals.

The four episodes share one instruction, and each is sharded under several seeds, so the conjunction phrases
("you can see", ...) that shards and agent both draw at random carry no information: only the frames (current
and memory) tell the episodes apart. Teacher-forced training sees exactly the shards' frames, prompt, memory and
answers; greedy decoding then reproduces the expert's walks only if the agent builds the same prompt,
preprocesses frames the same way, attaches the same memory frames and parses the answers the same way. A
mismatch sends it off the demonstrated path, onto frames it never saw (docs/training.md lists the breakages
this test was checked against).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline.config import NavShardConfig
from pipeline.nav import run_nav
from pipeline.reader import read_source
from streamvln.agent.policies import AgentPolicy
from streamvln.agent.rollout import rollout
from streamvln.agent.streaming import load_agent
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim
from streamvln.sim.trajectories import TrajectoryConfig, write_trajectories

ROOT = Path(__file__).resolve().parent.parent
SHARDS = NavShardConfig(image_size=56, num_frames=8, num_history=4, samples_per_shard=8)
SEEDS = 6  # shardings of the same episodes: the conjunction draws differ, the frames and answers do not
INSTRUCTION = "Walk to the object and stop next to it."
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
MODEL = dict(vocab_size=151648, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1, mm_vision_tower="tiny",
             mm_vision_select_layer=-1,
             vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14))


def run(*args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-5000:])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("describe", [False, True], ids=["actions", "described"])
def test_overfit_room_episodes_replay_to_their_goals_in_closed_loop(tmp_path, tokenizer_dir, describe):
    """`described`: trajectories and shards with the describing option, so each answer says what its frame shows
    before its actions; the agent must let the model finish its sentence (max_new_tokens) and read the actions."""
    eps, _ = generate_episodes(EpisodeGenConfig(split="train", tier="room", scenes=4, per_scene=1, seed=3))
    for ep in eps:  # one instruction for all: the text cannot tell the episodes apart
        ep.instruction = {**ep.instruction, "instruction_text": INSTRUCTION}
    write_episodes(tmp_path / "train.json.gz", eps)
    write_trajectories(tmp_path / "train.json.gz", tmp_path / "SimRoom",
                       TrajectoryConfig(sim=SimConfig(width=64, height=48), describe=describe))
    # 8-step windows with 4 memory frames: every episode crosses windows, so memory openings are exercised
    folders = []
    for seed in range(SEEDS):
        run_nav([tmp_path / "SimRoom"], tmp_path / f"shards{seed}", replace(SHARDS, seed=seed, describe=describe),
                tokenizer_dir, progress=False)
        folders.append(str(tmp_path / f"shards{seed}" / "nav"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({
        "tasks": [{"name": "nav", "shards": folders}], "batch_size": 8, "image_size": 56, "augment": False,
        "uint8_images": True}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model_config": str(tmp_path / "model.yaml"), "tokenizer": str(tokenizer_dir), "max_steps": 400,
        "lr": 3e-3, "vision_lr": 3e-3, "warmup_ratio": 0.05, "scheduler": "cosine", "grad_accum": 1, "bf16": False,
        "gradient_checkpointing": False, "num_workers": 0, "log_every": 100, "save_every": 1000,
        "output_vocab": "labels", "freeze_embeddings": True}))
    run("-m", "streamvln.train", "--shards", str(tmp_path / "mix.yaml"), "--config", str(tmp_path / "train.yaml"),
        "--output-dir", str(tmp_path / "run"))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] < 0.05, f"the model did not overfit its {len(eps)} episodes: loss {last['loss']:.3f}"

    # closed loop through the agent (its own conjunction draws) and the batched rollout, nav-eval's path
    sources, _ = read_source(tmp_path / "SimRoom")
    agent = load_agent(str(tmp_path / "run" / "final"), num_envs=2,
                       overrides={"num_frames": SHARDS.num_frames, "num_history": SHARDS.num_history,
                                  "max_new_tokens": 48 if describe else None})
    sims = [MiniWorldSim(SimConfig(width=64, height=48)) for _ in range(2)]
    try:
        results = {str(r.episode.trajectory_id): r for r in rollout(sims, AgentPolicy(agent), eps)}
    finally:
        for sim in sims:
            sim.close()
    failures = {k: (round(r.metrics["navigation_error"], 2), r.actions) for k, r in results.items()
                if r.metrics["success"] != 1.0}
    assert not failures, f"overfit episodes not reached in closed loop: {failures}"
    # and it walked the demonstrations themselves, action for action (the shards end each with STOP)
    for e in sources:
        assert results[e.episode_id].actions == list(e.actions[1:]) + [0], e.episode_id
    assert min(len(r.actions) for r in results.values()) > SHARDS.num_frames  # every one crossed a window
    if describe:  # each environment's last answer: a taught line about its frame, then actions ending in STOP
        lines = {line for e in sources for line in e.descriptions}
        for env in agent.envs:
            said, actions = env.last_text.removeprefix("In view: ").rsplit(". ", 1)
            assert said + "." in lines and actions.removesuffix("<|im_end|>").endswith("STOP"), env.last_text
