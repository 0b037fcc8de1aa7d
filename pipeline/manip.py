"""Manipulation task (CALVIN format): plan annotated spans into shards and build each span's RoboVLMs samples.

A span's frames are read once (np.load, no pickle), both cameras resized and encoded once and stored
in one frame record before its samples (schema 3); each sample references its W static (and W
gripper) frames and carries actions.npy [W, N, 7] (normalised) and action_mask.npy [W, N].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .calvin import CalvinError, CalvinSplit, Span, action_chunks, normalize_actions, read_split, span_windows
from .config import CalvinShardConfig
from .images import encode_array
from .qwen_tokenizer import load_tokenizer, tokenizer_info
from .reader import AnnotationError, Reject
from .runner import FrameRecord, Sample, group_units, planning_section, run_shards
from .shard_writer import SCHEMA_VERSION, sha256_file
from .tokens import IGNORE_INDEX

TASK = "manip"
FRAME_KEYS = {"rgb_static": 3, "rgb_gripper": 3, "rel_actions": 1, "robot_obs": 1}  # key: ndim


@dataclass(frozen=True)
class SpanUnit:
    """One annotated span of a split: the runner's unit (a shard holds whole spans)."""

    split: CalvinSplit
    span: Span
    source: str

    @property
    def episode_id(self) -> str:
        return f"span{self.span.index:06d}"

    @property
    def ref(self) -> str:
        return f"{self.split.folder}/auto_lang_ann[{self.span.index}] task={self.span.task}"


