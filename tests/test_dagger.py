"""DAgger collection: beta and chunks, each intervention rule in constructed situations, the save rule, the output format
through `streamvln-shards nav`, merging, resume after a kill, determinism, a 2-rank run."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from sim_helpers import nav_episode, two_rooms
from streamvln.agent.rollout import rollout
from streamvln.dagger.cli import main as dagger_cli
from streamvln.dagger.collect import merge
from streamvln.dagger.policy import DaggerConfig, DaggerPolicy, episode_rng, save_decision
from streamvln.sim.base import FORWARD, LEFT, RIGHT, STOP, SimConfig
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim

SMALL = SimConfig(width=32, height=24)
EAST, WEST = -math.pi / 2, math.pi / 2  # headings facing +x and -x


class ScriptedAgent:
    """The streaming agent's interface with given answers, for situations a test must construct exactly.

    `answer(turn)` is what the "model" says at its turn-th decision; frames seen are counted as the
    real agent records them (every step, whoever acts).
    """

    def __init__(self, answer):
        self.answer, self.queue, self.decisions, self.frames = answer, {}, {}, {}

    def reset(self, i, episode_id, instruction):
        self.queue[i], self.decisions[i], self.frames[i] = [], 0, 0

    def queued(self, i):
        return len(self.queue[i])

    def clear_queue(self, i):
        self.queue[i] = []

    def act(self, observations, active, decide):
        out = {}
        for i in active:
            self.frames[i] += 1
            if i in decide:
                if not self.queue[i]:
                    self.queue[i] = list(self.answer(self.decisions[i]))
                    self.decisions[i] += 1
                out[i] = self.queue[i].pop(0)
        return out


@pytest.fixture(scope="module")
def sim():
    with MiniWorldSim(SMALL) as s:
        s.register_scene(two_rooms())
        yield s


def run(sim, episode, answer, ref_actions=None, **cfg):
    agent = ScriptedAgent(answer)
    policy = DaggerPolicy(agent, [sim], DaggerConfig(**cfg), ref_actions)
    (result,) = list(rollout([sim], policy, [episode]))
    return result, result.info, agent


def first_expert_action(sim, episode, radius):
    sim.reset(episode)
    return sim.expert_action(episode.reference_path[1], radius)


def test_beta_is_p_to_the_iteration():
    assert DaggerConfig(p=0.0, iteration=3).beta == 0.0
    assert DaggerConfig(p=0.9, iteration=0).beta == 1.0  # the reference's argparse defaults: pure expert
    assert DaggerConfig(p=0.9, iteration=2).beta == pytest.approx(0.81)
    with pytest.raises(ValueError):
        DaggerConfig(p=1.5).validate()


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_chunks_go_to_the_expert_with_probability_beta(sim, p):
    """Each chunk start draws once from the episode's generator: expert chunks are 4 actions, model chunks its answer."""
    ep = nav_episode("hand_two_rooms", (1.0, 2.0), (3.6, 2.0), heading=EAST)
    never = {"max_errors": 10**6, "max_error_ratio": 1e9}  # no interventions: only the draws decide
    result, info, agent = run(sim, ep, lambda turn: [LEFT, RIGHT, LEFT, RIGHT], p=p, iteration=1, seed=3, **never)
    rng, expected = episode_rng(3, ep), ""
    while len(expected) < len(info["sources"]):
        expected += "eeee" if rng.random() < p else "mmmm"
    sources = info["sources"]
    body = sources[:-1] if info["force_episode_end"] else sources  # the end of the path: the expert's STOP
    assert body == expected[:len(body)]
    assert agent.decisions[0] == sum(expected[j] == "m" for j in range(0, len(sources), 4))
    assert info["model_steps"] == sources.count("m") and info["interventions"] == 0
    if p == 0.0:  # the model alone turns on the spot until the step limit
        assert set(sources) == {"m"} and len(sources) == SMALL.max_steps
    else:
        assert result.actions[-1] == STOP and result.metrics["success"] == 1.0
    if p == 1.0:
        assert agent.decisions[0] == 0 and set(sources) == {"e"}
    assert agent.frames[0] == len(result.actions)  # the model's memory sees every frame


