"""Navigation task: plan episodes into shards, build each episode's samples, write and merge the shards."""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import NavShardConfig
from .dialogue import nav_dialogue
from .frames import Chunk, plan_chunks, skip_reason
from .images import FrameError, resize_frame
from .qwen_tokenizer import load_tokenizer, tokenizer_info
from .reader import AnnotationError, Episode, Reject, list_frames, read_source
from .runner import FrameRecord, Sample, group_units, planning_section, run_shards
from .shard_writer import SCHEMA_VERSION, sha256_file
from .tokens import IGNORE_INDEX, TokenIds, tokenize_dialogue

TASK = "nav"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def sample_key(episode: Episode, instruction: int | str, start: int) -> str:
    return f"{_safe(episode.source)}-{_safe(episode.episode_id)}-i{instruction}-s{start:04d}"


def sample_rng(seed: int, episode: Episode, instruction: int | str, start: int) -> random.Random:
    """An RNG per sample, so the conjunctions drawn do not depend on workers, parts or order."""
    digest = hashlib.sha256(f"{seed}|{episode.source}|{episode.episode_id}|{instruction}|{start}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def episode_chunks(episode: Episode, cfg: NavShardConfig) -> list[Chunk]:
    return plan_chunks(list(episode.actions), num_frames=cfg.num_frames, num_future_steps=cfg.num_future_steps,
                       num_history=cfg.num_history, remove_init_turns=cfg.remove_init_turns,
                       history_mode=cfg.history_mode)


def build_episode(episode: Episode, cfg: NavShardConfig, tok, ids: TokenIds) -> tuple[list[Sample], list[Reject]]:
    """Every sample of one episode, or the reasons it (or some of its samples) cannot be used."""

    def reject(reason: str, key: str = "") -> Reject:
        where = episode.ref + (f" sample={key}" if key else "")
        return Reject(where, reason, episode.source, episode.episode_id, "sample" if key else "episode")

    if not os.path.isdir(episode.frame_dir):
        return [], [reject(f"missing frame folder: {episode.frame_dir}")]
    files = list_frames(episode)
    if len(files) < len(episode.actions):
        return [], [reject(f"fewer frames than actions: {len(files)} frames in {episode.frame_dir} for {len(episode.actions)} actions")]
    if cfg.describe and episode.descriptions is None:
        return [], [reject("describe: true, but the episode has no descriptions (streamvln-sim trajectories "
                           "with describe: true writes them)")]
    chunks = episode_chunks(episode, cfg)
    kept, rejects = [], []
    for k, tag, instruction, decoy in instruction_variants(episode, cfg):
        for chunk in chunks:
            key = sample_key(episode, tag, chunk.start)
            described = [episode.descriptions[f] for f in chunk.current_frames] if cfg.describe else None
            turns = nav_dialogue(instruction, chunk.actions, has_history=chunk.start != 0,
                                 num_future_steps=cfg.num_future_steps,
                                 rng=sample_rng(cfg.seed, episode, tag, chunk.start), descriptions=described)
            input_ids, labels = tokenize_dialogue(tok, ids, turns)
            if decoy:  # the actions walk to another goal: only the descriptions are taught
                labels[np.isin(input_ids, action_token_ids(tok, turns))] = IGNORE_INDEX
            if len(input_ids) > cfg.max_tokens:
                rejects.append(reject(f"too many tokens: {len(input_ids)} > max_tokens {cfg.max_tokens}", key))
                continue
            kept.append((key, k, instruction, chunk, input_ids, labels, decoy))
    # Decode each needed frame once for the whole episode: chunks share history frames and every
    # instruction of an episode shares all of them.
    needed = sorted({i for *_, c, _, _, _ in kept for i in c.history_frames + c.current_frames})
    encoded = {}
    for i in needed:
        try:
            encoded[i] = resize_frame(os.path.join(episode.frame_dir, files[i]), cfg.image_size, cfg.jpeg_quality)
        except FrameError as e:
            return [], [reject(f"corrupt frame: {e}")]
    record = None
    if cfg.frame_storage == "episode":  # written once before the episode's samples, which point into it
        record = FrameRecord(f"{_safe(episode.source)}-{_safe(episode.episode_id)}-frames",
                             [f"{i:05d}.jpg" for i in needed], [encoded[i] for i in needed])
    position = {i: n for n, i in enumerate(needed)}
    samples = []
    for key, k, instruction, chunk, input_ids, labels, decoy in kept:
        frame_ids = chunk.history_frames + chunk.current_frames
        meta = {
            "schema_version": SCHEMA_VERSION, "task": TASK, "key": key, "source": episode.source,
            "episode_id": episode.episode_id, "video": episode.video, "instruction_index": k,
            "instruction": instruction, "start": chunk.start, "time_ids": chunk.time_ids, "actions": chunk.actions,
            "history_frames": chunk.history_frames, "current_frames": chunk.current_frames,
            "n_history": len(chunk.history_frames), "n_frames": len(frame_ids), "image_size": cfg.image_size,
            "n_tokens": len(input_ids), "n_labels": int((labels != IGNORE_INDEX).sum()),
            **({"decoy": True} if decoy else {}),  # a swapped goal word: only the descriptions are labelled
        }
        row = {"source": episode.source, "episode": episode.episode_id, "instruction": k, "start": chunk.start,
               **{f: meta[f] for f in ("n_frames", "n_history", "n_tokens", "n_labels")}}
        if record is None:
            samples.append(Sample(key, meta, input_ids, labels, [encoded[i] for i in frame_ids], row))
        else:
            samples.append(Sample(key, meta, input_ids, labels, [], row, record, [position[i] for i in frame_ids]))
    return samples, rejects


def instruction_variants(episode: Episode, cfg: NavShardConfig) -> list[tuple[int, int | str, str, bool]]:
    """(instruction index, key tag, instruction, decoy) per sample stream: each instruction as written, then
    `describe_decoys` copies with its first decoy word (a colour) swapped for another, drawn per copy. A decoy's
    answers still describe the frames, which the instruction then cannot predict: the description has to come
    from the image."""
    out = [(k, k, text, False) for k, text in enumerate(episode.instructions)]
    words = cfg.decoy_words
    for k, text in enumerate(episode.instructions):
        found = [w for w in re.findall(r"[A-Za-z]+", text) if w in words]
        for d in range(cfg.describe_decoys if found else 0):
            other = sample_rng(cfg.seed, episode, f"{k}d{d}", -1).choice([w for w in words if w != found[0]])
            out.append((k, f"{k}d{d}", re.sub(rf"\b{found[0]}\b", other, text), True))
    return out


def action_token_ids(tok, turns: list[tuple[str, str]]) -> np.ndarray:
    """The ids of the answers' action symbols (" ←←↑↑", "STOP"): pre-tokenised apart from the words before them,
    and never part of a description (letters, commas, full stops)."""
    symbols = [re.sub(r"^.*\. ", "", answer) for role, answer in turns if role == "assistant"]
    return np.unique(np.concatenate([tok(" " + s, add_special_tokens=False)["input_ids"] for s in symbols]))


# ---------------------------------------------------------------- planning


def plan_nav(sources: list[Path], cfg: NavShardConfig, tokenizer: dict) -> tuple[dict, list[list[Episode]]]:
    """Read every annotation file, reject what can be rejected without images, group episodes into shards.

    A shard holds whole episodes and closes once its planned samples reach samples_per_shard, so
    the grouping depends only on the annotations and options: never on workers, parts or timing.
    """
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names):
        raise AnnotationError(f"source folder names must be distinct (they name the sources): {names}")
    counts, per_source, rejects, kept, sizes = Counter(), {}, [], [], []
    source_info = []
    for src in sources:
        src = Path(src)
        episodes, early = read_source(src)
        source_info.append({"name": src.name, "annotations_sha256": sha256_file(src / "annotations.json")})
        per_source[src.name] = Counter(episodes_in=len(episodes) + len(early), episodes_rejected=len(early))
        for episode in episodes:
            chunks = episode_chunks(episode, cfg)
            if not chunks:
                early.append(Reject(episode.ref, skip_reason(list(episode.actions), cfg.remove_init_turns),
                                    episode.source, episode.episode_id))
                per_source[src.name]["episodes_rejected"] += 1
                continue
            kept.append(episode)
            sizes.append(len(chunks) * len(instruction_variants(episode, cfg)))
        rejects.extend(early)
    groups = group_units(kept, sizes, cfg.samples_per_shard)
    for c in per_source.values():
        counts.update(c)
    plan = {
        "task": TASK, "split": cfg.split, "schema_version": SCHEMA_VERSION, "options": asdict(cfg),
        "sources": source_info, "tokenizer": tokenizer, "num_shards": len(groups),
        "shard_episodes": [len(g) for g in groups],
        "planning": planning_section(counts, per_source, rejects),
    }
    return plan, groups


# ---------------------------------------------------------------- running


def nav_builder(cfg: NavShardConfig, tok):
    ids = TokenIds.of(tok)
    return lambda episode: build_episode(episode, cfg, tok, ids)


def run_nav(sources: list[str | Path], out_root: str | Path, cfg: NavShardConfig, tokenizer_path: str | Path, *,
            workers: int = 1, part: int = 0, num_parts: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (or finish writing) this part's shards into <out_root>/nav and merge when all parts are done."""
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in 0..{num_parts - 1}, got {part}")
    tok = load_tokenizer(tokenizer_path)
    plan, groups = plan_nav([Path(s) for s in sources], cfg, tokenizer_info(tok))
    return run_shards(Path(out_root) / TASK, plan, groups, lambda: nav_builder(cfg, tok), workers=workers, part=part,
                      num_parts=num_parts, overwrite=overwrite, progress=progress)
