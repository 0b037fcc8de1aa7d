"""Co-training tasks (video QA, ScanQA/SQA3D, MMC4): plan records into shards and build each record's sample."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .config import CotrainShardConfig, MMC4ShardConfig, ScanQAShardConfig, VideoQAShardConfig
from .convo_reader import DatasetSpec, Document, Record, read_conversations, read_mmc4
from .cotrain_dialogue import DialogueError, chat_turns, mmc4_images, mmc4_turns, remove_noisy_marker, scene_qa_turns, \
    time_instruction, video_qa_turns
from .images import FrameError, encode_array, resize_frame
from .qwen_tokenizer import load_tokenizer, tokenizer_info
from .reader import AnnotationError, Reject
from .runner import Sample, group_units, planning_section, run_shards
from .shard_writer import SCHEMA_VERSION, sha256_file
from .tokens import IGNORE_INDEX, IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER, TokenIds, tokenize_dialogue
from .video_frames import MediaError, list_scene_images, open_video, scene_frame_plan


def sample_key(unit: Record | Document) -> str:
    """Unique within a task folder: file stems are distinct and positions unique within a file."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{unit.file}-{unit.position:07d}-{unit.episode_id[:48]}")


def _reject(unit, reason: str) -> tuple[list, list[Reject]]:
    return [], [Reject(unit.ref, reason, unit.source, unit.episode_id)]


def make_sample(task: str, unit, turns, n_frames: int, load_frames: Callable[[], list[bytes]], meta: dict,
                cfg: CotrainShardConfig, tok, ids: TokenIds) -> tuple[list[Sample], list[Reject]]:
    """Tokenise the conversation and check it against its frames; one sample or the reason there is none.

    The frames (decoding, resizing, encoding: the expensive part) are loaded only for a sample that passes."""
    input_ids, labels = tokenize_dialogue(tok, ids, chat_turns(turns))
    if len(input_ids) > cfg.max_tokens:
        return _reject(unit, f"too many tokens: {len(input_ids)} > max_tokens {cfg.max_tokens}")
    n_images, n_memory = int((input_ids == IMAGE_PLACEHOLDER).sum()), int((input_ids == MEMORY_PLACEHOLDER).sum())
    if n_images != n_frames or n_memory:
        return _reject(unit, f"media tokens: {n_images} <image> and {n_memory} <memory> in the text for "
                             f"{n_frames} frames")
    try:
        frames = load_frames()
    except MediaError as e:
        return _reject(unit, str(e))
    key = sample_key(unit)
    meta = {"schema_version": SCHEMA_VERSION, "task": task, "key": key, "source": unit.source,
            "episode_id": unit.episode_id, "file": unit.file, "position": unit.position, **meta,
            "turns": [list(t) for t in turns], "n_history": 0, "n_frames": n_frames, "time_ids": [],
            "image_size": cfg.image_size, "n_tokens": len(input_ids), "n_labels": int((labels != IGNORE_INDEX).sum())}
    row = {"source": unit.source, "episode": unit.episode_id, "instruction": 0, "start": 0,
           **{f: meta[f] for f in ("n_frames", "n_history", "n_tokens", "n_labels")}}
    return [Sample(key, meta, input_ids, labels, frames, row)], []


# ---------------------------------------------------------------- builders (one record -> one sample)


def build_videoqa(record: Record, root: Path, cfg: VideoQAShardConfig, tok, ids: TokenIds):
    try:
        clip = open_video(str(root / record.media), cfg.frames_upbound, cfg.video_fps, cfg.force_sample)
    except MediaError as e:
        return _reject(record, str(e))
    time_text = time_instruction(clip.seconds, clip.times) if cfg.add_time_instruction else None
    turns = video_qa_turns(record.turns, len(clip.indices), time_text, cfg.image_to_front)
    if cfg.remove_noisy_marker:
        turns = remove_noisy_marker(turns)
    meta = {"video": record.media, "frame_indices": clip.indices, "frame_times": clip.times,
            "video_seconds": clip.seconds}
    return make_sample("videoqa", record, turns, len(clip.indices),
                       lambda: [encode_array(f, cfg.image_size, cfg.jpeg_quality) for f in clip.decode()],
                       meta, cfg, tok, ids)


def _encode_files(folder: Path, names: list[str], cfg: CotrainShardConfig, reason: str) -> list[bytes]:
    """Each distinct file decoded and encoded once (scene frames repeat when a scene is short)."""
    encoded = {}
    for name in names:
        if name not in encoded:
            path = folder / name
            if not path.is_file():
                raise MediaError(f"missing {reason}: {path}")
            try:
                encoded[name] = resize_frame(str(path), cfg.image_size, cfg.jpeg_quality)
            except FrameError as e:
                raise MediaError(f"corrupt {reason}: {e}") from None
    return [encoded[n] for n in names]


