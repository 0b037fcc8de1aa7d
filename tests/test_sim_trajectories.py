"""Expert trajectories: the exact StreamVLN format, read unchanged by the nav shards; rejects, resume, determinism, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.reader import list_frames, read_source
from sim_helpers import nav_episode
from streamvln.sim.base import SimConfig
from streamvln.sim.cli import main as sim_cli
from streamvln.sim.episodes import EpisodeGenConfig, generate_episodes, write_episodes
from streamvln.sim.trajectories import TrajectoryConfig, write_trajectories

CFG = TrajectoryConfig(sim=SimConfig(width=48, height=36))


@pytest.fixture(scope="module")
def episodes_file(tmp_path_factory):
    eps, _ = generate_episodes(EpisodeGenConfig(scenes=2, per_scene=2, seed=0, r2r_per_path=1, rxr_per_path=1))
    bad = [nav_episode("train_0000", (-100.0, -100.0), (0.0, 0.0), episode_id=100, trajectory_id=100),
           nav_episode("nowhere_1", (0.0, 0.0), (1.0, 0.0), episode_id=101, trajectory_id=101)]
    path = tmp_path_factory.mktemp("eps") / "train.json.gz"
    write_episodes(path, eps + bad)
    return path, eps


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def written(episodes_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "SimR2R"
    manifest = write_trajectories(episodes_file[0], out, CFG)
    return out, manifest


def test_format_and_counts(written, episodes_file):
    out, m = written
    eps = episodes_file[1]
    assert m["trajectories"] == 6 and m["written"] == 4 and m["rejected"] == 2
    assert m["written"] + m["rejected"] == m["trajectories"] and m["episodes"] == len(eps) + 2
    assert m["rejects_by_reason"] == {"start inside an obstacle": 1, "unknown scene": 1}
    assert m["expert_success"] == 1.0
    annotations = json.loads((out / "annotations.json").read_text())
    assert [a["id"] for a in annotations] == [0, 1, 2, 3]
    for a in annotations:
        group = [e for e in eps if e.trajectory_id == a["id"]]
        assert a["instructions"] == [e.instruction_text for e in group]
        assert a["video"] == f"images/{group[0].scene_id}_simr2r_{a['id']:06d}"
        frames = sorted(p.name for p in (out / a["video"] / "rgb").iterdir())
        assert frames[0] == "001.jpg" and len(frames) == len(a["actions"])  # one frame per action entry
        assert a["actions"][0] == -1 and set(a["actions"][1:]) <= {1, 2, 3}  # the final STOP is not stored
        assert "descriptions" not in a  # the reference's keys only, unless asked
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["trajectory_id"] for r in rejects] == [100, 101] and all(r["reason"] for r in rejects)


def test_nav_shard_reader_reads_it_unchanged(written):
    out, _ = written
    episodes, rejects = read_source(out)
    assert len(episodes) == 4 and rejects == []
    assert all(len(list_frames(e)) == len(e.actions) for e in episodes)


def test_rerun_resumes_after_a_kill_and_gives_identical_bytes(written, episodes_file, tmp_path):
    out, _ = written
    copy = tmp_path / "SimR2R"
    shutil.copytree(out, copy)
    # a run killed while writing video 2: its frames half written under the temporary name, no record
    video = json.loads((copy / "annotations.json").read_text())[2]["video"]
    (copy / ".done" / (video.split("/")[-1] + ".json")).unlink()
    shutil.move(copy / video, copy / (video + ".tmp"))
    (copy / (video + ".tmp") / "rgb" / "003.jpg").unlink()
    (copy / "annotations.json").unlink()
    m = write_trajectories(episodes_file[0], copy, CFG)
    assert m["written"] == 4 and not (copy / (video + ".tmp")).exists()
    assert tree_bytes(copy) == tree_bytes(out)


@pytest.mark.slow
def test_two_workers_give_the_same_bytes(written, episodes_file, tmp_path):
    out, _ = written
    cfg = TrajectoryConfig(sim=SimConfig(width=48, height=36), workers=2)
    write_trajectories(episodes_file[0], tmp_path / "SimR2R", cfg)
    assert tree_bytes(tmp_path / "SimR2R") == tree_bytes(out)


def test_over_long_episodes_are_rejected_with_the_reason(episodes_file, tmp_path):
    cfg = TrajectoryConfig(sim=SimConfig(width=16, height=16), max_actions=20)
    m = write_trajectories(episodes_file[0], tmp_path / "SimR2R", cfg)
    assert m["rejects_by_reason"]["too many actions"] == 4 and m["written"] == 0


def test_cli_episodes_trajectories_show_inspect(tmp_path):
    runner = CliRunner()
    r = runner.invoke(sim_cli, ["episodes", "--out", str(tmp_path / "eps"), "--split", "val_unseen", "--scenes", "1",
                                "--per-scene", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "3 episodes, 1 paths, 1 scenes" in r.output
    eps = tmp_path / "eps" / "val_unseen.json.gz"
    r = runner.invoke(sim_cli, ["trajectories", "--episodes", str(eps), "--out", str(tmp_path / "t" / "SimR2R"),
                                "--width", "32", "--height", "24"])
    assert r.exit_code == 0, r.output
    assert "1 trajectories (3 episodes) = 1 written + 0 rejected" in r.output
    r = runner.invoke(sim_cli, ["show", "--episodes", str(eps), "--episode", "0", "--out", str(tmp_path / "ep.png"),
                                "--walk"])
    assert r.exit_code == 0, r.output
    import cv2
    img = cv2.imread(str(tmp_path / "ep.png"))
    assert img.shape[0] > 200 and img.shape[1] > 400
    green = ((img[..., 1] == 160) & (img[..., 0] == 40) & (img[..., 2] == 40)).sum()  # the reference path
    assert green > 50
    r = runner.invoke(sim_cli, ["inspect", "--episodes", str(eps), "--jsonl", str(tmp_path / "e.jsonl")])
    assert r.exit_code == 0 and "3 episodes, 1 trajectories, 1 scenes" in r.output
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3
    r = runner.invoke(sim_cli, ["inspect", "--episodes", str(tmp_path / "missing.json.gz")])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.slow
def test_sigkilled_two_worker_run_resumes_to_identical_bytes(written, episodes_file, tmp_path):
    """A real kill of the CLI (whole process group) mid-run; the rerun finishes without redoing committed videos."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "SimR2R"
    cmd = [sys.executable, "-m", "streamvln.sim.cli", "trajectories", "--episodes", str(episodes_file[0]),
           "--out", str(out), "--width", "48", "--height", "36", "--workers", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".done").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = {p.name: p.stat().st_mtime_ns for p in (out / ".done").glob("*.json")}
    assert 2 <= len(committed) < 6 and not (out / "annotations.json").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".done").glob("*.json") if p.name in committed} == committed
    assert tree_bytes(out) == tree_bytes(written[0])


