"""`streamvln-sim`: episodes, expert trajectories, grounding views, pictures and inspection of episode files (options -> modules)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click
import cv2
import numpy as np
from tqdm import tqdm

from pipeline.config import ConfigError, load_config

from .base import SimConfig, SimulatorError
from .episodes import EpisodeFileError, EpisodeGenConfig, generate_episodes, read_episodes, write_episodes
from .tiers import TIERS, tier_of
from .trajectories import TrajectoryConfig, write_trajectories
from .world import SceneError

ERRORS = (ConfigError, EpisodeFileError, SimulatorError, ValueError, OSError)


def _fail(e: Exception):
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group()
def main():
    """Navigation simulator: procedural MiniWorld scenes, VLN episodes, expert trajectories."""


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for <split>.json.gz")
@click.option("--split", default=None, help="train | val_seen | val_unseen | test")
@click.option("--tier", type=click.Choice(list(TIERS)), default=None,
              help="the task ladder's rung [r2r]: " + "; ".join(f"{k}: {v}" for k, v in TIERS.items()))
@click.option("--scenes", type=int, default=None, help="number of scenes")
@click.option("--per-scene", type=int, default=None, help="paths per scene (each gives several instructions)")
@click.option("--goals-per-start", type=int, default=None,
              help="room/neighbour tiers: episodes sharing each start, each to another object [1]")
@click.option("--first-scene", type=int, default=None)
@click.option("--seed", type=int, default=None, help="episode sampling seed (scenes come from the split's pool)")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="EpisodeGenConfig YAML")
def episodes(out, split, tier, scenes, per_scene, goals_per_start, first_scene, seed, config_path):
    """Generate VLN-CE R2R-format episodes over procedural scenes, on one rung of the task ladder."""
    try:
        cfg = load_config(EpisodeGenConfig, config_path, {"split": split, "tier": tier, "scenes": scenes,
                                                          "per_scene": per_scene, "goals_per_start": goals_per_start,
                                                          "first_scene": first_scene,
                                                          "seed": seed})
        with tqdm(total=cfg.scenes, desc="scenes", disable=None) as bar:
            eps, short = generate_episodes(cfg, bar.update)
        path = Path(out) / f"{cfg.split}.json.gz"
        write_episodes(path, eps, meta={"config": cfg.meta()})
    except ERRORS as e:
        _fail(e)
    paths = len({e.trajectory_id for e in eps})
    click.echo(f"wrote {path}: {len(eps)} episodes, {paths} paths, {cfg.scenes} scenes (tier {cfg.tier})")
    for s in short:
        click.echo(f"  {s['scene_id']}: only {s['paths']} of {s['wanted']} paths fit the distance limits")


@main.command()
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="source folder, e.g. data/trajectory_data/SimR2R")
@click.option("--workers", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="TrajectoryConfig YAML")
def trajectories(episodes_path, out, workers, width, height, config_path):
    """Walk every path with the expert and write the StreamVLN trajectory format (resumable)."""
    try:
        cfg = load_config(TrajectoryConfig, config_path, {"workers": workers})
        if width:
            cfg.sim.width = width
        if height:
            cfg.sim.height = height
        total = len({str(e.trajectory_id) for e in read_episodes(episodes_path)})
        with tqdm(total=total, desc="trajectories", disable=None) as bar:
            m = write_trajectories(episodes_path, out, cfg, bar.update)
    except ERRORS as e:
        _fail(e)
    click.echo(f"{out}: {m['trajectories']} trajectories ({m['episodes']} episodes) = {m['written']} written "
               f"+ {m['rejected']} rejected; {m['frames']} frames; expert success {m['expert_success']}")
    for reason, n in m["rejects_by_reason"].items():
        click.echo(f"  rejected, {reason}: {n}")


@main.command()
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False),
              help="room-rung episodes: their scenes are the ones viewed")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for grounding.json and views/")
@click.option("--views-per-scene", type=int, default=None, help="random poses per scene [8]")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="GroundingConfig YAML")
def grounding(episodes_path, out, views_per_scene, width, height, seed, config_path):
    """Views of the episodes' scenes, each asked where its objects are (ScanQA format, a co-training source)."""
    from .grounding import GroundingConfig, write_grounding

    try:
        cfg = load_config(GroundingConfig, config_path, {"views_per_scene": views_per_scene, "seed": seed})
        if width:
            cfg.sim.width = width
        if height:
            cfg.sim.height = height
        total = len({e.scene_id for e in read_episodes(episodes_path)})
        with tqdm(total=total, desc="scenes", disable=None) as bar:
            m = write_grounding(episodes_path, out, cfg, bar.update)
    except ERRORS as e:
        _fail(e)
    click.echo(f"wrote {out}/grounding.json: {m['views']} views of {m['scenes']} scenes, {m['questions']} questions "
               f"(" + ", ".join(f"{a} {n}" for a, n in m["answers"].items()) + ")"
               + (f"; {m['views_skipped']} views had nothing to ask" if m["views_skipped"] else ""))


