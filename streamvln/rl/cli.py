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


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False, exists=True),
              help="The supervised model to start from (a StreamVLN checkpoint directory).")
@click.option("--episodes", "episodes_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="VLN-CE episode file (.json.gz) of the training episodes.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="RL YAML (configs/rl/*.yaml); unknown keys are errors.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output folder.")
@click.option("--set", "sets", multiple=True, help="Override any config key: --set phase=phase2_progress (repeatable).")
@click.option("--num-updates", type=int, help="Override num_updates.")
@click.option("--group-size", type=int, help="Override group_size.")
@click.option("--num-envs", type=int, help="Override num_envs.")
@click.option("--disable-recovery", is_flag=True, help="No expert intervention (enable_recovery: false).")
@click.option("--deepspeed", "ds_config", type=click.Path(dir_okay=False, exists=True),
              help="Run the update through a DeepSpeed engine (configs/deepspeed/zero2.json).")
@click.option("--max-episodes", type=int, help="Train on the first N episodes only.")
@click.option("--width", default=224, show_default=True, help="Simulator image width.")
@click.option("--height", default=168, show_default=True, help="Simulator image height.")
def main(checkpoint, episodes_path, config_path, output_dir, resume, sets, num_updates, group_size, num_envs,
         disable_recovery, ds_config, max_episodes, width, height):
    """GRPO + SFT hybrid RL with expert intervention on the simulator's episodes (docs/rl.md); `torchrun -m
    streamvln.rl` for several processes."""
    import os

    import torch

    from streamvln.sim.base import SimConfig
    from streamvln.sim.miniworld_sim import MiniWorldSim

    from .train import export, train_rl

    overrides = parse_sets(sets)
    overrides.update({k: v for k, v in (("num_updates", num_updates), ("group_size", group_size),
                                        ("num_envs", num_envs)) if v is not None})
    if disable_recovery:
        overrides["enable_recovery"] = False
    if ds_config:
        overrides["deepspeed"] = ds_config
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
