"""Sample frames for co-training: which frames of a video (decord) or of a ScanNet scene folder, as the reference."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np


class MediaError(ValueError):
    """A video or scene folder that is missing or cannot be decoded; the message starts with the reason."""


@dataclass
class VideoClip:
    """An opened video and the frames planned from it; decode() reads them (only once the sample is wanted)."""

    path: str
    reader: object  # decord.VideoReader
    indices: list[int]
    times: list[float]  # seconds, as the time instruction states them
    seconds: float  # the video's length

    def decode(self) -> np.ndarray:
        """[n, H, W, 3] uint8 RGB frames of `indices`."""
        import decord

        try:
            return self.reader.get_batch(self.indices).asnumpy()
        except (RuntimeError, decord.DECORDError) as e:
            raise MediaError(f"undecodable video: {self.path}: {str(e).splitlines()[0][:200]}") from None


def video_frame_plan(total: int, fps: float, frames_upbound: int, video_fps: int,
                     force_sample: bool) -> tuple[list[int], list[float]]:
    """Frame indices and their time stamps, as the reference (LLaVA-Video's decord reader).

    First every round(fps / video_fps)-th frame (about video_fps frames a second), stamped i / step.
    If that gives more than frames_upbound frames (or force_sample): linspace(0, total - 1,
    frames_upbound) cast to int, stamped i / fps. frames_upbound 0 means no bound. A step below 1
    (fps < video_fps / 2) is taken as 1, where the reference's range() would fail.
    """
    step = max(1, round(fps / video_fps))
    indices = list(range(0, total, step))
    times = [i / step for i in indices]
    if frames_upbound > 0 and (len(indices) > frames_upbound or force_sample):
        indices = np.linspace(0, total - 1, frames_upbound, dtype=int).tolist()
        times = [i / fps for i in indices]
    return indices, times


def open_video(path: str, frames_upbound: int, video_fps: int, force_sample: bool) -> VideoClip:
    """Open a video file with decord (one thread: workers are the parallelism) and plan its frames."""
    import decord

    if not os.path.isfile(path):
        raise MediaError(f"missing video: {path}")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps())
    except (RuntimeError, decord.DECORDError) as e:  # decord's errors for unreadable containers and streams
        raise MediaError(f"undecodable video: {path}: {str(e).splitlines()[0][:200]}") from None
    if total < 1 or not fps > 0:
        raise MediaError(f"undecodable video: {path} reports {total} frames at {fps} fps")
    indices, times = video_frame_plan(total, fps, frames_upbound, video_fps, force_sample)
    return VideoClip(path, reader, indices, times, total / fps)


def _frame_order(name: str):
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


SCENE_SAMPLINGS = ("reference", "linspace")


def scene_frame_plan(files: list[str], frame_stride: int, frames_upbound: int, sampling: str = "reference") -> list[str]:
    """Every frame_stride-th posed image (in frame order), then frames_upbound of them.

    reference (StreamVLN's ScanQA/SQA3D reader): kept[i * (len(kept) // N)] for i < N when more are kept
    (a prefix of the scene when len(kept) is not a multiple of N), cycling through kept when fewer;
    linspace: evenly over the whole scene (cast to int, so frames repeat when there are fewer).
    """
    kept = sorted(files, key=_frame_order)[::frame_stride]
    if not kept:
        return []
    n = frames_upbound
    if sampling == "linspace":
        return [kept[i] for i in np.linspace(0, len(kept) - 1, n, dtype=int).tolist()]
    if len(kept) > n:
        return [kept[i * (len(kept) // n)] for i in range(n)]
    return [kept[i % len(kept)] for i in range(n)]


def list_scene_images(folder: str) -> list[str]:
    """The JPEG names of a posed-image folder (its depth maps and pose .txt files are ignored)."""
    if not os.path.isdir(folder):
        raise MediaError(f"missing scene folder: {folder}")
    files = [f for f in os.listdir(folder) if re.search(r"\.jpe?g$", f, re.IGNORECASE)]
    if not files:
        raise MediaError(f"missing scene frames: no JPEG in {folder}")
    return files