def test_a_second_run_in_the_same_process_uses_its_own_camera(episodes_file, tmp_path):
    from PIL import Image

    small = TrajectoryConfig(sim=SimConfig(width=16, height=12))
    write_trajectories(episodes_file[0], tmp_path / "a" / "SimR2R", small)
    write_trajectories(episodes_file[0], tmp_path / "b" / "SimR2R", CFG)  # 48x36, same process
    for run, size in (("a", (16, 12)), ("b", (48, 36))):
        video = json.loads((tmp_path / run / "SimR2R" / "annotations.json").read_text())[0]["video"]
        assert Image.open(tmp_path / run / "SimR2R" / video / "rgb" / "001.jpg").size == size


def test_search_turn_turns_one_way_until_the_goal_is_in_view():
    """The option beyond the reference: LEFT until the goal's bearing is within search_view of straight ahead
    (exactly as many turns as the start heading needs), then the geodesic expert to the goal."""
    import math

    from streamvln.sim.base import LEFT, bearing, wrap
    from streamvln.sim.miniworld_sim import MiniWorldSim
    from streamvln.sim.trajectories import walk

    eps, _ = generate_episodes(EpisodeGenConfig(tier="room", scenes=3, per_scene=2, seed=0))
    from dataclasses import replace

    from pipeline.config import load_config

    root = Path(__file__).resolve().parent.parent
    shipped = load_config(TrajectoryConfig, root / "configs/sim/trajectories_search.yaml", {})
    assert (shipped.search_turn, shipped.search_view) == ("left", 20.0)
    search = replace(shipped, sim=CFG.sim)
    needed, differs = [], []
    with MiniWorldSim(CFG.sim) as sim:
        for ep in eps:
            goal, start = ep.goal_position, ep.start_position
            k = next(k for k in range(25) if abs(wrap(bearing((start[0], start[2]), (goal[0], goal[2]))
                                                      - ep.start_heading - math.radians(15.0) * k)) <= math.radians(20))
            frames, actions, metrics = walk(sim, ep, search)
            assert actions[:k] == [LEFT] * k and len(frames) == len(actions) + 1
            assert metrics["success"] == 1.0
            _, plain, _ = walk(sim, ep, CFG)
            differs.append(plain != actions)
            needed.append(k)
    assert max(needed) >= 4 and min(needed) < max(needed)
    assert any(differs)  # the geodesic expert alone turns toward the goal, either way: it does not search
    with pytest.raises(ValueError, match="search_turn"):
        TrajectoryConfig(search_turn="up").validate()


def test_describe_writes_what_each_frame_shows(tmp_path):
    """`describe: true` (beyond the reference): one description per frame, of the pose that frame was seen
    from; the walk ends beside the goal, so the last frame names it; the nav shards' reader keeps them."""
    from dataclasses import replace

    from streamvln.sim.miniworld_sim import MiniWorldSim
    from streamvln.sim.tiers import build_scene
    from streamvln.sim.trajectories import walk
    from streamvln.sim.views import in_view

    eps, _ = generate_episodes(EpisodeGenConfig(tier="room", scenes=3, per_scene=1, seed=0))
    write_episodes(tmp_path / "room.json.gz", eps)
    cfg = replace(CFG, describe=True)
    write_trajectories(tmp_path / "room.json.gz", tmp_path / "SimRoom", cfg)
    annotations = json.loads((tmp_path / "SimRoom" / "annotations.json").read_text())
    assert len(annotations) == len(eps)
    with MiniWorldSim(CFG.sim) as sim:
        for a, ep in zip(annotations, eps):
            assert len(a["descriptions"]) == len(a["actions"])
            poses = []
            walk(sim, ep, cfg, poses)
            spec = build_scene(ep.scene_id)
            assert a["descriptions"] == [in_view(spec, (x, z), h, 79.0, cfg.describe_ahead) for x, z, h in poses]
            goal = next(o for o in spec.objects if o.name in ep.instruction_text)
            assert goal.name in a["descriptions"][-1]  # in view at the end (not always straight ahead)
    episodes, rejects = read_source(tmp_path / "SimRoom")
    assert rejects == [] and [list(e.descriptions) for e in episodes] == [a["descriptions"] for a in annotations]
    with pytest.raises(ValueError, match="describe_ahead"):
        TrajectoryConfig(describe_ahead=45.0).validate()
