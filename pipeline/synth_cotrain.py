"""Demo co-training data: small synthetic sources in the real formats (mp4 videos, ScanNet scene folders, MMC4 jsonl).

Every answer can be read off the pictures (a ball's colour and direction, a box's and a wall's colour,
the shape in a photo), so a model trained on them can beat guessing, and the evaluation shows it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from .synth import COLOURS

NAMES = list(COLOURS)
SHAPES = ("circle", "square", "triangle")
FILLER = ("The weather was mild that week.", "We took many pictures along the way.",
          "Everyone agreed it was worth the trip.", "More posts will follow soon.",
          "Some readers asked about the camera.", "The light was best in the morning.")


def _bgr(name: str) -> tuple[int, int, int]:
    r, g, b = COLOURS[name]
    return int(b), int(g), int(r)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- video QA


def write_video(path: Path, colour: str, direction: str, seconds: int, fps: int, rng: np.random.Generator) -> None:
    """An mp4 (MPEG-4 part 2, opencv's mp4v) of a ball crossing the frame to the left or right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = 160, 120
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    background = np.full((h, w, 3), int(rng.integers(90, 160)), np.uint8)
    y = int(rng.integers(35, 85))
    n = seconds * fps
    for i in range(n):
        t = i / max(n - 1, 1)
        x = int(20 + t * (w - 40)) if direction == "right" else int(w - 20 - t * (w - 40))
        frame = background.copy()
        cv2.circle(frame, (x, y), 16, _bgr(colour), -1)
        writer.write(frame)
    writer.release()


def video_records(root: Path, source: str, count: int, rng: np.random.Generator) -> list[dict]:
    records = []
    for i in range(count):
        colour, direction = str(rng.choice(NAMES)), str(rng.choice(["left", "right"]))
        seconds, fps = int(rng.integers(3, 13)), int(rng.choice([5, 10]))
        name = f"clip_{i:04d}.mp4"
        write_video(root / source / name, colour, direction, seconds, fps, rng)
        records.append({"id": f"{source}_{i:04d}", "video": name, "data_source": source, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the ball?"},
            {"from": "gpt", "value": f"The ball is {colour}."},
            {"from": "human", "value": "Which way does the ball move?"},
            {"from": "gpt", "value": f"It moves to the {direction}."},
        ]})
    return records


def write_videoqa(out: Path, count: int, val_count: int, rng: np.random.Generator) -> None:
    """Two LLaVA-Video-178K-style files and a data config that samples them; a held-out file."""
    videos = out / "videos"
    half = count // 2
    _write_json(out / "academic.json", video_records(videos, "academic", half, rng))
    # Written with a third more than the config keeps: random:75% selects about `count - half` of them.
    _write_json(out / "youtube.json", video_records(videos, "youtube", round((count - half) * 4 / 3), rng))
    (out / "data_config.yaml").write_text(
        "# LLaVA-Video-style data config: json paths are relative to this file\n"
        "datasets:\n"
        "  - json_path: academic.json\n    sampling_strategy: all\n"
        "  - json_path: youtube.json\n    sampling_strategy: random:75%\n")
    _write_json(out / "val.json", video_records(videos, "heldout", val_count, rng))


# ---------------------------------------------------------------- ScanQA / SQA3D


def write_scene(folder: Path, box: str, wall: str, frames: int, rng: np.random.Generator) -> None:
    """A ScanNet posed-image folder: NNNNN.jpg colour frames of a slow pan, plus pose .txt files (ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = 160, 120
    start = float(rng.uniform(0, 2 * np.pi))
    for i in range(frames):
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = _bgr(wall)
        img[h // 2 :] = (90, 110, 130)
        x = int(w / 2 + 50 * np.sin(start + i / 25))
        cv2.rectangle(img, (x - 14, h // 2 - 4), (x + 14, h // 2 + 22), _bgr(box), -1)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (folder / f"{i:05d}.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")


def write_scanqa(out: Path, scenes: int, val_scenes: int, rng: np.random.Generator) -> None:
    """Scene folders under scenes/posed_images; ScanQA-style (box colour) and SQA3D-style (wall) questions."""
    files = {"scanqa": [], "sqa3d": [], "val": []}
    for s in range(scenes + val_scenes):
        scene = f"scene{s:04d}_00"
        box, wall = rng.choice(NAMES, size=2, replace=False)
        write_scene(out / "scenes" / "posed_images" / scene, str(box), str(wall), int(rng.integers(40, 200)), rng)
        video = f"posed_images/{scene}"
        qa = [("scanqa", "<video>\nWhat colour is the box on the floor?", f"It is {box}."),
              ("sqa3d", "<video>\nI am standing in the room. What colour are the walls around me?", f"They are {wall}.")]
        for kind, question, answer in qa:
            target = "val" if s >= scenes else kind
            files[target].append({"id": f"{scene}_{kind}", "video": video, "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    for name, records in files.items():
        _write_json(out / f"{name}.json", records)


# ---------------------------------------------------------------- MMC4


def write_photo(path: Path, colour: str, shape: str, rng: np.random.Generator) -> None:
    img = np.full((96, 96, 3), int(rng.integers(200, 250)), np.uint8)
    if shape == "circle":
        cv2.circle(img, (48, 48), 30, _bgr(colour), -1)
    elif shape == "square":
        cv2.rectangle(img, (20, 20), (76, 76), _bgr(colour), -1)
    else:
        cv2.fillPoly(img, [np.array([[48, 14], [82, 80], [14, 80]], np.int32)], _bgr(colour))
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def mmc4_documents(images: Path, prefix: str, count: int, rng: np.random.Generator) -> list[dict]:
    images.mkdir(parents=True, exist_ok=True)
    docs = []
    for d in range(count):
        text = [str(rng.choice(FILLER))]
        info = []
        for k in range(int(rng.integers(1, 4))):
            colour, shape = str(rng.choice(NAMES)), str(rng.choice(SHAPES))
            name = f"{prefix}_{d:04d}_{k}.jpg"
            write_photo(images / name, colour, shape, rng)
            info.append({"image_name": name, "matched_text_index": len(text), "raw_url": f"https://example.com/{name}"})
            text += [f"This photo shows a {colour} {shape}.", str(rng.choice(FILLER))]
        if d % 10 == 0:
            text.append("Tip: write <image> where a picture goes.")  # a literal tag, escaped by the reader
        info.reverse()  # listed out of order, as MMC4 may: the reference orders them by sentence
        docs.append({"url": f"https://example.com/{prefix}/{d}", "text_list": text, "image_info": info,
                     "similarity_matrix": [[0.3] * len(text) for _ in info]})
    return docs


def write_mmc4(out: Path, count: int, val_count: int, rng: np.random.Generator) -> None:
    for name, n in (("docs", count), ("val", val_count)):
        docs = mmc4_documents(out / "images", name, n, rng)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


def write_cotrain_demo(out: str | Path, *, count: int = 80, val_count: int = 16, seed: int = 0) -> dict:
    """Write data/demo/{videoqa,scanqa,mmc4}; returns the folders written."""
    out = Path(out)
    rng = np.random.default_rng(seed + 1000)
    write_videoqa(out / "videoqa", count, val_count, rng)
    write_scanqa(out / "scanqa", count // 2, val_count // 2, rng)
    write_mmc4(out / "mmc4", count, val_count, rng)
    return {name: out / name for name in ("videoqa", "scanqa", "mmc4")}
