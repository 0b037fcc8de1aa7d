"""Run under torchrun by tests/test_train.py: train, then check across ranks that parameters are
identical and that the ranks were fed different samples."""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from streamvln.config import load_train_config
from streamvln.data import build_loader, load_mix
from streamvln.train import train


def main(mix_path, config_path, out_dir):
    mix = load_mix(mix_path)
    result = train(load_train_config(config_path), mix, Path(out_dir))
    digest = hashlib.sha256()
    for name, p in sorted(result["model"].named_parameters()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    rank, world = dist.get_rank(), dist.get_world_size()
    first_keys = next(iter(build_loader(mix, rank=rank, world_size=world)))["keys"]
    gathered = [None] * world
    dist.all_gather_object(gathered, (digest.hexdigest(), first_keys, result["loader"].state_dict()["batches"]))
    if rank == 0:
        digests, keys, batches = zip(*gathered)
        assert len(set(digests)) == 1, "parameters differ across ranks"
        assert not set(keys[0]) & set(keys[1]), f"ranks saw the same samples: {keys}"
        assert len(set(batches)) == 1, f"ranks consumed different numbers of batches: {batches}"
        print("DIST-CHECK-OK", digests[0][:12], keys, batches)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    torch.distributed.barrier()