def build_scanqa(record: Record, root: Path, cfg: ScanQAShardConfig, tok, ids: TokenIds):
    folder = root / record.media
    try:
        names = scene_frame_plan(list_scene_images(str(folder)), cfg.frame_stride, cfg.frames_upbound,
                                 cfg.frame_sampling)
    except MediaError as e:
        return _reject(record, str(e))
    turns = scene_qa_turns(record.turns, len(names))
    if cfg.remove_noisy_marker:
        turns = remove_noisy_marker(turns)
    return make_sample("scanqa", record, turns, len(names), lambda: _encode_files(folder, names, cfg, "frame"),
                       {"scene": record.media, "frame_files": names}, cfg, tok, ids)


def build_mmc4(doc: Document, root: Path, cfg: MMC4ShardConfig, tok, ids: TokenIds):
    images = mmc4_images(list(doc.images), cfg.max_images, cfg.image_choice)
    names = [name for name, _ in images]
    meta = {"images": names, "matched_text_index": [i for _, i in images]}
    return make_sample("mmc4", doc, mmc4_turns(doc.sentences, images, cfg.sentence_join), len(names),
                       lambda: _encode_files(root, names, cfg, "image"), meta, cfg, tok, ids)


BUILDERS = {"videoqa": build_videoqa, "scanqa": build_scanqa, "mmc4": build_mmc4}
CHECK_TURNS = {"videoqa": lambda turns: video_qa_turns(turns, 1), "scanqa": lambda turns: scene_qa_turns(turns, 1)}


# ---------------------------------------------------------------- planning and running


def plan_task(task: str, inputs: list[tuple[Path, DatasetSpec | None]], cfg: CotrainShardConfig,
              tokenizer: dict) -> tuple[dict, list[list]]:
    """Read and select every input file, reject what can be rejected without media, group records into shards.

    Like the navigation plan it records the inputs' contents (sha256), not where the media are mounted,
    so parts may run on machines that see the same data under other paths."""
    stems = [Path(p).stem for p, _ in inputs]
    if len(set(stems)) != len(stems):
        raise AnnotationError(f"input file names must be distinct (they name the samples): {stems}")
    units, rejects, source_info, per_source = [], [], [], {}
    for path, spec in inputs:
        if task == "mmc4":
            found, bad = read_mmc4(path)
            info = {"name": Path(path).stem, "sha256": sha256_file(path), "records": len(found) + len(bad)}
        else:
            found, bad, total, unmatched = read_conversations(path, spec, cfg.seed)
            info = {"name": Path(path).stem, "sha256": sha256_file(path), "records": total,
                    "sampling_strategy": spec.sampling_strategy if spec else "all",
                    "sampling_subset": spec.sampling_subset if spec else None, "selected": len(found) + len(bad),
                    "subset_unmatched": unmatched}
        ok = []
        for unit in found:
            try:
                if task in CHECK_TURNS:
                    CHECK_TURNS[task](unit.turns)
                ok.append(unit)
            except DialogueError as e:
                bad.append(Reject(unit.ref, f"media tokens: {e}", unit.source, unit.episode_id))
        for unit in ok:
            per_source.setdefault(unit.source, Counter())["episodes_in"] += 1
        for r in bad:
            per_source.setdefault(r.source, Counter()).update(episodes_in=1, episodes_rejected=1)
        units += ok
        rejects += bad
        source_info.append(info)
    counts = Counter()
    for c in per_source.values():
        counts.update(c)
    groups = group_units(units, [1] * len(units), cfg.samples_per_shard)
    plan = {"task": task, "split": cfg.split, "schema_version": SCHEMA_VERSION, "options": asdict(cfg),
            "sources": source_info, "tokenizer": tokenizer, "num_shards": len(groups),
            "shard_episodes": [len(g) for g in groups], "planning": planning_section(counts, per_source, rejects)}
    return plan, groups


def run_cotrain(task: str, inputs: list[tuple[str | Path, DatasetSpec | None]], root: str | Path, out_root: str | Path,
                cfg: CotrainShardConfig, tokenizer_path: str | Path, *, workers: int = 1, part: int = 0,
                num_parts: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (or finish writing) this part's shards of `task` into <out_root>/<task>; merge when all parts are done."""
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in 0..{num_parts - 1}, got {part}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"media root {root} is not a folder")
    tok = load_tokenizer(tokenizer_path)
    plan, groups = plan_task(task, [(Path(p), s) for p, s in inputs], cfg, tokenizer_info(tok))
    build = BUILDERS[task]

    def make_build():
        ids = TokenIds.of(tok)
        return lambda unit: build(unit, Path(root), cfg, tok, ids)

    return run_shards(Path(out_root) / task, plan, groups, make_build, workers=workers, part=part,
                      num_parts=num_parts, overwrite=overwrite, progress=progress)
