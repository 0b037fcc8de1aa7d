"""Run a task's shards: group inputs into shards, write each shard and its sidecar, workers and parts, merge."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from . import task_dir
from .reader import Reject
from .shard_writer import ShardWriter, json_bytes, npy_bytes, write_json_atomic

# What a task's builder supplies for each index row; key, split, shard, offset and size come from writing.
INDEX_FIELDS = tuple(n for n in task_dir.INDEX_SCHEMA.names if n not in ("key", "split", "shard", "offset", "size"))


@dataclass
class FrameRecord:
    """JPEGs stored once for a unit (an episode) and referenced by its samples: `<key>.<name>` members."""

    key: str
    names: list[str]  # member extensions, e.g. "00012.jpg" for source frame 12
    frames: list[bytes]


@dataclass
class Sample:
    key: str
    meta: dict
    input_ids: np.ndarray
    labels: np.ndarray
    frames: list[bytes]  # stored in the sample as fNNN.jpg (when frame_record is None)
    row: dict  # the index.parquet columns of INDEX_FIELDS
    frame_record: FrameRecord | None = None
    frame_refs: list[int] | None = None  # positions in frame_record, in the sample's frame order
    arrays: dict[str, np.ndarray] | None = None  # further .npy members (a manipulation sample's actions)

    def members(self, frame_ranges: list[tuple[int, int]] | None = None) -> list[tuple[str, bytes]]:
        """json (+ frame_ranges: where in the shard its referenced frames are), tokens, own frames."""
        meta = self.meta if frame_ranges is None else {**self.meta, "frame_ranges": [list(r) for r in frame_ranges]}
        frames = [(f"f{i:03d}.jpg", jpg) for i, jpg in enumerate(self.frames)]
        return [("json", json_bytes(meta)), ("input_ids.npy", npy_bytes(self.input_ids)),
                ("labels.npy", npy_bytes(self.labels)),
                *((name, npy_bytes(a)) for name, a in (self.arrays or {}).items()), *frames]


# A task's unit of input (a trajectory, a video conversation, a document) -> its samples and rejects.
BuildFn = Callable[[object], tuple[list[Sample], list[Reject]]]


def group_units(units: list, samples_per_unit: list[int], samples_per_shard: int) -> list[list]:
    """Whole units per shard; a shard closes once its planned samples reach samples_per_shard.

    Depends only on the inputs and options, never on workers, parts or timing.
    """
    groups, current, planned = [], [], 0
    for unit, n in zip(units, samples_per_unit):
        current.append(unit)
        planned += n
        if planned >= samples_per_shard:
            groups.append(current)
            current, planned = [], 0
    if current:
        groups.append(current)
    return groups


def write_shard(out: Path, split: str, shard_id: int, units: list, build: BuildFn) -> dict:
    """Write one shard and then its stats sidecar (which marks it done); returns the stats."""
    path = out / task_dir.shard_name(split, shard_id)
    writer = ShardWriter(path)
    index, rejects, counts, per_source = [], [], Counter(), {}
    try:
        for unit in units:
            samples, bad = build(unit)
            rejects += [r.to_json() for r in bad]
            outcome = "episodes_written" if samples else "episodes_rejected"
            bad_samples = sum(r.level == "sample" for r in bad)
            counts.update({outcome: 1, "samples_written": len(samples), "samples_rejected": bad_samples})
            per_source.setdefault(unit.source, Counter()).update({outcome: 1, "samples_written": len(samples)})
            stored = {}  # frame record key -> its frames' byte ranges, written before its first sample
            for sample in samples:
                ranges, record = None, sample.frame_record
                if record is not None:
                    if record.key not in stored:
                        stored[record.key] = writer.write_frames(record.key, list(zip(record.names, record.frames)))
                    ranges = [stored[record.key][i] for i in sample.frame_refs]
                offset, size = writer.write(sample.key, sample.members(ranges))
                index.append({"key": sample.key, "offset": offset, "size": size,
                              **{f: sample.row[f] for f in INDEX_FIELDS}})
    except BaseException:
        writer.abort()
        raise
    stats = {"shard": path.name, **writer.close(), "counts": {k: counts[k] for k in task_dir.COUNT_KEYS},
             "per_source": per_source, "rejects": rejects, "index": index}
    write_json_atomic(task_dir.stats_path(path), stats)
    return stats


_worker: dict = {}


def _init_worker(make_build: Callable[[], BuildFn], out: Path, split: str):
    _worker.update(build=make_build(), out=out, split=split)


def _run_job(job: tuple[int, list]) -> dict:
    shard_id, units = job
    return write_shard(_worker["out"], _worker["split"], shard_id, units, _worker["build"])


def run_shards(out: Path, plan: dict, groups: list[list], make_build: Callable[[], BuildFn], *, workers: int = 1,
               part: int = 0, num_parts: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Commit the plan, write this part's pending shards, merge when every part is done; a summary.

    make_build runs once per worker process (after the fork), so per-process state such as open
    video readers is never shared.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in 0..{num_parts - 1}, got {part}")
    split = plan["split"]
    task_dir.commit_plan(out, plan, overwrite)
    mine = [i for i in range(len(groups)) if i % num_parts == part]
    jobs = [(i, groups[i]) for i in task_dir.pending_shards(out, split, mine)]
    bar = tqdm(total=len(jobs), unit="shard", desc=f"{plan['task']} {split} part {part}/{num_parts}",
               disable=not progress)
    written = []
    if workers <= 1:
        _init_worker(make_build, out, split)
        for job in jobs:
            written.append(_run_job(job))
            bar.update()
    else:
        # fork: workers inherit the loaded tokenizer instead of re-importing transformers (seconds each).
        # The tokenizer's own thread pool must not have started before the fork, hence the variable.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with mp.get_context("fork").Pool(workers, _init_worker, (make_build, out, split)) as pool:
            for stats in pool.imap_unordered(_run_job, jobs):
                written.append(stats)
                bar.update()
    bar.close()
    missing = task_dir.finalize(out)
    return {"out": str(out), "task": plan["task"], "split": split, "shards_planned": len(groups),
            "shards_in_part": len(mine), "shards_skipped": len(mine) - len(jobs), "shards_written": len(written),
            "shards_missing": missing.get(split, 0), "manifest": None if missing.get(split) else
            task_dir.load_manifest(out)["splits"][split]}


def planning_section(counts: Counter, per_source: dict, rejects: list[Reject]) -> dict:
    """The plan's record of what was decided before any shard was written (merged into the manifest)."""
    return {"counts": {k: counts[k] for k in task_dir.COUNT_KEYS}, "per_source": per_source,
            "rejects": [r.to_json() for r in rejects]}
