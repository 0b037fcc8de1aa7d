"""`streamvln-dagger`: DAgger collection with a trained model and the geodesic expert, over torchrun ranks, resumable.

Load (episodes, config, agent and simulators), then loop {roll out, save or not, log}, then rank 0
merges every rank's annotations and prints the summary.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import click
import torch

from pipeline.config import ConfigError, load_config
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeFileError, read_episodes

from .collect import DaggerOutputError, collect, episode_key, load_log, load_ref_actions, merge, prepare_output
from .policy import SAVE_MODES, DaggerConfig


def _fail(e: Exception):
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _line(row: dict) -> str:
    head = f"{row['scene_id']} episode {row['episode_id']}: {'saved' if row['save'] else 'not saved'} ({row['why']})"
    if "model_success" not in row:
        return head
    return (f"{head}; model success {row['model_success']}, success {row['success']:.0f}, "
            f"relative path length {row['relative_pl']:.3f}, interventions {row['interventions']}, "
            f"steps {row['steps']} ({row['model_steps']} by the model)")


def _clear(out: Path) -> None:
    """--overwrite: remove what a collection writes there, nothing else."""
    for pattern in ("log.rank*.jsonl", "annotations*.json", "summary.json", "dagger_config.json"):
        for f in out.glob(pattern):
            f.unlink()
    shutil.rmtree(out / "images", ignore_errors=True)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="the model that drives (the stage-1 checkpoint directory)")
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False),
              help="VLN-CE episodes (e.g. data/sim/episodes/train.json.gz)")
@click.option("--gt-annotations", type=click.Path(dir_okay=False, exists=True),
              help="the ground-truth trajectories' annotations.json (reference action counts; else 60 each)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for annotations.json + images/")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="DaggerConfig YAML")
@click.option("--p", type=float, help="beta = p ** iteration: the chance an expert takes a chunk [0]")
@click.option("--iteration", type=int, help="DAgger iteration [3]")
@click.option("--num-future-steps", type=int, help="actions per expert chunk [4]")
@click.option("--intermediate-radius", type=float, help="follower radius at intermediate waypoints [1.8]")
@click.option("--final-radius", type=float, help="follower radius at the last waypoint [0.25]")
@click.option("--stop-far-distance", type=float, help="a model STOP this far from the goal is intolerable [3.0]")
@click.option("--max-error-ratio", type=float, help="intolerable: errors / actions per segment above this [0.8]")
@click.option("--max-errors", type=int, help="intolerable: more errors than this [12]")
@click.option("--save", type=click.Choice(SAVE_MODES), help="reference (the reference's criterion) | success | all")
@click.option("--labels", type=click.Choice(["executed", "expert"]),
              help="saved actions: executed (the reference) | expert (the expert's action at each frame) [executed]")
@click.option("--seed", type=int, help="chunk draws and the agent's conjunctions [0]")
@click.option("--num-envs", default=1, show_default=True, help="environments stepped together per process")
@click.option("--every", default=1, show_default=True, help="collect on every K-th episode")
@click.option("--max-episodes", type=int, default=None, help="collect on the first N (after --every)")
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--num-frames", type=int, default=None, help="agent window length [32]")
@click.option("--num-history", type=int, default=None, help="agent memory frames [8]")
@click.option("--reference-memory-text", is_flag=True, default=None, help="the reference eval's memory sentence")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="tokens an answer may have [24]; a describing model: 48")
@click.option("--dataset", default=None, help="name in the video folders [the --out folder's name, lower case]")
@click.option("--jpeg-quality", default=75, show_default=True, help="PIL's default, as the reference")
@click.option("--commit-freq", default=50, show_default=True, help="rewrite annotations_<rank>.json every N saved")
@click.option("--overwrite", is_flag=True, help="start the folder again instead of resuming")
@click.option("--quiet", is_flag=True, help="no line per episode")
def main(checkpoint, episodes_path, gt_annotations, out, config_path, num_envs, every, max_episodes, width, height,
         num_frames, num_history, reference_memory_text, max_new_tokens, dataset, jpeg_quality, commit_freq, overwrite,
         quiet, **options):
    """Collect DAgger trajectories: the model drives, the expert takes over when it goes wrong."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    out = Path(out)
    try:
        cfg = load_config(DaggerConfig, config_path, options)
        cfg.validate()
        episodes = read_episodes(episodes_path)[::every][:max_episodes]
        ref_actions = load_ref_actions(gt_annotations)
        agent_overrides = {"num_frames": num_frames, "num_history": num_history,
                           "reference_memory_text": reference_memory_text, "max_new_tokens": max_new_tokens}
        resolved = {**asdict(cfg), "beta": cfg.beta, "checkpoint": str(checkpoint), "episodes": str(episodes_path),
                    "gt_annotations": gt_annotations, "every": every, "max_episodes": max_episodes,
                    "width": width, "height": height, "agent": agent_overrides, "jpeg_quality": jpeg_quality,
                    "dataset": dataset or out.name.lower()}
        if rank == 0 and overwrite:
            _clear(out)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            prepare_output(out, resolved)
        if world > 1:
            torch.distributed.barrier()
        prepare_output(out, resolved)
    except (ConfigError, EpisodeFileError, DaggerOutputError, ValueError) as e:
        _fail(e)
    done = load_log(out)
    mine = [ep for ep in episodes[rank::world] if episode_key(ep) not in done]
    if gt_annotations is None and rank == 0:
        click.echo(f"no --gt-annotations: every episode counts {cfg.default_ref_actions} reference actions")
    elif rank == 0:
        missing = sum(str(ep.trajectory_id) not in ref_actions for ep in episodes)
        if missing:
            click.echo(f"{missing} episodes have no ground-truth annotation: {cfg.default_ref_actions} actions assumed")
    if mine:
        from streamvln.agent.rollout import rollout
        from streamvln.agent.streaming import load_agent
        from streamvln.sim.miniworld_sim import MiniWorldSim

        from .policy import DaggerPolicy
        sims = [MiniWorldSim(SimConfig(width=width, height=height)) for _ in range(num_envs)]
        agent = load_agent(checkpoint, num_envs, cfg.seed, agent_overrides)
        policy = DaggerPolicy(agent, sims, cfg, ref_actions)
        click.echo(f"rank {rank}: {len(mine)} episodes to collect (beta {cfg.beta:g}), "
                   f"{len(episodes[rank::world]) - len(mine)} already done")
        collect(rollout(sims, policy, mine, keep_frames=True), out, rank, cfg, resolved["dataset"], jpeg_quality,
                commit_freq, None if quiet else (lambda row: click.echo(f"[rank {rank}] {_line(row)}")))
        for s in sims:
            s.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        s = merge(out, episodes, resolved)
        click.echo(f"{out}: {s['episodes']} episodes, {s['done']} done: {s['saved']} saved ({s['frames']} frames), "
                   f"{s['not_saved']} not saved ({s['refused']} refused by the simulator); "
                   f"annotations.json has {s['annotations']} trajectories")
        for kind, n in s["by_kind"].items():
            click.echo(f"  {kind}: {n}")
        if s["model_success_rate"] is not None:
            click.echo(f"  model success (no intervention) {s['model_success_rate']:.3f}, success {s['success_rate']:.3f}, "
                       f"mean relative path length {s['mean_relative_pl']:.3f}, mean interventions "
                       f"{s['mean_interventions']:.2f}, model's share of steps {s['model_step_share']:.3f}")
        if s["missing"]:
            click.echo(f"  {s['missing']} episodes not done yet (a rank stopped early?): run again to finish")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