def read_frame(unit: SpanUnit, frame: int) -> dict:
    path = unit.split.frame_path(frame)
    if not path.is_file():
        raise CalvinError(f"missing frame file {path.name}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in FRAME_KEYS if k in npz.files}
    except (OSError, ValueError) as e:
        raise CalvinError(f"{path.name} does not load: {e}") from None
    for key, ndim in FRAME_KEYS.items():
        if key not in data:
            raise CalvinError(f"{path.name} has no {key}")
        if data[key].ndim != ndim:
            raise CalvinError(f"{path.name}: {key} has shape {data[key].shape}")
    if data["rel_actions"].shape != (7,) or not np.isfinite(data["rel_actions"]).all():
        raise CalvinError(f"{path.name}: rel_actions must be 7 finite values, got {data['rel_actions']}")
    for cam in ("rgb_static", "rgb_gripper"):
        if data[cam].shape[2] != 3 or data[cam].dtype != np.uint8:
            raise CalvinError(f"{path.name}: {cam} must be HxWx3 uint8, got {data[cam].shape} {data[cam].dtype}")
    return data


def build_span(unit: SpanUnit, cfg: CalvinShardConfig, tok) -> tuple[list[Sample], list[Reject]]:
    """Every sample of one span (RoboVLMs' windows), or the reason there are none."""
    span, W, N = unit.span, cfg.window, cfg.chunk
    windows = span_windows(span, W, N, cfg.skip_frames)
    try:
        frames = {f: read_frame(unit, f) for f in range(span.start, span.end + 1)}
    except CalvinError as e:
        return [], [Reject(unit.ref, str(e), unit.source, unit.episode_id)]
    prompt = cfg.prompt.format(instruction=span.instruction)
    input_ids = np.array(tok.encode(prompt, add_special_tokens=False), dtype=np.int32)
    if len(input_ids) > cfg.max_tokens:
        return [], [Reject(unit.ref, f"too many tokens: {len(input_ids)} > max_tokens {cfg.max_tokens}",
                           unit.source, unit.episode_id)]
    labels = np.full_like(input_ids, IGNORE_INDEX)  # the targets are the actions
    used = sorted({int(f) for _, ids, _ in windows for f in ids[:W]})
    names, jpegs = [], []
    for cam, prefix in (("rgb_static", "s"), ("rgb_gripper", "g"))[: 2 if cfg.use_hand_rgb else 1]:
        for f in used:
            names.append(f"{prefix}{f:07d}.jpg")
            jpegs.append(encode_array(frames[f][cam], cfg.image_size, cfg.jpeg_quality))
    record = FrameRecord(f"{unit.source}-{unit.episode_id}-frames", names, jpegs)
    position = {name: i for i, name in enumerate(names)}
    actions_all = np.stack([frames[f]["rel_actions"] for f in range(span.start, span.end + 1)])
    normalised = normalize_actions(actions_all, cfg.normalization, cfg.q01, cfg.q99)
    samples = []
    for idx, ids, valid in windows:
        actions, mask = action_chunks(normalised[ids - span.start], valid, W, N)
        obs = [int(f) for f in ids[:W]]
        refs = [position[f"s{f:07d}.jpg"] for f in obs] + ([position[f"g{f:07d}.jpg"] for f in obs]
                                                            if cfg.use_hand_rgb else [])
        key = f"{unit.source}-{unit.episode_id}-{idx:07d}"
        meta = {"schema_version": SCHEMA_VERSION, "task": TASK, "key": key, "source": unit.source,
                "episode_id": unit.episode_id, "span": [span.start, span.end], "span_index": span.index,
                "manip_task": span.task, "instruction": span.instruction, "prompt": prompt, "start": idx,
                "frame_ids": obs, "cameras": ["rgb_static", "rgb_gripper"][: 2 if cfg.use_hand_rgb else 1],
                "window": W, "chunk": N, "normalization": cfg.normalization, "n_history": 0, "n_frames": len(refs),
                "image_size": cfg.image_size, "n_tokens": len(input_ids), "n_labels": int(mask.sum())}
        row = {"source": unit.source, "episode": unit.episode_id, "instruction": span.index, "start": idx,
               **{f: meta[f] for f in ("n_frames", "n_history", "n_tokens", "n_labels")}}
        extra = {"actions.npy": actions.astype(np.float32), "action_mask.npy": mask.astype(np.uint8)}
        samples.append(Sample(key, meta, input_ids, labels, [], row, record, refs, extra))
    return samples, []


def plan_calvin(folder: Path, cfg: CalvinShardConfig, tokenizer: dict) -> tuple[dict, list[list[SpanUnit]]]:
    """Read the split's annotation, leave out excluded and too-short spans (rejects), group spans into shards."""
    try:
        split = read_split(folder)
    except CalvinError as e:
        raise AnnotationError(str(e)) from None
    source = cfg.source or folder.resolve().parent.name
    units, sizes, rejects = [], [], []
    excluded = set(cfg.exclude_tasks or [])
    for span in split.spans:
        unit = SpanUnit(split, span, source)
        n = len(span_windows(span, cfg.window, cfg.chunk, cfg.skip_frames))
        if span.task in excluded:
            rejects.append(Reject(unit.ref, "task excluded (exclude_tasks)", source, unit.episode_id))
        elif n == 0:
            rejects.append(Reject(unit.ref, f"span of {span.end - span.start + 1} frames is too short for a window "
                                            f"of {cfg.window}", source, unit.episode_id))
        else:
            units.append(unit)
            sizes.append(n)
    per_source = {source: Counter(episodes_in=len(split.spans), episodes_rejected=len(rejects))}
    ann = folder / "lang_annotations" / "auto_lang_ann.npy"
    groups = group_units(units, sizes, cfg.samples_per_shard)
    plan = {"task": TASK, "split": cfg.split, "schema_version": SCHEMA_VERSION, "options": asdict(cfg),
            "sources": [{"name": source, "annotations_sha256": sha256_file(ann if ann.exists() else folder / ann.name),
                         "spans": len(split.spans),
                         "tasks": dict(sorted(Counter(s.task for s in split.spans).items()))}],
            "tokenizer": tokenizer, "num_shards": len(groups), "shard_episodes": [len(g) for g in groups],
            "planning": planning_section(Counter(per_source[source]), per_source, rejects)}
    return plan, groups


def run_calvin(folder: str | Path, out_root: str | Path, cfg: CalvinShardConfig, tokenizer_path: str | Path, *,
               workers: int = 1, part: int = 0, num_parts: int = 1, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Write (or finish writing) this part's shards into <out_root>/manip; merge when all parts are done."""
    tok = load_tokenizer(tokenizer_path)
    plan, groups = plan_calvin(Path(folder), cfg, tokenizer_info(tok))
    return run_shards(Path(out_root) / TASK, plan, groups, lambda: (lambda unit: build_span(unit, cfg, tok)),
                      workers=workers, part=part, num_parts=num_parts, overwrite=overwrite, progress=progress)

