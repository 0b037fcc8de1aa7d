"""Run under torchrun by tests/test_rl.py: two RL updates over 2 ranks, then check that every rank
holds the same trainable weights and that the ranks ran different groups."""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from streamvln.rl.config import load_rl_config
from streamvln.rl.train import train_rl
from streamvln.sim.base import SimConfig
from streamvln.sim.episodes import read_episodes
from streamvln.sim.miniworld_sim import MiniWorldSim


def main(checkpoint, episodes_path, out_dir, *sets):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = {k: __import__("yaml").safe_load(v) for k, v in (s.split("=", 1) for s in sets)}
    cfg = load_rl_config(None, **overrides)
    sims = [MiniWorldSim(SimConfig(width=32, height=24)) for _ in range(cfg.num_envs)]
    seen = []
    import streamvln.rl.train as train_module

    original = train_module.rollout

    def spy(sims_, policy, members):
        seen.extend(m.key for m in members)
        return original(sims_, policy, members)

    train_module.rollout = spy
    result = train_rl(cfg, checkpoint, read_episodes(episodes_path), Path(out_dir), sims, rank=rank, world=world)
    digest = hashlib.sha256()
    for name, p in sorted(result["agent"].model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    gathered = [None] * world
    dist.all_gather_object(gathered, (digest.hexdigest(), sorted(set(seen))))
    if rank == 0:
        digests, keys = zip(*gathered)
        assert len(set(digests)) == 1, "trainable weights differ across ranks"
        assert not set(keys[0]) & set(keys[1]), f"ranks ran the same episodes: {keys}"
        print("RL-DIST-CHECK-OK", digests[0][:12], keys)
    for s in sims:
        s.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
    torch.distributed.barrier()
