"""`streamvln-manip`: demonstrations in CALVIN format (synth, libero-synth) and closed-loop evaluation (eval)."""

from __future__ import annotations

from pathlib import Path

import click

from .tasks import RUNGS, get_rung

RUNG_HELP = "The tabletop ladder's rung: " + "; ".join(f"{r.name}: {r.about}" for r in RUNGS.values()) + "."


@click.group()
def main():
    """The manipulation tabletop (pybullet) and LIBERO (optional extra): demonstrations and closed-loop evaluation."""


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes <out>/training and <out>/validation.")
@click.option("--episodes", default=200, show_default=True, help="Training episodes (each a chain of 1..max-tasks tasks).")
@click.option("--val-episodes", default=20, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--rung", type=click.Choice(list(RUNGS)), default="full", show_default=True, help=RUNG_HELP)
@click.option("--max-tasks", default=None, type=int,
              help="Most tasks per episode, run one after the other [full: 3; one-task rungs: 1].")
@click.option("--static-size", default=128, show_default=True, help="Static camera size (CALVIN: 200).")
@click.option("--gripper-size", default=84, show_default=True, help="Gripper camera size (CALVIN: 84).")
@click.option("--action-noise", default=0.0, show_default=True,
              help="DART-style noise (std, relative-action units) on the executed motion while the gripper is open; "
                   "the labels stay the expert's.")
@click.option("--workers", default=1, show_default=True)
def synth(out, episodes, val_episodes, seed, rung, max_tasks, static_size, gripper_size, action_noise, workers):
    """Write CALVIN-format demonstrations of the scripted expert (resumes an interrupted run)."""
    from .synth import SynthConfig, synthesize

    max_tasks = min(3, get_rung(rung).max_tasks) if max_tasks is None else max_tasks
    try:
        summary = synthesize(out, SynthConfig(episodes, val_episodes, seed, max_tasks, static_size, gripper_size, rung,
                                              action_noise),
                             workers=workers)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    report(out, summary)


@main.command("libero-synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes <out>/training and <out>/validation.")
@click.option("--suite", default="libero_object", show_default=True, help="libero_object, libero_spatial, libero_goal, ...")
@click.option("--tasks", default="all", show_default=True, help="'all', or comma-separated task names or indices.")
@click.option("--episodes", default=10, show_default=True, help="Training episodes per task.")
@click.option("--val-episodes", default=2, show_default=True, help="Validation episodes per task.")
@click.option("--seed", default=0, show_default=True)
@click.option("--camera-size", default=128, show_default=True, help="Both cameras (LIBERO: 128).")
@click.option("--max-steps", default=0, show_default=True, help="Steps per episode; 0: the suite's evaluation limit.")
@click.option("--workers", default=1, show_default=True)
def libero_synth(out, suite, tasks, episodes, val_episodes, seed, camera_size, max_steps, workers):
    """CALVIN-format demonstrations of LIBERO's official tasks by the scripted expert (needs the libero extra)."""
    from .libero import LiberoUnavailable

    try:
        from .libero_synth import LiberoSynthConfig, synthesize

        cfg = LiberoSynthConfig(suite, tasks, episodes, val_episodes, seed, camera_size, max_steps)
        summary = synthesize(out, cfg, workers=workers)
    except (ValueError, LiberoUnavailable) as e:
        raise click.ClickException(str(e)) from None
    report(out, summary)


def report(out, summary: dict) -> None:
    for split in ("training", "validation"):
        s = summary[split]
        click.echo(f"{Path(out) / split}: {s['episodes']} episodes, {s['frames']} frames, {s['tasks_attempted']} tasks "
                   f"attempted = {s['spans']} language spans + {len(s['expert_failures'])} expert failures")
        for task, n in s["per_task"].items():
            click.echo(f"  {task}: {n}")
        for reason in sorted({f["reason"] for f in s["expert_failures"]}):
            click.echo(f"  no span ({sum(f['reason'] == reason for f in s['expert_failures'])}): {reason}")


@main.command("eval")
@click.option("--checkpoint", type=click.Path(file_okay=False, exists=True), help="An exported VLA model (runs/manip/final).")
@click.option("--policy", "policy_name", type=click.Choice(["model", "expert", "zero"]), default="model", show_default=True,
              help="model: the checkpoint; expert: the scripted expert (upper bound); zero: no motion (baseline).")
@click.option("--sim", type=click.Choice(["tabletop", "libero"]), default="tabletop", show_default=True,
              help="tabletop: the pybullet tabletop; libero: LIBERO's official tasks and initial states (extra).")
@click.option("--suite", default="libero_object", show_default=True, help="The LIBERO suite (--sim libero).")
@click.option("--rung", type=click.Choice(list(RUNGS)), default="full", show_default=True, help=RUNG_HELP)
@click.option("--tasks", default="all", show_default=True,
              help="'all' (the rung's tasks) or comma-separated task names (LIBERO: names or indices).")
@click.option("--episodes", default=20, show_default=True,
              help="Initial states per task (single-task success; LIBERO: the first N of its 50 official ones).")
@click.option("--chains", default=None, type=int,
              help="5-task chains (CALVIN's protocol) [= --episodes; LIBERO and one-task rungs: 0].")
@click.option("--num-envs", default=4, show_default=True, help="Environments stepped together (one model call a step).")
@click.option("--max-steps", default=None, type=int,
              help="Steps per subtask [tabletop 240 (CALVIN: 360); LIBERO: its per-suite limit].")
@click.option("--execute", type=click.Choice(["first", "chunk"]), default="first", show_default=True,
              help="first: the first action of each chunk, the model asked every step (RoboVLMs); chunk: the whole chunk.")
@click.option("--prompt", default="What action should the robot take to {instruction}?", show_default=True,
              help="The shards' prompt template.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="results (*.jsonl) and summary.json.")
def evaluate_cmd(checkpoint, policy_name, sim, suite, rung, tasks, episodes, chains, num_envs, max_steps, execute, prompt,
                 seed, out_dir):
    """Closed-loop success per task and over 5-task chains (success rate per chain length, average length)."""
    from .closed_loop import TabletopSim, evaluate
    from .libero import LiberoUnavailable
    from .policy import ExpertPolicy, VLAPolicy, ZeroPolicy
    from .tabletop import TabletopConfig

    try:
        if sim == "libero":
            if rung != "full":
                raise ValueError("--rung chooses a tabletop rung; LIBERO's tasks are chosen with --suite and --tasks")
            from .libero import select_tasks
            from .libero_sim import LiberoSim

            simulator = LiberoSim(suite)
            chosen = [t.name for t in select_tasks(suite, tasks)]
            chains = 0 if chains is None else chains
        else:
            ladder = get_rung(rung)
            simulator = TabletopSim(TabletopConfig(blocks=ladder.blocks))
            chosen = list(ladder.tasks) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
            unknown = sorted(set(chosen) - set(ladder.tasks))
            if unknown:
                raise ValueError(f"task(s) {unknown} are not on rung {rung!r}; its tasks: {', '.join(ladder.tasks)}")
            if chains is None:
                chains = episodes if ladder.max_tasks >= 5 else 0
            if chains and ladder.max_tasks < 5:
                raise ValueError(f"rung {rung!r} asks one task per episode: it has no 5-task chains (use --chains 0)")
    except (ValueError, LiberoUnavailable) as e:
        raise click.ClickException(str(e)) from None
    if policy_name == "model":
        if not checkpoint:
            raise click.UsageError("--policy model needs --checkpoint")
        import torch

        from pipeline.qwen_tokenizer import load_tokenizer
        from streamvln.model.build import build_model

        torch.set_grad_enabled(False)
        model = build_model(None, checkpoint)
        if not hasattr(model, "count_targets"):
            raise click.ClickException(f"{checkpoint} is not a VLA model (model_type streamvln_vla)")
        size = model.config.vision_tower_config().image_size
        policy = VLAPolicy(model, load_tokenizer(checkpoint), prompt, size, execute)
    else:
        policy = ExpertPolicy(simulator.make_expert) if policy_name == "expert" else ZeroPolicy()
    try:
        summary = evaluate(policy, out_dir, tasks=chosen, episodes=episodes, chains=chains, seed=seed, sim=simulator,
                           num_envs=num_envs, max_steps=max_steps,
                           config={"checkpoint": checkpoint, "policy": policy_name, "execute": execute, "prompt": prompt,
                                   **({"rung": rung} if sim == "tabletop" else {})})
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    lines = []
    if "tasks" in summary:
        s = summary["tasks"]
        lines.append(f"single tasks: success {s.get('success_rate', 0):.3f} over {s['chains']} episodes")
        lines += [f"  {t:28s} {v['success']:.3f} ({v['attempts']})" for t, v in s["per_task"].items()]
    if "chains" in summary:
        s = summary["chains"]
        rates = " ".join(f"{k}:{v:.3f}" for k, v in s.get("chain_success", {}).items())
        lines.append(f"5-task chains ({s['chains']}): success by length {rates}; average length "
                     f"{s.get('average_length', 0):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