def test_model_stop_far_from_the_goal_hands_over_to_the_expert(sim):
    ep = nav_episode("hand_two_rooms", (2.0, 3.0), (6.0, 3.0), heading=EAST,
                     reference=[[2.0, 0, 3.0], [4.0, 0, 1.0], [6.0, 0, 3.0]])
    expected = first_expert_action(sim, ep, 1.8)
    result, info, _ = run(sim, ep, lambda turn: [STOP])
    assert result.actions[0] == expected != STOP
    assert info["sources"][0] == "e" and info["interventions"] >= 1 and not info["model_success"]
    assert STOP not in result.actions[:-1] and result.actions[-1] == STOP and info["force_episode_end"]
    assert result.metrics["distance_to_goal"] <= 0.25


def test_model_stop_near_the_goal_is_overridden_not_an_intervention(sim):
    ep = nav_episode("hand_two_rooms", (1.0, 2.0), (3.0, 2.0), heading=EAST)  # 2 m away: within 3 m
    result, info, _ = run(sim, ep, lambda turn: [STOP])
    assert result.actions == [FORWARD] * 7 + [STOP]  # the expert's actions replace every STOP
    assert info["sources"] == "m" * 7 + "e" and info["interventions"] == 0 and info["model_success"]
    save, kind, _ = save_decision(DaggerConfig(), result.metrics, info["model_success"])
    assert not save and kind == "efficient model success"


def into_the_wall(turn):
    return [FORWARD]  # facing the wall 0.3 m away: every step is refused, the expert would turn


def test_more_than_12_errors_hand_over(sim):
    ep = nav_episode("hand_two_rooms", (0.3, 2.0), (3.5, 2.0), heading=WEST)
    result, info, _ = run(sim, ep, into_the_wall)  # 60 reference actions on one segment: the ratio allows 48
    assert info["sources"][:13] == "m" * 12 + "e" and info["interventions"] == 1
    assert result.actions[:12] == [FORWARD] * 12 and result.actions[12] in (LEFT, RIGHT)
    assert result.metrics["collisions"] == 12 and result.metrics["success"] == 1.0


def test_errors_over_the_ratio_of_reference_actions_per_segment_hand_over(sim):
    ep = nav_episode("hand_two_rooms", (0.3, 2.0), (3.5, 2.0), heading=WEST, episode_id=7, trajectory_id=70)
    result, info, _ = run(sim, ep, into_the_wall, ref_actions={"70": 5})  # 5 per segment: 5 errors > 0.8 x 5
    assert info["sources"][:5] == "mmmme" and info["interventions"] == 1 and info["ref_actions"] == 5
    tighter = DaggerConfig(max_errors=2)
    _, info, _ = run(sim, ep, into_the_wall, max_errors=tighter.max_errors)  # ratio off (60), cap 2: 3rd error
    assert info["sources"][:3] == "mme"


def test_saved_labels_are_the_executed_actions_or_the_experts(sim):
    from streamvln.dagger.collect import episode_row
    ep = nav_episode("hand_two_rooms", (0.3, 2.0), (3.5, 2.0), heading=WEST)
    result, info, _ = run(sim, ep, into_the_wall)
    n = len(result.actions)
    _, executed, _ = episode_row(result, DaggerConfig(save="all"), "x")
    assert executed["actions"] == [-1] + result.actions[:-1] and executed["actions"][1:13] == [FORWARD] * 12
    _, relabelled, _ = episode_row(result, DaggerConfig(save="all", labels="expert"), "x")
    # the 12 bumps into the wall are labelled with the expert's turn; from the intervention on, both agree
    assert set(relabelled["actions"][1:13]) <= {LEFT, RIGHT} and relabelled["actions"][13:] == executed["actions"][13:]
    assert len(relabelled["actions"]) == n and info["expert_actions"][-1] == STOP