@main.command()
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False))
@click.option("--episode", "episode_id", required=True, help="episode_id to draw")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write")
@click.option("--width", type=int, default=320)
@click.option("--height", type=int, default=240)
@click.option("--walk", is_flag=True, help="also walk the expert and draw its path")
def show(episodes_path, episode_id, out, width, height, walk):
    """First-person view at the start beside a top-down map with the reference path."""
    from .miniworld_sim import MiniWorldSim
    from .show import side_by_side, top_down_map
    from .trajectories import walk as expert_walk

    try:
        eps = {str(e.episode_id): e for e in read_episodes(episodes_path)}
        if episode_id not in eps:
            raise ValueError(f"{episodes_path}: no episode_id {episode_id} (there are {len(eps)})")
        ep = eps[episode_id]
        with MiniWorldSim(SimConfig(width=width, height=height)) as sim:
            frame = sim.reset(ep).rgb
            path = None
            if walk:
                expert_walk(sim, ep, TrajectoryConfig(sim=sim.config))
                path = sim.agent_path()
            picture = side_by_side(frame, top_down_map(sim.spec, ep, path), ep.instruction_text)
    except ERRORS as e:
        _fail(e)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), picture)
    click.echo(f"wrote {out} ({picture.shape[1]}x{picture.shape[0]})")


@main.command()
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False))
@click.option("--jsonl", default=None, type=click.Path(dir_okay=False), help="also write one episode per line")
def inspect(episodes_path, jsonl):
    """Summarise any VLN-CE R2R/RxR episodes file (ours or Habitat's); optionally convert it to jsonl."""
    try:
        eps = read_episodes(episodes_path)
    except ERRORS as e:
        _fail(e)
    scenes = Counter(e.scene_id for e in eps)
    words = [len(e.instruction_text.split()) for e in eps]
    geo = [e.info.get("geodesic_distance") for e in eps if isinstance(e.info.get("geodesic_distance"), (int, float))]
    click.echo(f"{episodes_path}: {len(eps)} episodes, {len({str(e.trajectory_id) for e in eps})} trajectories, "
               f"{len(scenes)} scenes")
    tiers = Counter(_tier(e.scene_id) for e in eps)
    radii = Counter(e.goals[0].get("radius") for e in eps)
    click.echo("  tier: " + ", ".join(f"{t} ({n} episodes)" for t, n in sorted(tiers.items())) +
               "; success radius: " + ", ".join(f"{'none (3.0 m)' if r is None else f'{r:g} m'} ({n})"
                                                for r, n in sorted(radii.items(), key=lambda kv: str(kv[0]))))
    if eps:
        click.echo(f"  instruction words: mean {np.mean(words):.1f}, max {max(words)}")
        click.echo(f"  reference path waypoints: mean {np.mean([len(e.reference_path) for e in eps]):.1f}")
    if geo:
        click.echo(f"  geodesic distance: mean {np.mean(geo):.2f} m, min {min(geo):.2f}, max {max(geo):.2f}")
    if jsonl:
        Path(jsonl).write_text("".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in eps))
        click.echo(f"wrote {jsonl}")


def _tier(scene_id: str) -> str:
    try:
        return tier_of(scene_id)
    except SceneError:
        return "not procedural"


if __name__ == "__main__":
    main()
