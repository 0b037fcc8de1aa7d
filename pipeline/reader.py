"""Read: load StreamVLN trajectory sources (annotations.json + images/<video>/rgb/*.jpg) and validate episodes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .frames import ACTION_IDS


class AnnotationError(ValueError):
    """An annotations file that cannot be read at all: nothing of the run starts."""


@dataclass(frozen=True)
class Episode:
    """A validated annotation entry. `position` is its index in annotations.json."""

    source: str
    root: str
    position: int
    episode_id: str
    video: str
    instructions: tuple[str, ...]
    actions: tuple[int, ...]
    descriptions: tuple[str, ...] | None = None  # per frame, what it shows (the simulator's describing expert)

    @property
    def ref(self) -> str:
        """How rejects and errors name this input."""
        return f"{self.source}/annotations.json[{self.position}] id={self.episode_id}"

    @property
    def frame_dir(self) -> str:
        return os.path.join(self.root, self.video, "rgb")


@dataclass(frozen=True)
class Reject:
    input: str
    reason: str
    source: str = ""
    episode_id: str = ""
    level: str = "episode"  # or "sample": one sample of an otherwise usable episode

    def to_json(self) -> dict:
        return {"input": self.input, "reason": self.reason, "source": self.source, "episode_id": self.episode_id,
                "level": self.level}


def load_annotations(path: Path) -> list:
    """The raw JSON list; AnnotationError naming the file and line/column for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: top level must be a JSON list, got {type(data).__name__}")
    return data


def _validate(entry, source: str, root: str, position: int) -> Episode | Reject:
    where = f"{source}/annotations.json[{position}]"
    if not isinstance(entry, dict):
        return Reject(where, f"entry is {type(entry).__name__}, not an object", source)
    missing = [k for k in ("id", "video", "instructions", "actions") if k not in entry]
    episode_id = str(entry.get("id", ""))
    if missing:
        return Reject(where, f"missing key(s): {', '.join(missing)}", source, episode_id)
    where += f" id={episode_id}"
    video, instructions, actions = entry["video"], entry["instructions"], entry["actions"]
    if not isinstance(video, str) or not video or os.path.isabs(video) or ".." in Path(video).parts:
        return Reject(where, f"video must be a relative path inside the source, got {video!r}", source, episode_id)
    if isinstance(instructions, str):
        instructions = [instructions]
    if not isinstance(instructions, list) or not instructions:
        return Reject(where, "instructions must be a string or a non-empty list of strings", source, episode_id)
    for k, text in enumerate(instructions):
        if not isinstance(text, str):
            return Reject(where, f"instruction {k} is {type(text).__name__}, not a string", source, episode_id)
        if not text.strip():
            return Reject(where, f"instruction {k} is empty", source, episode_id)
    if not isinstance(actions, list) or not all(type(a) is int for a in actions):
        return Reject(where, "actions must be a list of integers", source, episode_id)
    unknown = sorted({a for a in actions[1:] if a not in ACTION_IDS})
    if unknown:
        return Reject(where, f"unknown action id(s) {unknown}; known: 0 STOP, 1 FORWARD, 2 LEFT, 3 RIGHT", source, episode_id)
    descriptions = entry.get("descriptions")
    if descriptions is not None and (not isinstance(descriptions, list) or len(descriptions) != len(actions)
                                     or not all(isinstance(d, str) and d.strip() for d in descriptions)):
        return Reject(where, f"descriptions must be a list of {len(actions)} non-empty strings, one per frame",
                      source, episode_id)
    return Episode(source, root, position, episode_id, video, tuple(instructions), tuple(actions),
                   None if descriptions is None else tuple(descriptions))


def read_source(src: str | Path, name: str | None = None) -> tuple[list[Episode], list[Reject]]:
    """All entries of one source folder, in file order, split into valid episodes and rejects.

    Only the annotation file is read here; frame folders are checked when the episode is built, so
    planning a million episodes stays cheap.
    """
    src = Path(src)
    source = name or src.name
    data = load_annotations(src / "annotations.json")
    episodes, rejects, seen = [], [], set()
    for position, entry in enumerate(data):
        item = _validate(entry, source, str(src), position)
        if isinstance(item, Episode):
            if item.episode_id in seen:
                item = Reject(item.ref, "duplicate episode id in this source", source, item.episode_id)
            else:
                seen.add(item.episode_id)
        (episodes if isinstance(item, Episode) else rejects).append(item)
    return episodes, rejects


def list_frames(episode: Episode) -> list[str]:
    """Frame files of an episode sorted by name, as the reference lists them."""
    return sorted(f for f in os.listdir(episode.frame_dir) if not f.startswith("."))
