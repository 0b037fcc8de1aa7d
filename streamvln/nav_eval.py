"""`streamvln-nav-eval`: closed-loop evaluation (SR, SPL, OS, NE, nDTW, SDTW) with intervals, resumable, on ranks; `compare`.

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

from streamvln.nav_stats import interval, paired
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
    """Mean of every metric and its 95% interval (Wilson for SR and OS, bootstrap for the rest), with N."""
    out = {"episodes": len(rows), "ci95": {}}
    for m in METRICS:
        out[m] = float(np.mean([r[m] for r in rows])) if rows else None
        out["ci95"][m] = list(interval(m, [r[m] for r in rows])) if rows else None
    return out


def print_table(summary: dict, title: str) -> None:
    cols = [m for m in METRICS]
    click.echo(f"{title}: N = {summary['episodes']} episodes (95% intervals below the means)")
    click.echo("  " + " ".join(f"{SHORT[m]:>15}" for m in cols))
    click.echo("  " + " ".join(f"{summary[m]:15.3f}" if summary[m] is not None else f"{'-':>15}" for m in cols))
    ci = summary.get("ci95") or {}
    click.echo("  " + " ".join(f"[{ci[m][0]:.2f}, {ci[m][1]:.2f}]".rjust(15) if ci.get(m) else f"{'-':>15}"
                                for m in cols))


def map_caption(episode, metrics: dict) -> tuple[str, str]:
    """What a map shows below it: the instruction, then the outcome and the episode's metrics."""
    radius = metrics["success_distance"]
    outcome = ("SUCCESS: stopped within the goal radius" if metrics["success"] else
               f"FAILED: stopped outside the {radius:g} m goal radius" if metrics["stopped"] else
               "FAILED: step limit reached without STOP")
    numbers = (f"{outcome}. NE {metrics['navigation_error']:.2f} m, SPL {metrics['spl']:.2f}, "
               f"nDTW {metrics['ndtw']:.2f}, OS {metrics['oracle_success']:.0f}, "
               f"path {metrics['path_length']:.1f} m, {metrics['steps']:.0f} steps, "
               f"{metrics['collisions']:.0f} collisions")
    return f"{episode.episode_id} ({episode.scene_id}): {episode.instruction_text}", numbers


def save_media(output: Path, sim, result, maps: bool, videos: bool) -> None:
    import cv2

    from streamvln.sim.show import top_down_map, with_caption
    name = f"{result.episode.scene_id}_{result.episode.episode_id}"
    if maps:
        (output / "maps").mkdir(exist_ok=True)
        picture = top_down_map(sim.scene(result.episode.scene_id)[0], result.episode, result.path)
        cv2.imwrite(str(output / "maps" / f"{name}.png"),
                    with_caption(picture, *map_caption(result.episode, result.metrics)))
    if videos and result.frames:
        (output / "videos").mkdir(exist_ok=True)
        h, w = result.frames[0].shape[:2]
        writer = cv2.VideoWriter(str(output / "videos" / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 6, (w, h))
        for f in result.frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()


@click.command(name="streamvln-nav-eval", epilog="`streamvln-nav-eval compare RUN_A RUN_B` compares two finished "
                                                  "evaluations on the episodes both ran (paired tests).")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="StreamVLN checkpoint directory")
