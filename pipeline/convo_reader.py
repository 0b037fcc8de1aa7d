"""Read co-training sources: LLaVA-style conversation JSON (with data-config sampling) and MMC4 jsonl documents."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from .reader import AnnotationError, Reject, load_annotations

ROLES = ("human", "gpt")


def inside_root(path) -> bool:
    """A relative path that stays below the media root (no absolute paths, no '..')."""
    return isinstance(path, str) and bool(path) and not os.path.isabs(path) and ".." not in Path(path).parts


@dataclass(frozen=True)
class Record:
    """One validated conversation of a JSON file; `position` is its index in the file."""

    source: str  # the record's data_source, else the file's stem
    file: str  # file stem: names the record in keys and rejects
    position: int
    episode_id: str
    media: str  # video file or scene folder, relative to the media root
    turns: tuple[tuple[str, str], ...]  # (from, value), human/gpt alternating

    @property
    def ref(self) -> str:
        return f"{self.file}.json[{self.position}] id={self.episode_id}"


@dataclass(frozen=True)
class Document:
    """One validated MMC4 document; `position` is its line number (from 0) in the jsonl file."""

    source: str
    file: str
    position: int
    episode_id: str
    sentences: tuple[str, ...]
    images: tuple[tuple[str, int], ...]  # (image_name, matched_text_index) as listed

    @property
    def ref(self) -> str:
        return f"{self.file}.jsonl[{self.position}] id={self.episode_id}"


def turn_order_problem(conversations) -> str | None:
    """Why a conversation cannot be trained on, or None: it must be human, gpt, human, gpt, ... (ending on gpt)."""
    if not isinstance(conversations, list) or not conversations:
        return "empty conversation"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"bad turn: turn {i} is not a {{from, value}} mapping with a text value"
        if turn.get("from") != ROLES[i % 2]:
            roles = [t.get("from") if isinstance(t, dict) else None for t in conversations]
            return f"turn order not human/gpt alternating: {roles}"
    if len(conversations) % 2:
        return "turn order not human/gpt alternating: the last human turn has no gpt answer"
    return None


# ---------------------------------------------------------------- data-config sampling


@dataclass(frozen=True)
class DatasetSpec:
    json_path: str
    sampling_strategy: str = "all"
    sampling_subset: str | None = None


def parse_strategy(strategy: str) -> tuple[str, int | None, bool]:
    """'all' | 'first:N' | 'end:N' | 'random:N', N a count or a percentage 'P%' -> (kind, number, is_percent)."""
    if strategy == "all":
        return "all", None, False
    kind, _, number = strategy.partition(":")
    percent = number.endswith("%")
    digits = number[:-1] if percent else number
    if kind not in ("first", "end", "random") or not digits.isdigit() or int(digits) < 1 or \
            (percent and int(digits) > 100):
        raise AnnotationError(f"sampling_strategy {strategy!r}: expected all, first:N, end:N or random:N "
                              "with N >= 1 or a percentage 1%..100%")
    return kind, int(digits), percent


def select(entries: list, spec: DatasetSpec, seed: int, media_key: str = "video") -> list[int]:
    """Positions of the entries a data-config entry keeps, in the reference's order: its strategy first (N% is
    ceil(P/100 x all entries)), then its subset keywords, lower-cased, any of them in the lower-cased media
    path. random:N is seeded by seed and file name and keeps file order."""
    positions = list(range(len(entries)))
    kind, number, percent = parse_strategy(spec.sampling_strategy)
    if kind != "all":
        n = math.ceil(number * len(positions) / 100) if percent else number
        if kind == "first":
            positions = positions[:n]
        elif kind == "end":
            positions = positions[-n:] if n else []
        else:
            shuffled = list(positions)
            random.Random(f"{seed}|{Path(spec.json_path).name}").shuffle(shuffled)
            positions = sorted(shuffled[:n])
    words = subset_words(spec)
    if words:
        media = _media_paths(entries, media_key)
        positions = [p for p in positions if media[p] is not None and any(w in media[p] for w in words)]
    return positions


def subset_words(spec: DatasetSpec) -> list[str]:
    return [w.strip().lower() for w in (spec.sampling_subset or "").split(",") if w.strip()]


def _media_paths(entries: list, media_key: str) -> list[str | None]:
    return [e[media_key].lower() if isinstance(e, dict) and isinstance(e.get(media_key), str) else None
            for e in entries]


def unmatched_subset_words(entries: list, spec: DatasetSpec, media_key: str = "video") -> list[str]:
    """Subset keywords that match no media path of the whole file: a typo or a folder that is not there."""
    media = [m for m in _media_paths(entries, media_key) if m is not None]
    return [w for w in subset_words(spec) if not any(w in m for m in media)]


def read_conversations(path: Path, spec: DatasetSpec | None = None, seed: int = 0,
                       media_key: str = "video") -> tuple[list[Record], list[Reject], int, list[str]]:
    """The entries of a conversation JSON list that `spec` selects, validated; how many entries the file has;
    the subset keywords that match nothing in it.

    Selection runs on the raw list, as the reference's, so a broken entry is dropped by sampling exactly
    when the reference would; the selected broken ones are rejected. AnnotationError only if the file
    itself is unusable.
    """
    path = Path(path)
    entries = load_annotations(path)
    spec = spec or DatasetSpec(str(path))
    chosen = select(entries, spec, seed, media_key)
    records, rejects = [], []
    for pos in chosen:
        entry = entries[pos]
        if not isinstance(entry, dict):
            rejects.append(Reject(f"{path.stem}.json[{pos}]", "bad annotation: entry is not a mapping", path.stem))
            continue
        episode_id = str(entry.get("id", pos))
        source = str(entry.get("data_source") or path.stem)
        ref = f"{path.stem}.json[{pos}] id={episode_id}"
        media = entry.get(media_key)
        problem = turn_order_problem(entry.get("conversations"))
        media = f"{entry['data_source']}/{media}" if entry.get("data_source") and isinstance(media, str) else media
        if problem is None and not inside_root(media):
            problem = f"bad annotation: {media_key!r} is not a relative path inside the media root: {media!r}"
        if problem is not None:
            rejects.append(Reject(ref, problem, source, episode_id))
            continue
        turns = tuple((t["from"], t["value"]) for t in entry["conversations"])
        records.append(Record(source, path.stem, pos, episode_id, media, turns))
    return records, rejects, len(entries), unmatched_subset_words(entries, spec, media_key)


def load_data_config(path: Path) -> list[DatasetSpec]:
    """A data-config YAML: {datasets: [...]} or a bare list of {json_path, sampling_strategy, sampling_subset}.
    Relative json paths are taken relative to the YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AnnotationError(f"{path}: {e}") from None
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise AnnotationError(f"{path}: expected a list of datasets (or a 'datasets:' list)")
    specs = []
    for i, entry in enumerate(entries):
        known = {"json_path", "sampling_strategy", "sampling_subset"}
        if not isinstance(entry, dict) or "json_path" not in entry or set(entry) - known:
            raise AnnotationError(f"{path}: dataset {i} must be a mapping with json_path and optionally "
                                  f"sampling_strategy, sampling_subset; got {entry!r}")
        json_path = Path(entry["json_path"])
        json_path = json_path if json_path.is_absolute() else path.parent / json_path
        spec = DatasetSpec(str(json_path), str(entry.get("sampling_strategy", "all")), entry.get("sampling_subset"))
        parse_strategy(spec.sampling_strategy)  # fail before any work starts
        specs.append(spec)
    return specs