def test_describe_saves_each_frames_description_from_the_rollouts_poses():
    """`describe` (beyond the reference): a saved episode gets one description per frame, of the pose the
    rollout recorded with that frame (keep_frames); the poses follow the actions taken (a LEFT adds 15 degrees)."""
    from streamvln.dagger.collect import episode_row
    from streamvln.sim.tiers import build_scene
    from streamvln.sim.views import in_view

    eps, _ = generate_episodes(EpisodeGenConfig(tier="room", scenes=2, per_scene=1, seed=0))
    with MiniWorldSim(SMALL) as room_sim:
        agent = ScriptedAgent(lambda turn: [LEFT, LEFT, FORWARD, FORWARD])
        policy = DaggerPolicy(agent, [room_sim], DaggerConfig(save="all", describe=True), None)
        (result,) = list(rollout([room_sim], policy, eps[:1], keep_frames=True))
    ep = eps[0]
    assert len(result.poses) == len(result.frames) == len(result.actions) + 1
    assert result.poses[0] == pytest.approx((ep.start_position[0], ep.start_position[2], ep.start_heading), abs=1e-4)
    for (x0, z0, h0), (x1, z1, h1), a in zip(result.poses, result.poses[1:], result.actions):
        if a == LEFT:
            assert (x1, z1) == (x0, z0) and math.degrees(h1 - h0) % 360 == pytest.approx(15.0, abs=1e-3)
    _, entry, _ = episode_row(result, DaggerConfig(save="all", describe=True), "x")
    spec = build_scene(ep.scene_id)
    assert entry["descriptions"] == [in_view(spec, (x, z), h, 79.0, 10.0) for x, z, h in result.poses[:-1]]
    assert len(entry["descriptions"]) == len(entry["actions"])
    _, plain, _ = episode_row(result, DaggerConfig(save="all"), "x")
    assert "descriptions" not in plain


def test_reaching_the_next_waypoint_ends_the_intervention(sim):
    ep = nav_episode("hand_two_rooms", (0.3, 2.0), (6.5, 1.0), heading=WEST,
                     reference=[[0.3, 0, 2.0], [2.2, 0, 2.0], [4.0, 0, 1.0], [6.5, 0, 1.0]])
    result, info, _ = run(sim, ep, into_the_wall)
    assert re.fullmatch(r"m{12}e+m+e+(m+e+)*", info["sources"]), info["sources"]
    assert info["interventions"] >= 2 and info["force_episode_end"] and result.metrics["success"] == 1.0


def metrics(d, pl, success=1.0):
    return {"distance_to_goal": d, "geodesic_start": 10.0, "path_length": 10.0 / pl, "success": success}


@pytest.mark.parametrize("d, pl, model_success, save, kind", [
    (0.3, 0.90, False, True, "corrected"),
    (0.3, 0.95, False, False, "corrected but efficient"),
    (0.3, 0.80, True, True, "inefficient"),
    (0.3, 0.90, True, False, "efficient model success"),
    (0.6, 0.50, False, False, "far from the goal"),
    (0.49, 0.849, True, True, "inefficient"),
])
def test_the_reference_save_rule(d, pl, model_success, save, kind):
    assert save_decision(DaggerConfig(), metrics(d, pl), model_success)[:2] == (save, kind)


def test_save_every_success_or_everything():
    assert save_decision(DaggerConfig(save="success"), metrics(2.0, 0.99), True)[0]
    assert not save_decision(DaggerConfig(save="success"), metrics(0.1, 0.5, success=0.0), False)[0]
    assert save_decision(DaggerConfig(save="all"), metrics(9.0, 0.1, success=0.0), True)[0]


