"""Closed-loop evaluation: batched rollouts, baselines, result format, resume, a rerun of a finished evaluation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sim_helpers import nav_episode
from streamvln.agent.policies import ExpertPolicy, ForwardPolicy, RandomPolicy
from streamvln.agent.rollout import rollout
from streamvln.nav_eval import evaluate_cmd as nav_eval
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim

SMALL = SimConfig(width=32, height=24)


@pytest.fixture(scope="module")
def episodes_file(tmp_path_factory):
    eps, _ = generate_episodes(EpisodeGenConfig(split="val_unseen", scenes=2, per_scene=2, seed=1, r2r_per_path=1,
                                                rxr_per_path=0))
    path = tmp_path_factory.mktemp("eps") / "val_unseen.json.gz"
    write_episodes(path, eps)
    return path, eps


def results(policy_factory, eps, n_envs):
    sims = [MiniWorldSim(SMALL) for _ in range(n_envs)]
    try:
        out = {r.episode.episode_id: (r.metrics, r.actions) for r in rollout(sims, policy_factory(sims), eps)}
    finally:
        for s in sims:
            s.close()
    return out


def test_batched_rollouts_equal_one_environment_at_a_time(episodes_file):
    eps = episodes_file[1]
    for factory in (lambda sims: ExpertPolicy(sims), lambda sims: RandomPolicy(7), lambda sims: ForwardPolicy()):
        one, three = results(factory, eps, 1), results(factory, eps, 3)
        assert one == three and len(one) == len(eps)


def test_expert_is_the_upper_bound_and_forward_stops_at_the_first_wall(episodes_file):
    eps = episodes_file[1]
    expert = results(lambda sims: ExpertPolicy(sims), eps, 2)
    assert all(m["success"] == 1.0 and m["spl"] > 0.9 for m, _ in expert.values())
    forward = results(lambda sims: ForwardPolicy(), eps, 2)
    for m, actions in forward.values():
        assert actions[-1] == 0 and set(actions[:-1]) == {1} and m["collisions"] == 1


def test_refused_episodes_are_reported_not_fatal():
    sims = [MiniWorldSim(SMALL)]
    bad = nav_episode("nowhere", (0, 0), (1, 0))
    out = list(rollout(sims, ForwardPolicy(), [bad]))
    sims[0].close()
    assert len(out) == 1 and out[0].metrics is None and "unknown scene" in out[0].error


def test_cli_writes_results_resumes_and_reprints_a_finished_evaluation(episodes_file, tmp_path):
    path, eps = episodes_file
    out = tmp_path / "eval"
    args = ["--policy", "expert", "--episodes", str(path), "--output", str(out), "--width", "32", "--height", "24",
            "--num-envs", "2", "--maps"]
    r = CliRunner().invoke(nav_eval, args + ["--max-episodes", "2", "--videos"])
    assert r.exit_code == 0, r.output
    import cv2
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == 2
    cap = cv2.VideoCapture(str(videos[0]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) > 10 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 32
    rows = [json.loads(line) for line in (out / "result.jsonl").read_text().splitlines()]
    assert [row["episode_id"] for row in rows] == [0, 1]
    for row in rows:
        assert {"scene_id", "episode_id", "instruction", "success", "spl", "os", "ne", "ndtw", "sdtw", "steps",
                "collisions", "path", "actions"} <= set(row)
        assert len(row["path"][0]) == 3 and row["success"] == 1.0
    assert len(list((out / "maps").glob("*.png"))) == 2
    # the rest: the two finished episodes are not run again; a line cut by a kill is dropped, not glued to the next
    with open(out / "result.rank0.jsonl", "a") as f:
        f.write('{"scene_id": "val_unseen_0000", "epis')
    r = CliRunner().invoke(nav_eval, args)
    assert r.exit_code == 0, r.output
    lines = (out / "result.rank0.jsonl").read_text().splitlines()
    assert len(lines) == len(eps) and len({json.loads(x)["episode_id"] for x in lines}) == len(eps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_unseen"]["episodes"] == len(eps) and summary["val_unseen"]["success"] == 1.0
    # a rerun of a finished evaluation prints the summary and does not crash (the reference's second bug)
    r = CliRunner().invoke(nav_eval, args)
    assert r.exit_code == 0 and "SR" in r.output and f"{len(eps)} episodes" in r.output
    assert len((out / "result.rank0.jsonl").read_text().splitlines()) == len(eps)


@pytest.mark.slow
def test_torchrun_splits_episodes_over_ranks_and_rank0_gathers(episodes_file, tmp_path):
    import subprocess
    import sys

    path, eps = episodes_file
    out = tmp_path / "eval"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "streamvln.nav_eval",
                    "--policy", "forward", "--episodes", str(path), "--output", str(out), "--width", "16",
                    "--height", "12"], check=True, capture_output=True)
    per_rank = [[json.loads(x)["episode_id"] for x in (out / f"result.rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert per_rank == [[e.episode_id for e in eps[0::2]], [e.episode_id for e in eps[1::2]]]
    rows = [json.loads(x) for x in (out / "result.jsonl").read_text().splitlines()]
    assert [r["episode_id"] for r in rows] == [e.episode_id for e in eps]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_cli_loads_a_checkpoint_directory_and_runs_the_agent(episodes_file, tokenizer_dir, tmp_path):
    """A directory as streamvln-train exports it (config.json, weights, tokenizer): the model policy runs."""
    from pathlib import Path

    import torch
    import yaml

    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM

    root = Path(__file__).resolve().parent.parent
    torch.manual_seed(0)
    cfg = StreamVLNConfig(**yaml.safe_load((root / "configs/model/tiny.yaml").read_text()))
    ckpt = tmp_path / "ckpt"
    StreamVLNForCausalLM(cfg).save_pretrained(ckpt)
    load_tokenizer(tokenizer_dir).save_pretrained(ckpt)
    path, eps = episodes_file
    out = tmp_path / "eval"
    r = CliRunner().invoke(nav_eval, ["--checkpoint", str(ckpt), "--episodes", str(path), "--output", str(out),
                                      "--width", "32", "--height", "24", "--max-episodes", "2", "--num-envs", "2"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "result.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["steps"] >= 1 and row["actions"] for row in rows)
    # --max-new-tokens reaches the agent and the summary
    short = tmp_path / "short"
    r = CliRunner().invoke(nav_eval, ["--checkpoint", str(ckpt), "--episodes", str(path), "--output", str(short),
                                      "--width", "32", "--height", "24", "--max-episodes", "2",
                                      "--max-new-tokens", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((short / "summary.json").read_text())["max_new_tokens"] == 1
    r = CliRunner().invoke(nav_eval, ["--checkpoint", str(ckpt), "--episodes", str(path), "--output", str(short),
                                      "--max-new-tokens", "0"])
    assert r.exit_code == 2 and "--max-new-tokens" in r.output  # refused, not generated as one token
    assert json.loads((out / "summary.json").read_text())["max_new_tokens"] is None  # the agent's default
    from streamvln.nav_eval import build_policy
    assert build_policy("model", str(ckpt), [], 1, 0, {"max_new_tokens": 7}).agent.cfg.max_new_tokens == 7
    r = CliRunner().invoke(nav_eval, ["--episodes", str(path), "--output", str(out)])
    assert r.exit_code != 0 and "--checkpoint is needed" in r.output
