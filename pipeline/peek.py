"""Look inside a task folder as a person would: summary, one sample's dialogue and frames, verification."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .shard_writer import READABLE_SCHEMAS, read_sample_bytes, referenced_frames, sha256_file
from .task_dir import load_manifest
from .tokens import IGNORE_INDEX, IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER


def histogram(values: np.ndarray, bins: int = 8, width: int = 30) -> list[str]:
    if len(values) == 0:
        return ["  (no samples)"]
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(np.unique(values)))))
    top = counts.max()
    return [f"  {lo:8.0f} - {hi:<8.0f} {'#' * max(1 if c else 0, round(c / top * width)):<{width}} {c}"
            for c, lo, hi in zip(counts, edges[:-1], edges[1:])]


def summary(task: Path) -> str:
    manifest = load_manifest(task)
    index = pq.read_table(task / "index.parquet").to_pydict()
    lines = [f"{task}  task={manifest['task']}"]
    unit = {"nav": "episodes", "manip": "spans"}.get(manifest["task"], "records")
    for split, info in manifest["splits"].items():
        c = info["counts"]
        rows = [i for i, s in enumerate(index["split"]) if s == split]
        lines += [
            f"\n[{split}] {len(info['shards'])} shards, {c['samples_written']} samples, "
            f"{sum(s['bytes'] for s in info['shards']) / 1e6:.1f} MB",
            f"{unit}: {c['episodes_in']} in = {c['episodes_written']} written + {c['episodes_rejected']} rejected; "
            f"samples rejected: {c['samples_rejected']}",
            _frames_line(info["shards"], sum(index["n_frames"][i] for i in rows)),
            f"options: {json.dumps(info['options'], sort_keys=True)}",
            "per source:",
        ]
        for source, s in info["per_source"].items():
            lines.append(f"  {source:12s} {unit} in {s.get('episodes_in', 0):6d}  written {s.get('episodes_written', 0):6d}"
                         f"  rejected {s.get('episodes_rejected', 0):6d}  samples {s.get('samples_written', 0):7d}")
        for column, title in (("n_tokens", "text tokens"), ("n_frames", "frames"), ("n_labels", "labelled tokens")):
            values = np.array([index[column][i] for i in rows])
            stats = f" (min {values.min()}, mean {values.mean():.1f}, max {values.max()})" if len(values) else ""
            lines += [f"{title} per sample{stats}:", *histogram(values)]
        lines.append("rejects by reason:" if info["rejects_by_reason"] else "rejects: none")
        lines += [f"  {n:6d}  {reason}" for reason, n in info["rejects_by_reason"].items()]
    return "\n".join(lines)


def _frames_line(shards: list[dict], used: int) -> str:
    stored = sum(s.get("frames", 0) for s in shards)
    if not stored:
        return f"frames: {used} used by the samples (stored count not recorded: schema 2)"
    return f"frames: {stored} JPEGs stored for {used} used by the samples ({used / stored:.2f} uses each)"


def find_sample(task: Path, key: str) -> tuple[dict, dict[str, bytes]]:
    """The index row of `key` and its members, read by byte range."""
    table = pq.read_table(task / "index.parquet", filters=[("key", "==", key)]).to_pylist()
    if not table:
        raise KeyError(f"no sample {key!r} in {task}/index.parquet")
    row = table[0]
    return row, read_sample_bytes(task / row["shard"], row["offset"], row["size"])


def render_dialogue(tok, input_ids: np.ndarray, labels: np.ndarray, color: bool = True) -> str:
    """The token stream as text: labelled spans green (or [[...]] without colour), placeholders named."""
    out, span, span_labelled = [], [], None

    def flush():
        if span:
            text = tok.decode(span)
            if span_labelled:
                text = click.style(text, fg="green", bold=True) if color else f"[[{text}]]"
            out.append(text)

    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if token in (IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER):
            flush()
            span, span_labelled = [], None
            name = "<image>" if token == IMAGE_PLACEHOLDER else "<memory>"
            out.append(click.style(name, fg="cyan") if color else name)
            continue
        labelled = label != IGNORE_INDEX
        if labelled != span_labelled:
            flush()
            span, span_labelled = [], labelled
        span.append(token)
    flush()
    return "".join(out)


def frame_captions(meta: dict) -> list[str]:
    """What each stored frame is: history/current step (navigation), time stamp (video), file (scene, MMC4)."""
    if meta.get("task", "nav") == "nav":
        return ([f"history frame {i}" for i in meta.get("history_frames", [])] +
                [f"current frame {i}" for i in meta.get("current_frames", [])])
    if meta.get("task") == "manip":  # W static frames, then W gripper frames
        return [f"{cam.split('_')[1]} frame {f}" for cam in meta["cameras"] for f in meta["frame_ids"]]
    if "frame_times" in meta:
        return [f"frame {i} @ {t:.2f}s" for i, t in zip(meta["frame_indices"], meta["frame_times"])]
    return list(meta.get("frame_files") or meta.get("images") or [])


def contact_sheet(meta: dict, frames: list[bytes], thumb: int = 192, columns: int = 8) -> Image.Image:
    """Frames in stored order, each captioned (see frame_captions); history frames in orange."""
    captions = frame_captions(meta)
    captions += ["frame"] * (len(frames) - len(captions))
    rows = max(1, -(-len(frames) // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 16)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for n, (jpg, caption) in enumerate(zip(frames, captions)):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + 16)
        sheet.paste(Image.open(io.BytesIO(jpg)).convert("RGB").resize((thumb, thumb)), (x, y + 16))
        draw.text((x + 4, y + 2), caption, fill=(255, 200, 80) if caption.startswith("history") else (120, 220, 255))
    return sheet


ACTION_DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "grip")


def action_plot(actions: np.ndarray, mask: np.ndarray, width: int = 1536, height: int = 150) -> Image.Image:
    """One panel per action dimension: each step's chunk (N actions, normalised to [-1, 1]; the gripper 0/1)
    as a line, later steps lighter; masked positions (past the span) as dots."""
    W, N, D = actions.shape
    panel = width // D
    img = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    for d in range(D):
        x0 = d * panel
        draw.text((x0 + 4, 2), ACTION_DIMS[d], fill=(220, 220, 220))
        draw.line([(x0 + 4, height // 2 + 8), (x0 + panel - 4, height // 2 + 8)], fill=(70, 70, 70))
        for t in range(W):
            shade = 255 - int(160 * t / max(1, W - 1))
            points = [(x0 + 6 + (panel - 12) * k / max(1, N - 1),
                       height // 2 + 8 - (height // 2 - 16) * float(actions[t, k, d])) for k in range(N)]
            draw.line(points, fill=(80, shade, 255), width=1)
            for k, (x, y) in enumerate(points):
                if not mask[t, k]:
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=(255, 90, 90))
    return img


def _short(text: str) -> str:
    """A run of <image> tokens shown as one count, so a 32-frame turn stays readable."""
    return re.sub(r"(?:<image>){2,}", lambda m: f"<image>x{len(m.group()) // len('<image>')}", text)


def show_sample(task: Path, key: str, tok, sheet_path: Path | None, color: bool = True) -> str:
    row, members = find_sample(task, key)
    meta = json.loads(members["json"])
    input_ids = np.load(io.BytesIO(members["input_ids.npy"]), allow_pickle=False)
    labels = np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False)
    frames = referenced_frames(task / row["shard"], meta, members)
    lines = [f"{key}  ({row['shard']} @ {row['offset']}, {row['size']} bytes)"]
    lines += [f"  {k}: {v}" for k, v in meta.items() if k not in ("key", "turns", "frame_ranges")]
    if "turns" in meta:
        lines.append(f"\n--- {len(meta['turns']) // 2} exchanges ---")
        lines += [f"  {who:5s} {_short(text)!r}" for who, text in meta["turns"]]
    lines.append(f"\n--- frames ({len(frames)}) ---")
    lines += [f"  f{i:03d}  {caption}" for i, caption in enumerate(frame_captions(meta))]
    lines.append(f"\n--- dialogue ({len(input_ids)} tokens, {int((labels != IGNORE_INDEX).sum())} labelled"
                 f"{', labelled spans in green' if color else ', labelled spans in [[ ]]'}) ---")
    lines.append(render_dialogue(tok, input_ids, labels, color))
    actions = None
    if "actions.npy" in members:  # manipulation: each step's chunk of normalised actions
        actions = np.load(io.BytesIO(members["actions.npy"]), allow_pickle=False)
        mask = np.load(io.BytesIO(members["action_mask.npy"]), allow_pickle=False).astype(bool)
        lines.append(f"\n--- action chunks {list(actions.shape)} (normalised; gripper 1 = open; * = masked) ---")
        for t in range(actions.shape[0]):
            cells = " ".join(f"[{' '.join(f'{v:+.2f}' for v in a)}]{'' if m else '*'}"
                             for a, m in zip(actions[t][:3], mask[t][:3]))
            lines.append(f"  step {t}: {cells}{' ...' if actions.shape[1] > 3 else ''}")
    if sheet_path is not None:
        sheet = contact_sheet(meta, frames)
        if actions is not None:
            plot = action_plot(actions, mask, sheet.width)
            both = Image.new("RGB", (sheet.width, sheet.height + plot.height))
            both.paste(sheet, (0, 0))
            both.paste(plot, (0, sheet.height))
            sheet = both
        sheet.save(sheet_path)
        lines.append(f"contact sheet of {len(frames)} frames: {sheet_path}")
    return "\n".join(lines)


def verify(task: Path) -> list[str]:
    """Re-read every shard: sha256, sample count, every member parses, index offsets match, every frame a
    sample references is a JPEG member of its shard and every stored frame is used. [] = all good."""
    manifest = load_manifest(task)
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        return [f"{task}: schema version {manifest.get('schema_version')} cannot be read (this version reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))}): write the shards again"]
    index = pq.read_table(task / "index.parquet").to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for row in index:
        by_shard.setdefault(row["shard"], []).append(row)
    problems = []
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = task / shard["shard"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from manifest")
            problems += _verify_members(path, shard["samples"], by_shard.get(shard["shard"], []))
    return problems


def _verify_members(path: Path, expected: int, rows: list[dict]) -> list[str]:
    problems, exts = [], {}  # key -> its members' extensions: a sample has a json, a frame record only JPEGs
    offsets = {row["key"]: row for row in rows}
    jpegs, referenced = {}, set()  # (data offset, size) -> member name; ranges samples point at
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                exts.setdefault(key, set()).add(ext)
                if key in offsets and ext == "json" and info.offset != offsets[key]["offset"]:
                    problems.append(f"{path}: {key} index offset {offsets[key]['offset']} != {info.offset}")
                data = tar.extractfile(info).read() if info.isfile() else None
                problems += [f"{path}: {info.name}: {p}" for p in _check_member(ext, data)]
                if ext.endswith(".jpg"):
                    jpegs[(info.offset_data, info.size)] = info.name
                if ext == "json" and data is not None:
                    try:
                        referenced.update(tuple(r) for r in json.loads(data).get("frame_ranges", []))
                    except (ValueError, AttributeError, TypeError):
                        pass  # reported by _check_member
    except (tarfile.TarError, OSError) as e:
        return [f"{path}: unreadable tar: {e}"]
    samples = {k for k, e in exts.items() if "json" in e}
    frame_records = {k for k, e in exts.items() if all(x.endswith(".jpg") for x in e)} - samples
    if len(samples) != expected or len(rows) != expected:
        problems.append(f"{path}: {len(samples)} samples in tar, {len(rows)} in index, {expected} in manifest")
    problems += [f"{path}: a sample references bytes {r} that are no JPEG member" for r in sorted(referenced - set(jpegs))]
    stored = {r for r, name in jpegs.items() if name.partition(".")[0] in frame_records}
    problems += [f"{path}: {jpegs[r]} is stored but no sample references it" for r in sorted(stored - referenced)]
    return problems


def _check_member(ext: str, data: bytes | None) -> list[str]:
    if data is None:
        return ["not a regular file"]
    try:
        if ext == "json":
            json.loads(data)
        elif ext.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)
        elif ext.endswith(".jpg"):
            Image.open(io.BytesIO(data)).load()
        else:
            return [f"unexpected member type .{ext}"]
    except Exception as e:  # any parse failure is a finding, not a crash of the verifier
        return [f"does not parse: {e}"]
    return []