def test_merge_sorts_by_id_and_keeps_the_first_entry_per_video(tmp_path):
    a = {"id": 5, "video": "images/s_x_000005", "instructions": ["a"], "actions": [-1, 1]}
    b = {"id": 2, "video": "images/s_x_000002", "instructions": ["b"], "actions": [-1]}
    dup = {**a, "instructions": ["later"]}
    (tmp_path / "annotations_0.json").write_text(json.dumps([a]))
    (tmp_path / "annotations_1.json").write_text(json.dumps([b, dup]))
    merge(tmp_path, [], {})
    merged = json.loads((tmp_path / "annotations.json").read_text())
    assert [e["id"] for e in merged] == [2, 5] and merged[1]["instructions"] == ["a"]


# ---- the CLI with a real (tiny, untrained) model ------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    from pathlib import Path

    import torch
    import yaml

    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.config import StreamVLNConfig
    from streamvln.model.modeling import StreamVLNForCausalLM

    root = tmp_path_factory.mktemp("dagger")
    torch.manual_seed(0)
    cfg = StreamVLNConfig(**yaml.safe_load((Path(__file__).resolve().parent.parent / "configs/model/tiny.yaml")
                                           .read_text()))
    StreamVLNForCausalLM(cfg).save_pretrained(root / "ckpt")
    load_tokenizer(tokenizer_dir).save_pretrained(root / "ckpt")
    # room-rung episodes: walks of 10-40 steps instead of R2R's 30-150 keep each of the collections below short
    eps, _ = generate_episodes(EpisodeGenConfig(split="train", tier="room", scenes=2, per_scene=2, seed=3))
    write_episodes(root / "train.json.gz", eps)
    return root, eps


def cli(world, out, *extra):
    root, _ = world
    args = ["--checkpoint", str(root / "ckpt"), "--episodes", str(root / "train.json.gz"), "--out", str(out),
            "--width", "32", "--height", "24", "--save", "all", "--quiet", *extra]
    r = CliRunner().invoke(dagger_cli, args)
    assert r.exit_code == 0, r.output
    return r


