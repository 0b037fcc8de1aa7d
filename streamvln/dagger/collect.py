"""DAgger collection output: executed trajectories in the StreamVLN format, per-rank logs and annotations, the merge.

Per rank: loop {an episode ends in the shared rollout, decide whether it is saved, write its frames
(temporary folder, renamed when complete), append its log line: the commit; every `commit_freq`
saved episodes rewrite annotations_<rank>.json from the log}. Rank 0 then merges every rank's
annotations into annotations.json (sorted by id, one entry per video, the first kept) and writes
summary.json. A rerun skips the episodes of every log, so a killed run continues without redoing
or duplicating episodes; frames of an episode whose log line never got written are rewritten.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from streamvln.sim.base import SimConfig
from streamvln.sim.tiers import build_scene
from streamvln.sim.trajectories import atomic_write, open_log, read_log, sort_key, video_name, write_video
from streamvln.sim.views import DESCRIBE_AHEAD, in_view

from .policy import DaggerConfig, relative_pl, save_decision

CONFIG = "dagger_config.json"


class DaggerOutputError(ValueError):
    """The output folder or an input file cannot be used as asked; the message says what to do."""


def episode_key(episode) -> str:
    return f"{episode.scene_id}|{episode.episode_id}"


def prepare_output(out: Path, resolved: dict) -> None:
    """Record what this folder is collected with; resuming under anything else is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(resolved) if old.get(k) != resolved.get(k))
        if changed:
            raise DaggerOutputError(f"{out} was collected with other {', '.join(changed)} "
                                    f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                                    "use another --out, or --overwrite to start it again")
    else:
        atomic_write(path, json.dumps(resolved, indent=1, sort_keys=True) + "\n")


def load_log(out: Path) -> dict[str, dict]:
    """Every committed episode of every rank's log (a line cut by a kill does not count: it runs again)."""
    done = {}
    for f in sorted(out.glob("log.rank*.jsonl")):
        for row in read_log(f):
            done.setdefault(f"{row['scene_id']}|{row['episode_id']}", row)
    return done


def load_ref_actions(path: str | Path | None) -> dict[str, int]:
    """{annotation id: number of actions} of the ground-truth trajectories (the reference's ref_actions_len)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DaggerOutputError(f"{path}: cannot read the ground-truth annotations: {e}") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "id" in d and isinstance(d.get("actions"), list)
                                             for d in data):
        raise DaggerOutputError(f"{path}: expected a list of {{id, actions, ...}} entries (annotations.json)")
    return {str(d["id"]): len(d["actions"]) for d in data}


def episode_row(result, cfg: DaggerConfig, dataset: str) -> tuple[dict, dict | None, list | None]:
    """(log line, annotation entry or None, frames to write or None) for one finished rollout."""
    ep = result.episode
    row = {"scene_id": ep.scene_id, "episode_id": ep.episode_id, "trajectory_id": ep.trajectory_id}
    if result.error:
        return {**row, "save": False, "kind": "refused by the simulator", "why": result.error}, None, None
    m, info = result.metrics, result.info
    save, kind, why = save_decision(cfg, m, info["model_success"])
    row.update({"save": save, "kind": kind, "why": why, "model_success": info["model_success"],
                "success": m["success"], "distance_to_goal": round(m["distance_to_goal"], 4),
                "relative_pl": round(relative_pl(m), 4), "steps": m["steps"], "collisions": m["collisions"],
                **{k: info[k] for k in ("ref_actions", "accumulated_error", "max_accumulated_error", "interventions",
                                        "expert_steps", "model_steps", "force_episode_end", "sources")}})
    if not save:
        return row, None, None
    # One frame per entry of `actions`: the frame before each step; the final STOP is not an entry.
    # Entry k >= 1 is the label of frame k - 1 (training shifts by one and ends on STOP): the action
    # taken there (the reference), or with labels: expert the expert's action in that state.
    n = len(result.actions)
    labels = info["expert_actions"] if cfg.labels == "expert" else result.actions
    entry = {"id": ep.episode_id, "video": video_name(ep.scene_id, dataset, ep.episode_id),
             "instructions": [ep.instruction_text], "actions": [-1] + [int(a) for a in labels[:n - 1]]}
    if cfg.describe:  # the camera is nav-eval's and the trajectories' (SimConfig's field of view and height)
        spec, sim = build_scene(ep.scene_id), SimConfig()
        entry["descriptions"] = [in_view(spec, (x, z), h, sim.hfov, DESCRIBE_AHEAD, sim.camera_height)
                                 for x, z, h in result.poses[:n]]
    row["video"], row["frames"] = entry["video"], n
    return row, entry, result.frames[:n]


def collect(results, out: Path, rank: int, cfg: DaggerConfig, dataset: str, jpeg_quality: int = 75,
            commit_freq: int = 50, progress=None) -> int:
    """Consume a rollout's results: write saved episodes, commit log lines; returns episodes committed."""
    n, saved_since = 0, 0
    with open_log(out / f"log.rank{rank}.jsonl") as log:
        for result in results:
            row, entry, frames = episode_row(result, cfg, dataset)
            if entry is not None:
                # 0-indexed names as the reference's DAgger writes them (ground truth starts at 001)
                write_video(out / entry["video"], frames, jpeg_quality, first=0)
                row["entry"] = entry
                saved_since += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            n += 1
            if saved_since >= commit_freq:
                write_rank_annotations(out, rank)
                saved_since = 0
            if progress:
                progress(row)
    write_rank_annotations(out, rank)
    return n


def _entries(rows) -> list[dict]:
    """Sorted by id, one per video (the first kept), as the reference merges."""
    seen, out = set(), []
    for e in sorted((r["entry"] for r in rows if r.get("entry")), key=lambda e: sort_key(e["id"])):
        if e["video"] not in seen:
            seen.add(e["video"])
            out.append(e)
    return out


def write_rank_annotations(out: Path, rank: int) -> None:
    log = out / f"log.rank{rank}.jsonl"
    rows = list(read_log(log)) if log.exists() else []
    atomic_write(out / f"annotations_{rank}.json", json.dumps(_entries(rows), indent=1) + "\n")


def merge(out: Path, episodes, resolved: dict) -> dict:
    """annotations.json from every rank's annotations_<r>.json; summary.json over the selected episodes."""
    entries = []
    for f in sorted(out.glob("annotations_*.json")):
        entries.extend({"entry": e} for e in json.loads(f.read_text()))
    merged = _entries(entries)
    atomic_write(out / "annotations.json", json.dumps(merged, indent=1) + "\n")
    done = load_log(out)
    rows = [done[k] for k in (episode_key(ep) for ep in episodes) if k in done]
    ran = [r for r in rows if "model_success" in r]
    mean = (lambda key: float(np.mean([r[key] for r in ran])) if ran else None)
    summary = {
        "episodes": len(episodes), "done": len(rows), "missing": len(episodes) - len(rows),
        "saved": sum(r["save"] for r in rows), "not_saved": sum(not r["save"] for r in rows),
        "refused": len(rows) - len(ran), "annotations": len(merged),
        "frames": sum(r.get("frames", 0) for r in rows if r["save"]),
        "by_kind": dict(sorted(Counter(r["kind"] for r in rows).items())),
        "model_success_rate": mean("model_success"), "success_rate": mean("success"),
        "mean_relative_pl": mean("relative_pl"), "mean_interventions": mean("interventions"),
        "mean_steps": mean("steps"),
        "model_step_share": (sum(r["model_steps"] for r in ran) / max(1, sum(r["steps"] for r in ran))) if ran else None,
        "config": resolved,
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
