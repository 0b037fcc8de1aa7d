"""Expert trajectories in the exact StreamVLN on-disk format, as the reference's trajectory generation writes them.

The follower walks each path's reference waypoints (intermediate radius 0.5 m, the last 0.25 m);
frames go to images/<video>/rgb/001.jpg... (1-indexed), annotations.json holds {id, video,
instructions, actions: [-1, a1, ...]} with one frame per action entry (and, with `describe`, one description per
frame: docs/simulator.md). Episodes sharing a
trajectory_id (paraphrases of one path) become one video with all their instructions. A video's
frames are written under a temporary name and renamed when complete, then its record is
committed; a rerun skips committed videos and redoes anything else, so a killed run resumes and
the result does not depend on the number of workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .base import LEFT, RIGHT, STOP, SimConfig, SimulatorError, bearing, ground_pose, wrap
from .episodes import NavEpisode, read_episodes
from .views import DESCRIBE_AHEAD, in_view

MAX_ACTIONS = 498  # the reference skips longer episodes


@dataclass
class TrajectoryConfig:
    sim: SimConfig = field(default_factory=SimConfig)
    intermediate_radius: float = 0.5
    final_radius: float = 0.25
    max_actions: int = MAX_ACTIONS
    jpeg_quality: int = 75  # PIL's default, which the reference's writer uses
    workers: int = 1
    # Beyond the reference, off by default: before following the path, turn this way ("left" or "right") until
    # the goal lies within search_view degrees of straight ahead. The geodesic expert turns toward a goal it
    # cannot see, by privileged knowledge; a searching expert's turns depend only on what is in view.
    search_turn: str = "none"
    search_view: float = 20.0
    # Beyond the reference, off by default: annotations.json also gets "descriptions", one per frame, saying
    # which objects that frame shows and where ("red ball left, blue box ahead."); `streamvln-shards nav` with
    # `describe: true` makes each answer say it before its actions (docs/results.md: why).
    describe: bool = False
    describe_ahead: float = DESCRIBE_AHEAD  # degrees either side of the centre line that a description calls "ahead"

    def validate(self):
        self.sim.validate()
        if self.search_turn not in ("none", "left", "right"):
            raise ValueError(f"search_turn must be none, left or right, got {self.search_turn!r}")
        if not 0 < self.search_view < 180:
            raise ValueError("search_view must be in (0, 180) degrees")
        if not 0 <= self.describe_ahead < self.sim.hfov / 2:
            raise ValueError("describe_ahead must be in [0, hfov / 2) degrees")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")


@dataclass
class Task:
    trajectory_id: int | str
    video: str
    episodes: list[NavEpisode]


def video_name(scene_id: str, source: str, number) -> str:
    """images/<scene>_<dataset>_<id:06d>, the reference's video folder name."""
    number = str(number)
    return f"images/{scene_id}_{source.lower()}_{int(number):06d}" if number.isdigit() else \
        f"images/{scene_id}_{source.lower()}_{number}"


def plan(episodes: list[NavEpisode], source: str) -> list[Task]:
    """One task per trajectory_id, in order of first appearance."""
    groups: dict[str, list[NavEpisode]] = {}
    for ep in episodes:
        groups.setdefault(str(ep.trajectory_id), []).append(ep)
    return [Task(eps[0].trajectory_id, video_name(eps[0].scene_id, source, tid), eps) for tid, eps in groups.items()]


def write_video(final: Path, frames, quality: int, first: int) -> None:
    """Frames as <final>/rgb/NNN.jpg numbered from `first`, written under a temporary name, renamed when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rgb").mkdir(parents=True)
    for n, rgb in enumerate(frames, start=first):
        Image.fromarray(rgb).save(tmp / "rgb" / f"{n:03d}.jpg", quality=quality)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def walk(sim, episode: NavEpisode, cfg: TrajectoryConfig, poses: list | None = None):
    """Roll the follower along the reference path: (frames, actions without the final STOP, metrics).
    `poses`, when given, gets each frame's (x, z, heading)."""
    frames, actions, k = [], [], 0

    def see(obs):
        frames.append(obs.rgb)
        if poses is not None:
            poses.append(ground_pose(sim))

    see(sim.reset(episode))
    waypoints = [p for p in episode.reference_path[1:]] or [episode.goal_position]
    if cfg.search_turn != "none":
        turn, goal = (LEFT if cfg.search_turn == "left" else RIGHT), episode.goal_position
        for _ in range(int(math.ceil(360.0 / sim.config.turn_angle))):
            pos, heading = sim.agent_pose()
            if abs(wrap(bearing((pos[0], pos[2]), (goal[0], goal[2])) - heading)) <= math.radians(cfg.search_view):
                break
            actions.append(turn)
            see(sim.step(turn))
    while True:
        last = k == len(waypoints) - 1
        action = sim.expert_action(waypoints[k], cfg.final_radius if last else cfg.intermediate_radius)
        if action == STOP:
            if not last:
                k += 1
                continue
            break
        if sim.done:
            raise SimulatorError(f"the expert did not reach the goal within {sim.config.max_steps} steps",
                                 "expert did not reach the goal")
        actions.append(action)
        see(sim.step(action))
    sim.step(STOP)
    return frames, actions, sim.metrics()