@click.option("--policy", type=click.Choice(["model", "expert", "random", "forward"]), default="model", show_default=True)
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option("--num-envs", default=1, show_default=True, help="environments stepped together per process")
@click.option("--max-episodes", type=int, default=None, help="evaluate only the first N episodes")
@click.option("--every", default=1, show_default=True, help="evaluate every K-th episode (a spread over scenes)")
@click.option("--width", default=640, show_default=True)
@click.option("--height", default=480, show_default=True)
@click.option("--max-steps", default=500, show_default=True, help="step limit of an episode (the reference's 500)")
@click.option("--num-frames", type=int, default=None, help="window length [32]")
@click.option("--num-history", type=int, default=None, help="memory frames [8]")
@click.option("--reference-memory-text", is_flag=True, default=None, help="the reference's memory sentence (no colon)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="tokens an answer may have [24]; a describing model (docs/shards.md, describe) needs about 48")
@click.option("--seed", default=0, show_default=True)
@click.option("--maps", is_flag=True, help="top-down map per episode (maps/*.png)")
@click.option("--videos", is_flag=True, help="first-person video per episode (videos/*.mp4)")
def evaluate_cmd(checkpoint, policy, episodes_path, output, num_envs, max_episodes, every, width, height, max_steps,
                 num_frames, num_history, reference_memory_text, max_new_tokens, seed, maps, videos):
    """Closed-loop evaluation: a policy drives the simulator on an episodes file; summary with N and 95% intervals."""
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
        from streamvln.sim.miniworld_sim import MiniWorldSim
        sims = [MiniWorldSim(SimConfig(width=width, height=height, max_steps=max_steps)) for _ in range(num_envs)]
        pol = build_policy(policy, checkpoint, sims, num_envs, seed,
                           {"num_frames": num_frames, "num_history": num_history,
                            "reference_memory_text": reference_memory_text, "max_new_tokens": max_new_tokens})
        run_episodes(sims, pol, mine, output, rank, maps, videos)
        for s in sims:
            s.close()
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        write_summary(output, episodes, episodes_path, policy,
                      {"checkpoint": checkpoint, "world_size": world, "max_steps": max_steps, "every": every,
                       "max_episodes": max_episodes, "seed": seed, "max_new_tokens": max_new_tokens})
    if world > 1:
        torch.distributed.destroy_process_group()


def episode_row(result) -> dict:
    """One line of result.jsonl: the episode, its metrics (or the simulator's refusal), path and actions."""
    ep = result.episode
    row = {"scene_id": ep.scene_id, "episode_id": ep.episode_id, "instruction": ep.instruction_text}
    if result.error:
        row["error"] = result.error
    else:
        row.update({m: result.metrics[m] for m in METRICS})
        row.update({"os": result.metrics["oracle_success"], "ne": result.metrics["navigation_error"],
                    "path": [[round(v, 3) for v in p] for p in result.path], "actions": result.actions})
    return row


def run_episodes(sims, policy, episodes, output: Path, rank: int = 0, maps: bool = False,
                 videos: bool = False) -> None:
    """The shared rollout over `episodes`; each finished episode appended to result.rank<r>.jsonl at once."""
    from streamvln.agent.rollout import rollout
    with open_log(output / f"result.rank{rank}.jsonl") as f, \
            tqdm(total=len(episodes), desc=f"episodes (rank {rank})", disable=None) as bar:
        for r in rollout(sims, policy, episodes, keep_frames=videos):
            if not r.error:
                save_media(output, sims[0], r, maps, videos)
            f.write(json.dumps(episode_row(r)) + "\n")
            f.flush()
            bar.update(1)


def write_summary(output: Path, episodes, episodes_path, policy: str, options: dict) -> dict:
    """Merge the ranks' lines into result.jsonl (dataset order) and write summary.json; print the table."""
    done = load_done(output)
    rows = [done[k] for k in (_key(ep.scene_id, ep.episode_id) for ep in episodes) if k in done]
    ok = [r for r in rows if "error" not in r]
    tmp = output / "result.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(output / "result.jsonl")
    split = Path(episodes_path).name.split(".")[0]
    summary = {split: summarise(ok), "refused": len(rows) - len(ok), "policy": policy,
               "episodes_file": str(episodes_path), **options}
    tmp = output / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(output / "summary.json")
    print_table(summary[split], f"{policy} on {split}")
    if summary["refused"]:
        click.echo(f"  {summary['refused']} episodes refused by the simulator (see result.jsonl 'error')")
    return summary


def finished_rows(run: Path) -> dict[str, dict]:
    """A finished evaluation's episodes that ran (not refused by the simulator), by scene and episode id."""
    path = run / "result.jsonl"
    if not path.exists():
        raise click.ClickException(f"{run}: no result.jsonl (not a finished streamvln-nav-eval output folder)")
    return {_key(r["scene_id"], r["episode_id"]): r for r in read_log(path) if "error" not in r}


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """Paired differences (b - a) on the episodes both runs finished; refuses runs that share none."""
    a, b = finished_rows(run_a), finished_rows(run_b)
    shared = [k for k in a if k in b]
    if not shared:
        raise click.ClickException(f"{run_a} and {run_b} share no episodes: a paired comparison needs the same "
                                   f"episodes (same episodes file, scenes and episode ids)")
    out = {"run_a": str(run_a), "run_b": str(run_b), "episodes": len(shared), "only_a": len(a) - len(shared),
           "only_b": len(b) - len(shared), "metrics": {}}
    for m in ("success", "oracle_success", "spl", "ndtw", "navigation_error", "path_length", "collisions"):
        out["metrics"][m] = paired(m, [a[k][m] for k in shared], [b[k][m] for k in shared])
    return out


@click.command(name="streamvln-nav-eval compare")
@click.argument("run_a", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="also write the comparison as JSON")
def compare_cmd(run_a, run_b, out):
    """Paired per-episode difference between two evaluations (B - A) on the episodes both ran: McNemar's exact
    test for SR and OS, Wilcoxon's signed-rank test and a bootstrap interval for the means."""
    result = compare_runs(run_a, run_b)
    click.echo(f"B - A on {result['episodes']} shared episodes (A: {run_a}, B: {run_b}; "
               f"{result['only_a']} only in A, {result['only_b']} only in B)")
    click.echo(f"  {'metric':<8} {'A':>7} {'B':>7} {'B - A':>7}  {'95% interval':<17} test")
    for m, r in result["metrics"].items():
        test = (f"McNemar: A only {r['a_only']}, B only {r['b_only']}, p = {r['p']:.3g}" if r["test"] == "mcnemar_exact"
                else f"Wilcoxon p = {r['p']:.3g}")
        lo, hi = r["diff_ci95"]
        click.echo(f"  {SHORT.get(m, m):<8} {r['a']:7.3f} {r['b']:7.3f} {r['diff']:+7.3f}  "
                   f"[{lo:+.3f}, {hi:+.3f}]  {test}")
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")


def main():
    """`streamvln-nav-eval [OPTIONS]` evaluates; `streamvln-nav-eval compare RUN_A RUN_B` compares."""
    if sys.argv[1:2] == ["compare"]:
        compare_cmd(sys.argv[2:], prog_name="streamvln-nav-eval compare")
    else:
        evaluate_cmd()


if __name__ == "__main__":
    main()
