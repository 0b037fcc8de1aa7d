"""Write shards: deterministic WebDataset tars, written under a temporary name and renamed when complete."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 3  # 3: navigation frames stored once per episode, referenced by byte range (docs/shards.md)
READABLE_SCHEMAS = (2, 3)  # 2: every sample carries its own frames; 1: before the co-training fidelity fixes
MAX_FRAME_BYTES = 64 << 20  # a frame reference larger than this is corrupt, not read


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Write-then-rename, so a reader or a re-run never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """One tar shard. Members carry fixed metadata (mtime 0, root, 0644) so bytes depend on content only.

    The tar is written as `<name>.tmp` and renamed by `close()`: a file with the final name is always
    complete. Its `.stats.json` sidecar is written by the caller after that, and marks the shard done.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = self.frames = 0

    def _add(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int, list[tuple[int, int]]]:
        if "." in key or "/" in key:
            raise ValueError(f"record key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        offset, data_ranges = self._tar.offset, []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            data_ranges.append((self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)))
        self.frames += sum(ext.endswith(".jpg") for ext, _ in members)
        return offset, self._tar.offset - offset, data_ranges

    def write(self, key: str, members: list[tuple[str, bytes]]) -> tuple[int, int]:
        """Add one sample's members as `<key>.<ext>`; returns (byte offset, byte size) of the sample.

        The range covers the members' headers and padded data, so reading exactly those bytes and
        parsing them as a tar yields the sample without touching the rest of the shard.
        """
        offset, size, _ = self._add(key, members)
        self.samples += 1
        return offset, size

    def write_frames(self, key: str, frames: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
        """Add a record of JPEGs that samples reference (not a sample): each frame's (data offset, size)."""
        return self._add(key, frames)[2]

    def close(self) -> dict:
        """Finish the tar, make it durable, rename it into place; returns its sha256 and size."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = sha256_file(self.tmp_path)
        size = self.tmp_path.stat().st_size
        os.replace(self.tmp_path, self.path)
        return {"sha256": digest, "bytes": size, "samples": self.samples, "frames": self.frames}

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def referenced_frames(tar_path: str | Path, meta: dict, members: dict[str, bytes]) -> list[bytes]:
    """A sample's frames in order: its own `fNNN.jpg` members, or the byte ranges its meta references."""
    if "frame_ranges" not in meta:
        return [members[k] for k in sorted(k for k in members if k.endswith(".jpg"))]
    with open(tar_path, "rb") as f:
        frames = []
        for offset, size in meta["frame_ranges"]:
            f.seek(offset)
            frames.append(f.read(size))
    return frames


def read_sample_bytes(tar_path: str | Path, offset: int, size: int) -> dict[str, bytes]:
    """Members of one sample read by its index byte range: {ext: bytes}."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        blob = f.read(size)
    members = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                raise ValueError(f"{tar_path}@{offset}: member {info.name!r} is not a regular file")
            members[info.name.split(".", 1)[1]] = tar.extractfile(info).read()
    return members