_WORKER_SIM = None  # one simulator per process, kept across tasks (and across runs with the same config)


def _run(args) -> dict:
    """Worker: render and write one video, or say why not. Returns the committed record."""
    global _WORKER_SIM
    task, out, cfg = args
    if _WORKER_SIM is None or _WORKER_SIM.config != cfg.sim:
        from .miniworld_sim import MiniWorldSim
        if _WORKER_SIM is not None:
            _WORKER_SIM.close()
        _WORKER_SIM = MiniWorldSim(SimConfig(**asdict(cfg.sim)))
    ids = [ep.episode_id for ep in task.episodes]
    record = {"trajectory_id": task.trajectory_id, "video": task.video, "episode_ids": ids}
    poses = [] if cfg.describe else None
    try:
        frames, actions, metrics = walk(_WORKER_SIM, task.episodes[0], cfg, poses)
    except SimulatorError as e:
        return {**record, "reason": str(e), "kind": e.kind}
    if len(actions) > cfg.max_actions:
        return {**record, "reason": f"{len(actions)} actions, over the limit of {cfg.max_actions}",
                "kind": "too many actions"}
    write_video(Path(out) / task.video, frames, cfg.jpeg_quality, first=1)
    entry = {"id": task.trajectory_id, "video": task.video,
             "instructions": [ep.instruction_text for ep in task.episodes], "actions": [-1] + actions}
    if cfg.describe:
        spec, _ = _WORKER_SIM.scene(task.episodes[0].scene_id)
        entry["descriptions"] = [in_view(spec, (x, z), h, cfg.sim.hfov, cfg.describe_ahead, cfg.sim.camera_height)
                                 for x, z, h in poses]
    return {**record, "entry": entry, "frames": len(frames),
            "expert": {k: metrics[k] for k in ("success", "spl", "ndtw", "distance_to_goal", "collisions")}}


def _done_path(out: Path, video: str) -> Path:
    return out / ".done" / (Path(video).name + ".json")


def write_trajectories(episodes_path: str | Path, out: str | Path, cfg: TrajectoryConfig, progress=None) -> dict:
    cfg.validate()
    out = Path(out)
    episodes = read_episodes(episodes_path)
    tasks = plan(episodes, out.name)
    (out / ".done").mkdir(parents=True, exist_ok=True)
    todo = [t for t in tasks if not _done_path(out, t.video).exists()]
    if progress:
        progress(len(tasks) - len(todo))
    args = [(t, str(out), cfg) for t in todo]
    if cfg.workers == 1 or len(todo) <= 1:
        results = map(_run, args)
        pool = None
    else:
        # spawn: each worker opens its own GL context; a forked one would share the parent's
        pool = mp.get_context("spawn").Pool(cfg.workers)
        results = pool.imap(_run, args)
    try:
        for record in results:
            done = _done_path(out, record["video"])
            done.with_suffix(".tmp").write_text(json.dumps(record, sort_keys=True))
            done.with_suffix(".tmp").replace(done)
            if progress:
                progress(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return finish(out, tasks, episodes_path, cfg)


def finish(out: Path, tasks: list[Task], episodes_path, cfg: TrajectoryConfig) -> dict:
    """annotations.json, rejects.jsonl and manifest.json from the committed records, sorted by id."""
    records = [json.loads(_done_path(out, t.video).read_text()) for t in tasks]
    written = sorted((r for r in records if "entry" in r), key=lambda r: sort_key(r["trajectory_id"]))
    rejected = sorted((r for r in records if "reason" in r), key=lambda r: sort_key(r["trajectory_id"]))
    atomic_write(out / "annotations.json", json.dumps([r["entry"] for r in written], indent=1) + "\n")
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected))
    reasons = Counter(r["kind"] for r in rejected)
    expert = [r["expert"] for r in written]
    manifest = {
        "episodes_file": str(episodes_path),
        "trajectories": len(tasks), "written": len(written), "rejected": len(rejected),
        "episodes": sum(len(r["episode_ids"]) for r in records),
        "episodes_written": sum(len(r["episode_ids"]) for r in written),
        "frames": sum(r["frames"] for r in written),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "expert_success": float(np.mean([e["success"] for e in expert])) if expert else None,
        "expert_spl": float(np.mean([e["spl"] for e in expert])) if expert else None,
        "config": asdict(cfg),
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def sort_key(tid):
    return (0, int(tid), "") if str(tid).isdigit() else (1, 0, str(tid))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def open_log(path: Path):
    """Open a JSON-lines log for appending after cutting a last line that a kill left unfinished.

    Without the cut, the next line would be glued onto the fragment and both would be lost.
    """
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")


def read_log(path: Path):
    """The rows of a JSON-lines log; a line a kill cut short is skipped (its episode runs again)."""
    for line in Path(path).read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue
