"""Read shards: a task's index as compact arrays, and one sample's members read safely by byte range."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.shard_writer import MAX_FRAME_BYTES, READABLE_SCHEMAS
from pipeline.task_dir import load_manifest

TASK_IDS = {"nav": 0, "videoqa": 1, "scanqa": 2, "mmc4": 3, "manip": 4}  # the reference's, then manipulation
FRAME_MEMBER = re.compile(r"f\d{3}\.jpg")
TOKEN_MEMBERS = ("input_ids.npy", "labels.npy")
ACTION_MEMBERS = ("actions.npy", "action_mask.npy")  # manipulation samples


class CorruptSample(ValueError):
    """A sample that cannot be read; the message names shard and key."""


@dataclass
class TaskData:
    """The index of one mix entry, as arrays (about 20 bytes a sample, shared by forked workers)."""

    name: str
    task_id: int
    shard_paths: list[str]
    shard_starts: np.ndarray  # first row of each shard; rows are grouped by shard
    shard_sizes: np.ndarray
    shard: np.ndarray  # int32 per row
    offset: np.ndarray  # int64 per row
    size: np.ndarray  # int64 per row
    keys: np.ndarray  # str per row, for error messages and tests
    tokenizer: dict
    image_size: int
    fingerprint: list  # per folder: manifest shard sha256s, so resuming over other data is refused
    too_long: int  # samples left out for exceeding the mix's max_tokens
    options: dict  # the shard options of the (first) folder: e.g. a manipulation folder's normalisation

    def __len__(self) -> int:
        return len(self.offset)


def load_task(name: str, folders: list[str], split: str, sources: list[str] | None = None,
              max_tokens: int | None = None) -> TaskData:
    """Join the index of one or more task folders for `split` (and `sources`, if given), checking they agree.

    Samples longer than max_tokens are left out here (and counted in `too_long`): the reference cuts
    them at collate time, which drops image placeholders and labels and desynchronises the frames.
    """
    paths, starts, sizes, shard_col, offsets, lengths, keys, fingerprint = [], [], [], [], [], [], [], []
    too_long = 0
    task = tokenizer = image_size = options = None
    for folder in folders:
        manifest = load_manifest(folder)
        if manifest.get("schema_version") not in READABLE_SCHEMAS:
            raise ValueError(f"{folder} holds shards of schema version {manifest.get('schema_version')}; this loader "
                             f"reads {', '.join(map(str, READABLE_SCHEMAS))}: write them again with this "
                             "streamvln-shards (--overwrite)")
        if split not in manifest["splits"]:
            raise ValueError(f"{folder} has no complete {split!r} split (it has {sorted(manifest['splits'])})")
        info = manifest["splits"][split]
        if task not in (None, manifest["task"]) or tokenizer not in (None, info["tokenizer"]) or \
                image_size not in (None, info["options"]["image_size"]):
            raise ValueError(f"mix entry {name!r}: {folder} differs from the other folders in task, tokenizer or image size")
        task, tokenizer, image_size = manifest["task"], info["tokenizer"], info["options"]["image_size"]
        options = options or info["options"]
        fingerprint.append([s["sha256"] for s in info["shards"]])
        filters = [("split", "==", split)] + ([("source", "in", sources)] if sources else [])
        total = pq.read_table(Path(folder) / "index.parquet", columns=["key"], filters=filters).num_rows
        if max_tokens is not None:
            filters.append(("n_tokens", "<=", max_tokens))
        table = pq.read_table(Path(folder) / "index.parquet", columns=["key", "shard", "offset", "size"],
                              filters=filters)
        too_long += total - table.num_rows
        shard_names = table.column("shard").to_numpy(zero_copy_only=False)
        order = {s["shard"]: i + len(paths) for i, s in enumerate(info["shards"])}
        shard_ids = np.array([order[s] for s in shard_names], dtype=np.int32)
        if len(shard_ids) and np.any(np.diff(shard_ids) < 0):
            raise ValueError(f"{folder}/index.parquet is not grouped by shard")
        counts = np.bincount(shard_ids - len(paths), minlength=len(info["shards"]))
        sizes.append(counts)
        starts.append(np.concatenate([[0], np.cumsum(counts)[:-1]]) + sum(len(o) for o in offsets))
        paths += [str(Path(folder) / s["shard"]) for s in info["shards"]]
        shard_col.append(shard_ids)
        offsets.append(table.column("offset").to_numpy())
        lengths.append(table.column("size").to_numpy())
        keys.append(table.column("key").to_numpy(zero_copy_only=False))
    if sources and not sum(len(o) for o in offsets):
        raise ValueError(f"mix entry {name!r}: no samples of sources {sources} in {folders} ({split})")
    if task not in TASK_IDS:
        raise ValueError(f"mix entry {name!r}: unknown task {task!r} (known: {', '.join(TASK_IDS)})")
    return TaskData(name, TASK_IDS[task], paths, np.concatenate(starts).astype(np.int64),
                    np.concatenate(sizes).astype(np.int64), np.concatenate(shard_col),
                    np.concatenate(offsets).astype(np.int64), np.concatenate(lengths).astype(np.int64),
                    np.concatenate(keys), tokenizer, image_size, fingerprint, too_long, options)


class SampleReader:
    """Reads samples by (path, offset, size) with a few open files kept per process."""

    def __init__(self, max_open: int = 16):
        self._files: OrderedDict[str, tuple[int, int]] = OrderedDict()  # path -> (fd, file size)
        self._max_open = max_open

    def _fd(self, path: str) -> tuple[int, int]:
        if path in self._files:
            self._files.move_to_end(path)
            return self._files[path]
        if len(self._files) >= self._max_open:
            os.close(self._files.popitem(last=False)[1][0])
        fd = os.open(path, os.O_RDONLY)
        self._files[path] = fd, os.fstat(fd).st_size
        return self._files[path]

    def read(self, path: str, offset: int, size: int, key: str, frames: bool = True) -> dict:
        """{"meta", "input_ids", "labels", "frames": [jpeg bytes]}; CorruptSample for anything unexpected.
        frames=False leaves the frames a sample references elsewhere in its shard unread (text-only scans)."""
        try:
            blob = os.pread(self._fd(path)[0], size, offset)
        except OSError as e:
            raise CorruptSample(f"{path}: cannot read sample {key}: {e}") from None
        if len(blob) != size:
            raise CorruptSample(f"{path}: sample {key} is cut short ({len(blob)} of {size} bytes)")
        sample = parse_members(blob, path, key)
        if frames and "frame_ranges" in sample["meta"]:
            sample["frames"] = self._referenced_frames(path, key, sample["meta"])
        return sample

    def _referenced_frames(self, path: str, key: str, meta: dict) -> list[bytes]:
        """The JPEGs a sample references by (offset, size) in its shard: nearby ranges in one read each."""
        fd, file_size = self._fd(path)
        ranges = meta["frame_ranges"]
        valid = isinstance(ranges, list) and len(ranges) == meta.get("n_frames") and all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and r[0] >= 0 and
            0 < r[1] <= MAX_FRAME_BYTES and r[0] + r[1] <= file_size for r in ranges)
        if not valid:
            raise CorruptSample(f"{path}: sample {key} has invalid frame_ranges (n_frames {meta.get('n_frames')}, "
                                f"shard of {file_size} bytes)")
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        frames: list[bytes] = [b""] * len(ranges)
        i = 0
        while i < len(order):  # a run of ranges at most a tar header apart: one pread
            j, start = i, ranges[order[i]][0]
            end = start + ranges[order[i]][1]
            while j + 1 < len(order) and ranges[order[j + 1]][0] - end <= 2 * tarfile.BLOCKSIZE:
                j += 1
                end = max(end, ranges[order[j]][0] + ranges[order[j]][1])
            try:
                blob = os.pread(fd, end - start, start)
            except OSError as e:
                raise CorruptSample(f"{path}: cannot read the frames of sample {key}: {e}") from None
            if len(blob) != end - start:
                raise CorruptSample(f"{path}: the frames of sample {key} are cut short")
            for n in order[i : j + 1]:
                offset, size = ranges[n]
                frames[n] = blob[offset - start : offset - start + size]
            i = j + 1
        return frames

    def close(self):
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def parse_members(blob: bytes, path: str, key: str) -> dict:
    """Decode only the known member types; anything else (a pickle, a .pth) is an error, never loaded."""
    raw = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for info in tar:
                member_key, _, ext = info.name.partition(".")
                if member_key != key or not info.isfile():
                    raise CorruptSample(f"{path}: member {info.name!r} does not belong to sample {key}")
                if not (ext == "json" or ext in TOKEN_MEMBERS or ext in ACTION_MEMBERS or FRAME_MEMBER.fullmatch(ext)):
                    raise CorruptSample(f"{path}: sample {key} has member {info.name!r}; only json, npy and "
                                        "jpg members are read (nothing is unpickled)")
                raw[ext] = tar.extractfile(info).read()
        meta = json.loads(raw["json"])
        ids, labels = (np.load(io.BytesIO(raw[m]), allow_pickle=False) for m in TOKEN_MEMBERS)
        arrays = {m[: -len(".npy")]: np.load(io.BytesIO(raw[m]), allow_pickle=False) for m in ACTION_MEMBERS if m in raw}
    except CorruptSample:
        raise
    except (tarfile.TarError, KeyError, ValueError, OSError) as e:
        raise CorruptSample(f"{path}: sample {key} does not parse: {type(e).__name__}: {e}") from None
    frames = [raw[k] for k in sorted(k for k in raw if k.endswith(".jpg"))]
    if "frame_ranges" in meta and frames:
        raise CorruptSample(f"{path}: sample {key} has both frame members and frame_ranges")
    if ids.shape != labels.shape or ids.ndim != 1 or len(frames) != meta.get("n_frames") and "frame_ranges" not in meta:
        raise CorruptSample(f"{path}: sample {key} is inconsistent (tokens {ids.shape}/{labels.shape}, "
                            f"{len(frames)} frames, json says {meta.get('n_frames')})")
    if arrays and not (set(arrays) == {"actions", "action_mask"} and arrays["actions"].ndim == 3
                       and arrays["actions"].shape[:2] == arrays["action_mask"].shape and arrays["actions"].shape[2] == 7
                       and arrays["actions"].dtype == np.float32):
        raise CorruptSample(f"{path}: sample {key} has inconsistent actions "
                            f"{ {k: (a.shape, str(a.dtype)) for k, a in arrays.items()} }")
    return {"meta": meta, "input_ids": ids, "labels": labels, "frames": frames, **arrays}