def folder(out):
    """Every byte a collection leaves that a user consumes: annotations and frames."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and (p.suffix == ".jpg" or p.name == "annotations.json")}
    return files


@pytest.fixture(scope="module")
def one(world, tmp_path_factory):
    """A whole collection: one process, one environment."""
    out = tmp_path_factory.mktemp("one") / "SimR2R"
    cli(world, out, "--num-envs", "1")
    return out


@pytest.mark.slow
def test_collection_format_resume_determinism_and_sharding(world, one, tmp_path, tokenizer_dir):
    root, eps = world
    # the StreamVLN trajectory format: one 0-indexed frame per action entry, -1 first, 0..3 after
    entries = json.loads((one / "annotations.json").read_text())
    assert [e["id"] for e in entries] == [ep.episode_id for ep in eps]
    for e, ep in zip(entries, eps):
        assert e["video"] == f"images/{ep.scene_id}_simr2r_{ep.episode_id:06d}"
        assert e["instructions"] == [ep.instruction_text]
        frames = sorted(p.name for p in (one / e["video"] / "rgb").iterdir())
        assert frames == [f"{n:03d}.jpg" for n in range(len(e["actions"]))]
        assert e["actions"][0] == -1 and set(e["actions"][1:]) <= {0, 1, 2, 3} and len(e["actions"]) > 5
    log = [json.loads(x) for x in (one / "log.rank0.jsonl").read_text().splitlines()]
    assert all(row["save"] and row["steps"] == len(row["entry"]["actions"]) for row in log)
    summary = json.loads((one / "summary.json").read_text())
    assert summary["saved"] == len(eps) and summary["frames"] == sum(len(e["actions"]) for e in entries)

    # two environments per process: the same bytes
    two = tmp_path / "two" / "SimR2R"
    cli(world, two, "--num-envs", "2")
    assert folder(two) == folder(one)

    # killed: one episode committed, a second one's frames half written and its log line cut
    killed = tmp_path / "killed" / "SimR2R"
    cli(world, killed, "--max-episodes", "1")
    with pytest.raises(AssertionError):
        cli(world, killed)  # another selection is a different collection: refused, not mixed
    lines = (killed / "log.rank0.jsonl").read_text()
    (killed / "log.rank0.jsonl").write_text(lines + lines[:40])
    (killed / "dagger_config.json").write_text((one / "dagger_config.json").read_text())
    tmp = killed / entries[1]["video"]
    (tmp.parent / (tmp.name + ".tmp") / "rgb").mkdir(parents=True)
    r = cli(world, killed)
    assert f"{len(eps) - 1} episodes to collect" in r.output
    assert folder(killed) == folder(one)
    assert not list((killed / "images").glob("*.tmp"))
    done = [json.loads(x) for x in (killed / "log.rank0.jsonl").read_text().splitlines()]  # the cut line is gone
    assert sorted(row["episode_id"] for row in done) == [ep.episode_id for ep in eps]  # no episode twice
    r = cli(world, killed)  # finished: nothing runs, the summary is printed again
    assert "episodes to collect" not in r.output and f"{len(eps)} done" in r.output

    # into training, unchanged: the nav shards hold every saved episode's actions
    from pipeline.config import NavShardConfig
    from pipeline.nav import run_nav
    summary = run_nav([one], tmp_path / "shards", NavShardConfig(image_size=32, samples_per_shard=8, split="dagger"),
                      tokenizer_dir, progress=False)
    manifest = json.loads((tmp_path / "shards" / "nav" / "manifest.json").read_text())
    counts = manifest["splits"]["dagger"]["counts"]
    assert counts["episodes_written"] == len(eps) and counts["samples_written"] >= len(eps), counts
    import tarfile
    chunks = {}
    for tar in sorted((tmp_path / "shards" / "nav").glob("dagger-*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(t.extractfile(member).read())
                    chunks.setdefault(meta["episode_id"], []).append((meta["start"], meta["actions"]))
    for e in entries:  # the training samples' actions are the executed ones: actions[1:] + [STOP], chunk by chunk
        got = [a for _, acts in sorted(chunks[str(e["id"])]) for a in acts]
        assert got == e["actions"][1:] + [0]


@pytest.mark.slow
def test_torchrun_splits_episodes_over_ranks_and_rank0_merges(world, one, tmp_path):
    import subprocess
    import sys

    root, eps = world
    out = tmp_path / "two_ranks" / "SimR2R"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "streamvln.dagger",
                    "--checkpoint", str(root / "ckpt"), "--episodes", str(root / "train.json.gz"), "--out", str(out),
                    "--width", "32", "--height", "24", "--save", "all", "--quiet"], check=True, capture_output=True)
    per_rank = [[json.loads(x)["episode_id"] for x in (out / f"log.rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert per_rank == [[e.episode_id for e in eps[0::2]], [e.episode_id for e in eps[1::2]]]
    assert [e["id"] for e in json.loads((out / "annotations_1.json").read_text())] == per_rank[1]
    assert folder(out) == folder(one)  # the same trajectories and frames as one process


@pytest.mark.slow
def test_a_real_kill_resumes_without_redoing_or_duplicating(world, one, tmp_path):
    """SIGKILL a running collection after its first committed episode; the rerun finishes to the same bytes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, eps = world
    out = tmp_path / "killed" / "SimR2R"
    cmd = [sys.executable, "-m", "streamvln.dagger", "--checkpoint", str(root / "ckpt"), "--episodes",
           str(root / "train.json.gz"), "--out", str(out), "--width", "32", "--height", "24", "--save", "all", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "log.rank0.jsonl", time.time() + 180
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from streamvln.sim.trajectories import read_log
    before = [row["episode_id"] for row in read_log(log)]  # a line the kill cut is not committed
    assert 1 <= len(before) < len(eps) and not (out / "annotations.json").exists()
    r = cli(world, out)
    assert f"{len(eps) - len(before)} episodes to collect" in r.output
    rows = [json.loads(x)["episode_id"] for x in log.read_text().splitlines()]
    assert sorted(rows) == sorted(ep.episode_id for ep in eps)  # each once
    assert folder(out) == folder(one)
