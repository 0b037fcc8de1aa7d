"""Shared fixtures: the locally built Qwen2 tokenizer and tiny trajectory sources written at test time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.config import NavShardConfig
from pipeline.qwen_tokenizer import load_tokenizer
from pipeline.tokens import TokenIds

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = Path(os.environ.get("STREAMVLN_TOKENIZER", ROOT / "build" / "qwen2_tokenizer"))
    if not (path / "tokenizer.json").exists():
        pytest.fail(f"no tokenizer at {path}: run `make tokenizer` (make test does it)")
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def token_ids(tok) -> TokenIds:
    return TokenIds.of(tok)


def write_frames(folder: Path, n: int, size=(40, 30)) -> None:
    """n small JPEGs whose colour encodes their frame index, so tests can tell frames apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        Image.new("RGB", size, colour).save(folder / f"{i + 1:03d}.jpg", quality=95)


def write_mp4(path: Path, n: int, fps: int, size=(64, 48)) -> None:
    """Frame i is a flat grey of level 5*i, so the frames decoded can be told apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 5 * i, np.uint8))
    writer.release()


def write_source(root: Path, name: str, episodes: list[dict], frames: dict | None = None) -> Path:
    """A source folder: annotations.json as given, frames for each episode (len(actions) unless overridden)."""
    src = root / name
    src.mkdir(parents=True, exist_ok=True)
    for ep in episodes:
        if isinstance(ep, dict) and isinstance(ep.get("video"), str) and isinstance(ep.get("actions"), list):
            n = (frames or {}).get(ep["id"], len(ep["actions"]))
            if n is not None:
                write_frames(src / ep["video"] / "rgb", n)
    (src / "annotations.json").write_text(json.dumps(episodes))
    return src


def episode(eid, n_actions: int, instructions=("Walk to the door.",), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + n_actions)
    actions = [-1] + [int(a) for a in rng.integers(1, 4, size=n_actions - 1)]
    return {"id": eid, "video": f"images/ep_{eid}", "instructions": list(instructions), "actions": actions}


@pytest.fixture
def tiny_sources(tmp_path) -> list[Path]:
    """Two sources with episode lengths around the chunk boundaries and several instructions."""
    r2r = write_source(tmp_path / "data", "R2R", [
        episode(1, 33, ("Go to the kitchen.", "Walk into the kitchen and stop.")),
        episode(2, 4),
        episode(3, 65, ("Turn left at the sofa.",)),
        episode(4, 12, ("Exit the room.", "Leave the room.", "Go out.")),
    ])
    rxr = write_source(tmp_path / "data", "RxR", [episode(10, 31), episode(11, 64), episode(12, 40)])
    return [r2r, rxr]


@pytest.fixture
def small_cfg() -> NavShardConfig:
    return NavShardConfig(image_size=32, samples_per_shard=4)