# ---------------------------------------------------------------- MMC4


def read_mmc4(path: Path) -> tuple[list[Document], list[Reject]]:
    """Every line of an MMC4 jsonl file, validated; a bad line is rejected, not fatal."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot be read: {e}") from None
    docs, rejects = [], []
    for pos, line in enumerate(lines):
        if not line.strip():
            continue
        ref = f"{path.stem}.jsonl[{pos}]"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.append(Reject(ref, f"bad annotation: not valid JSON ({e})", path.stem))
            continue
        episode_id = str(doc.get("doc_id", doc.get("url", pos))) if isinstance(doc, dict) else str(pos)
        problem = _document_problem(doc)
        if problem:
            rejects.append(Reject(f"{ref} id={episode_id}", problem, path.stem, episode_id))
            continue
        images = tuple((i["image_name"], i["matched_text_index"]) for i in doc["image_info"])
        docs.append(Document(path.stem, path.stem, pos, episode_id, tuple(doc["text_list"]), images))
    return docs, rejects


def _document_problem(doc) -> str | None:
    if not isinstance(doc, dict):
        return "bad annotation: line is not a mapping"
    text, images = doc.get("text_list"), doc.get("image_info")
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        return "bad annotation: text_list is not a list of sentences"
    if not any(t.strip() for t in text):
        return "empty conversation: the document has no text"
    if not isinstance(images, list) or not images:
        return "empty conversation: the document has no images"
    for info in images:
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(info, dict) or not inside_root(info.get("image_name")) or \
                type(index) is not int or not 0 <= index < len(text):
            return f"bad annotation: image_info entry {info!r} lacks image_name or a valid matched_text_index"
    return None
