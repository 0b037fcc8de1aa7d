"""Task folder: the plan a run commits to, per-shard stats sidecars, and the merged index/manifest/rejects."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .shard_writer import SCHEMA_VERSION, write_json_atomic

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("source", pa.string()),
        ("episode", pa.string()),
        ("instruction", pa.int32()),
        ("start", pa.int32()),
        ("n_frames", pa.int32()),
        ("n_history", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_labels", pa.int32()),
    ]
)
COUNT_KEYS = ("episodes_in", "episodes_written", "episodes_rejected", "samples_written", "samples_rejected")


class PlanMismatch(RuntimeError):
    pass


def shard_name(split: str, shard_id: int) -> str:
    return f"{split}-{shard_id:06d}.tar"


def plan_path(out: Path, split: str) -> Path:
    return out / f"plan-{split}.json"


def stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name[: -len(".tar")] + ".stats.json")


def commit_plan(out: Path, plan: dict, overwrite: bool) -> None:
    """Record the plan, or check that a folder being resumed was started with the same one.

    Resuming under other options or inputs would mix two datasets in one folder, so it is refused.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = plan_path(out, plan["split"])
    if overwrite:
        for old in [path, *out.glob(f"{plan['split']}-*")]:
            old.unlink(missing_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(plan)):
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k))))
            raise PlanMismatch(
                f"{out} holds a {plan['split']} split written with different {', '.join(changed)}; "
                "use --overwrite to start over or another --out"
            )
    else:
        write_json_atomic(path, plan, indent=1)


def pending_shards(out: Path, split: str, shard_ids: list[int]) -> list[int]:
    """Shards without a stats sidecar; stale temporaries from a killed run are removed."""
    for tmp in out.glob(f"{split}-*.tmp"):
        tmp.unlink()
    return [i for i in shard_ids if not stats_path(out / shard_name(split, i)).exists()]


def finalize(out: Path) -> dict:
    """Merge every complete split's sidecars into index.parquet, rejects.jsonl and manifest.json.

    Returns {split: missing shard count}; only splits with nothing missing are merged, so a part of a
    Slurm array finishing early writes nothing misleading and the last one to finish merges all.
    """
    missing, splits, rows, rejects = {}, {}, [], []
    for path in sorted(out.glob("plan-*.json")):
        plan = json.loads(path.read_text())
        split = plan["split"]
        stats = []
        for i in range(plan["num_shards"]):
            sidecar = stats_path(out / shard_name(split, i))
            if sidecar.exists():
                stats.append(json.loads(sidecar.read_text()))
        missing[split] = plan["num_shards"] - len(stats)
        if missing[split]:
            continue
        counts, per_source, reasons = Counter(), {}, Counter()
        for part in [plan["planning"], *stats]:
            counts.update({k: part["counts"][k] for k in COUNT_KEYS})
            for source, c in part["per_source"].items():
                per_source.setdefault(source, Counter()).update(c)
            for reject in part["rejects"]:
                reasons[reject["reason"].split(":")[0]] += 1
                rejects.append({"split": split, **reject})
        for s in stats:
            rows.extend({"split": split, "shard": s["shard"], **row} for row in s["index"])
        splits[split] = {
            "options": plan["options"],
            "sources": plan["sources"],
            "tokenizer": plan["tokenizer"],
            "counts": dict(counts),
            "per_source": {k: dict(v) for k, v in sorted(per_source.items())},
            "rejects_by_reason": dict(sorted(reasons.items())),
            "shards": [{k: s[k] for k in ("shard", "sha256", "bytes", "samples", "frames")} for s in stats],
        }
    if splits:
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        tmp = out / "index.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(out / "index.parquet")
        tmp = out / "rejects.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects))
        tmp.replace(out / "rejects.jsonl")
        task = json.loads(next(out.glob("plan-*.json")).read_text())["task"]
        write_json_atomic(out / "manifest.json", {"schema_version": SCHEMA_VERSION, "task": task, "splits": splits}, indent=1)
    return missing


def load_manifest(task_dir: str | Path) -> dict:
    path = Path(task_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the shard set is incomplete or this is not a task folder")
    return json.loads(path.read_text())
