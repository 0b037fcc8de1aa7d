"""`streamvln-nav-eval`: closed-loop evaluation in the simulator (SR, SPL, OS, NE, nDTW, SDTW), resumable, over torchrun ranks.

Load (policy and simulators), then loop {rollout an episode, append its line, save the map/video},
then gather and summarise on rank 0. Every rank appends finished episodes to result.rank<r>.jsonl
as it goes, so a rerun skips them; rank 0 merges the ranks into result.jsonl (dataset order) and
writes summary.json, also when there was nothing left to do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import EpisodeFileError, read_episodes
from streamvln.sim.trajectories import open_log, read_log

METRICS = ("success", "spl", "oracle_success", "navigation_error", "ndtw", "sdtw", "path_length", "steps",
           "collisions")
SHORT = {"success": "SR", "spl": "SPL", "oracle_success": "OS", "navigation_error": "NE", "ndtw": "nDTW",
         "sdtw": "SDTW", "path_length": "PL", "steps": "steps", "collisions": "coll."}


def _key(scene_id, episode_id) -> str:
    return f"{scene_id}|{episode_id}"


def load_done(output: Path) -> dict[str, dict]:
    done = {}
    for f in sorted(output.glob("result*.jsonl")):
        for row in read_log(f):  # a line cut by a kill is skipped: that episode runs again
            done[_key(row["scene_id"], row["episode_id"])] = row
    return done


def build_policy(kind: str, checkpoint: str | None, sims, num_envs: int, seed: int, agent_overrides: dict):
    from streamvln.agent.policies import AgentPolicy, ExpertPolicy, ForwardPolicy, RandomPolicy
    if kind == "expert":
        return ExpertPolicy(sims)
    if kind == "random":
        return RandomPolicy(seed)
    if kind == "forward":
        return ForwardPolicy()
    from streamvln.agent.streaming import load_agent
    return AgentPolicy(load_agent(checkpoint, num_envs, seed, agent_overrides))


def summarise(rows: list[dict]) -> dict:
    out = {"episodes": len(rows)}
    for m in METRICS:
        out[m] = float(np.mean([r[m] for r in rows])) if rows else None
    return out


def print_table(summary: dict, title: str) -> None:
    cols = [m for m in METRICS]
    click.echo(f"{title}: {summary['episodes']} episodes")
    click.echo("  " + " ".join(f"{SHORT[m]:>7}" for m in cols))
    click.echo("  " + " ".join(f"{summary[m]:7.3f}" if summary[m] is not None else "      -" for m in cols))


def save_media(output: Path, sim, result, maps: bool, videos: bool) -> None:
    import cv2

    from streamvln.sim.show import top_down_map
    name = f"{result.episode.scene_id}_{result.episode.episode_id}"
    if maps:
        (output / "maps").mkdir(exist_ok=True)
        cv2.imwrite(str(output / "maps" / f"{name}.png"), top_down_map(sim.scene(result.episode.scene_id)[0],
                                                                        result.episode, result.path))
    if videos and result.frames:
        (output / "videos").mkdir(exist_ok=True)
        h, w = result.frames[0].shape[:2]
        writer = cv2.VideoWriter(str(output / "videos" / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 6, (w, h))
        for f in result.frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()


@click.command()
@click.option("--checkpoint", type=click.Path(file_okay=False), help="StreamVLN checkpoint directory")
@click.option("--policy", type=click.Choice(["model", "expert", "random", "forward"]), default="model", show_default=True)
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option("--num-envs", default=1, show_default=True, help="environments stepped together per process")
@click.option("--max-episodes", type=int, default=None, help="evaluate only the first N episodes")
@click.option("--every", default=1, show_default=True, help="evaluate every K-th episode (a spread over scenes)")
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--num-frames", type=int, default=None, help="window length [32]")
@click.option("--num-history", type=int, default=None, help="memory frames [8]")
@click.option("--reference-memory-text", is_flag=True, default=None, help="the reference's memory sentence (no colon)")
@click.option("--seed", default=0, show_default=True)
@click.option("--maps", is_flag=True, help="top-down map per episode (maps/*.png)")
@click.option("--videos", is_flag=True, help="first-person video per episode (videos/*.mp4)")
def main(checkpoint, policy, episodes_path, output, num_envs, max_episodes, every, width, height, num_frames,
         num_history, reference_memory_text, seed, maps, videos):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if policy == "model" and not checkpoint:
        raise click.UsageError("--checkpoint is needed for --policy model")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        episodes = read_episodes(episodes_path)[::every][:max_episodes]
    except EpisodeFileError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    done = load_done(output)
    mine = [ep for ep in episodes[rank::world] if _key(ep.scene_id, ep.episode_id) not in done]
    if mine:
        from streamvln.agent.rollout import rollout
        from streamvln.sim.miniworld_sim import MiniWorldSim
        sims = [MiniWorldSim(SimConfig(width=width, height=height)) for _ in range(num_envs)]
        pol = build_policy(policy, checkpoint, sims, num_envs, seed,
                           {"num_frames": num_frames, "num_history": num_history,
                            "reference_memory_text": reference_memory_text})
        with open_log(output / f"result.rank{rank}.jsonl") as f, \
                tqdm(total=len(mine), desc=f"episodes (rank {rank})", disable=None) as bar:
            for r in rollout(sims, pol, mine, keep_frames=videos):
                ep = r.episode
                row = {"scene_id": ep.scene_id, "episode_id": ep.episode_id, "instruction": ep.instruction_text}
                if r.error:
                    row["error"] = r.error
                else:
                    row.update({m: r.metrics[m] for m in METRICS})
                    row.update({"os": r.metrics["oracle_success"], "ne": r.metrics["navigation_error"],
                                "path": [[round(v, 3) for v in p] for p in r.path], "actions": r.actions})
                    save_media(output, sims[0], r, maps, videos)
                f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(1)
        for s in sims:
            s.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        done = load_done(output)
        rows = [done[k] for k in (_key(ep.scene_id, ep.episode_id) for ep in episodes) if k in done]
        ok = [r for r in rows if "error" not in r]
        tmp = output / "result.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(output / "result.jsonl")
        split = Path(episodes_path).name.split(".")[0]
        summary = {split: summarise(ok), "refused": len(rows) - len(ok), "policy": policy,
                   "checkpoint": checkpoint, "episodes_file": str(episodes_path), "world_size": world}
        tmp = output / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(output / "summary.json")
        print_table(summary[split], f"{policy} on {split}")
        if summary["refused"]:
            click.echo(f"  {summary['refused']} episodes refused by the simulator (see result.jsonl 'error')")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
