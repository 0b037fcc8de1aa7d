"""`streamvln-rl`: options -> RLConfig, the simulators, the training loop, the export."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from pipeline.config import ConfigError
from streamvln.sim.episodes import EpisodeFileError, read_episodes

from .config import load_rl_config


def parse_sets(values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    return out


def guide_overrides(guide: dict, ds_config: str | None) -> dict:
    """The guide's flags as RLConfig overrides; contradictory pairs are refused, never resolved silently."""
    out = {name: guide[name] for name, _ in GUIDE_VALUES if guide[name] is not None}
    for a, b in (("sft_use_policy_steps", "sft_oracle_only"), ("enable_recovery", "disable_recovery")):
        if guide[a] and guide[b]:
            raise click.UsageError(f"--{a} and --{b} contradict each other: give one")
    if guide["use_hybrid_training"]:
        out["use_hybrid_training"] = True
    if guide["sft_use_policy_steps"]:
        out.update(sft_use_policy_steps=True, sft_oracle_only=False)
    if guide["sft_oracle_only"]:
        out["sft_oracle_only"] = True
    if guide["enable_recovery"] or guide["disable_recovery"]:
        out["enable_recovery"] = bool(guide["enable_recovery"])
    if guide["use_wandb"]:
        out["use_wandb"] = True
    if ds_config or guide["use_deepspeed"]:
        out["deepspeed"] = ds_config or str(Path(__file__).resolve().parents[2] / "configs/deepspeed/zero2.json")
    return out


# The guide's value flags (grpo-sft-hybrid.md, section 5), each in its underscore form as the guide writes it
# and in the dash form; each overrides the RLConfig key of the same name
GUIDE_VALUES = (("phase", str), ("sft_loss_start_weight", float), ("sft_loss_end_weight", float),
                ("sft_loss_decay_updates", int), ("sft_loss_decay_type", str), ("offtrack_dist_thresh", float),
                ("offtrack_heading_thresh_deg", float), ("offtrack_patience", int), ("heading_guard_dist", float),
                ("lookahead_k", int), ("recovery_dist_thresh", float), ("recovery_heading_thresh_deg", float),
                ("recovery_max_steps", int), ("goal_radius", float), ("goal_grace_steps", int),
                ("goal_stop_patience", int), ("num_updates", int), ("num_episodes_per_update", int),
                ("group_size", int), ("learning_rate", float), ("ppo_epochs", int), ("mini_batch_size", int),
                ("max_grad_norm", float), ("wandb_project", str), ("wandb_run_name", str), ("num_envs", int))
GUIDE_FLAGS = ("use_hybrid_training", "sft_use_policy_steps", "sft_oracle_only", "enable_recovery",
               "disable_recovery", "use_wandb", "use_deepspeed")


def both(name: str) -> tuple[str, ...]:
    """The dash form and the guide's underscore form of a flag (one, where they are the same)."""
    return tuple(dict.fromkeys((f"--{name.replace('_', '-')}", f"--{name}")))


def guide_options(f):
    for name, kind in reversed(GUIDE_VALUES):
        f = click.option(*both(name), name, type=kind, default=None, help=f"Override {name} (the guide's flag).")(f)
    for name in reversed(GUIDE_FLAGS):
        f = click.option(*both(name), name, is_flag=True, default=False, help="The guide's flag (docs/rl.md).")(f)
    return f


@click.command()
@click.option("--checkpoint", *both("model_path"), "checkpoint", required=True,
              type=click.Path(file_okay=False, exists=True),
              help="The supervised model to start from (a StreamVLN checkpoint directory); the guide's --model_path.")
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="VLN-CE episode file (.json.gz) of the training episodes (streamvln-sim episodes writes them).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="RL YAML (configs/rl/*.yaml); unknown keys are errors.")
@click.option("--output-dir", *both("output_path"), "output_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoints, metrics and the export; the guide's --output_path.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output folder.")
@click.option("--set", "sets", multiple=True, help="Override any config key: --set phase=phase2_progress (repeatable).")
@guide_options
@click.option("--deepspeed", *both("deepspeed_config"), "ds_config", type=click.Path(dir_okay=False, exists=True),
              help="Run the update through a DeepSpeed engine (configs/deepspeed/zero2.json); the guide's "
                   "--deepspeed_config (with --use_deepspeed alone: configs/deepspeed/zero2.json).")
@click.option(*both("habitat_config_path"), "habitat_config", default=None, hidden=True)
@click.option("--max-episodes", type=int, help="Train on the first N episodes only.")
@click.option("--width", default=224, show_default=True, help="Simulator image width.")
@click.option("--height", default=168, show_default=True, help="Simulator image height.")
def main(checkpoint, episodes_path, config_path, output_dir, resume, sets, ds_config, habitat_config, max_episodes,
         width, height, **guide):
    """GRPO + SFT hybrid RL with expert intervention on the simulator's episodes (docs/rl.md); `torchrun -m
    streamvln.rl` for several processes. The guide's flags are accepted as it writes them (--num_updates) and
    in dash form (--num-updates); they override --config and --set."""
    import os

    import torch

    from streamvln.sim.base import SimConfig
    from streamvln.sim.miniworld_sim import MiniWorldSim

    from .train import export, train_rl

    if habitat_config is not None:
        raise click.UsageError("--habitat_config_path: there is no Habitat here. The simulator is MiniWorld; pass "
                               "the training episodes with --episodes (a VLN-CE .json.gz from `streamvln-sim "
                               "episodes`), and the task settings (goal radius, step limit) as RL config keys.")
    overrides = parse_sets(sets)
    overrides.update(guide_overrides(guide, ds_config))
    try:
        cfg = load_rl_config(config_path, **overrides)
        episodes = read_episodes(episodes_path)[:max_episodes]
    except (ConfigError, EpisodeFileError) as e:
        raise click.ClickException(str(e)) from None
    if not episodes:
        raise click.ClickException(f"{episodes_path} holds no episodes")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    sims = [MiniWorldSim(SimConfig(width=width, height=height)) for _ in range(cfg.num_envs)]
    try:
        result = train_rl(cfg, checkpoint, episodes, Path(output_dir), sims, resume, log=click.echo, rank=rank,
                          world=world)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    finally:
        for sim in sims:
            sim.close()
    if rank == 0:
        export(result["agent"], Path(output_dir) / "final", checkpoint, cfg)
        click.echo(f"exported {Path(output_dir) / 'final'}")
