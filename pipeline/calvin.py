"""CALVIN-format manipulation data: the split's annotations, RoboVLMs' windows and action chunks, action processing.

A split folder holds one `episode_XXXXXXX.npz` per frame (rgb_static, rgb_gripper, robot_obs,
scene_obs, rel_actions, ...) and `lang_annotations/auto_lang_ann.npy`, a pickled dict read here with
the restricted unpickler (pipeline/safe_pickle.py): `info.indx` holds (start, end) frame spans, end
inclusive, `language.ann` / `language.task` the instruction and task of each span.

Samples as RoboVLMs builds them (robovlms.md (a)): for span (s, e) every start frame
idx in range(s, e + 1 - W) gives one sample of W observation frames idx..idx+W-1 and, for each of
them, the chunk of N actions t..t+N-1. Positions past the span repeat its last frame and are
masked. RoboVLMs masks position j iff idx + j >= e, so a span's last frame e (inclusive by CALVIN's
own definition) is never trained on; here it is: valid iff idx + j <= e (docs/manip.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .safe_pickle import load_pickled_npy

ARM_CLIP = 0.65  # RoboVLMs' norm_min/norm_max for CALVIN's relative actions
FRAME_RE = re.compile(r"^(.*?)(\d+)\.npz$")


class CalvinError(ValueError):
    """A split folder that cannot be read: the message says which file and why."""


@dataclass(frozen=True)
class Span:
    index: int  # position in auto_lang_ann
    start: int
    end: int  # inclusive
    task: str
    instruction: str


@dataclass
class CalvinSplit:
    folder: Path
    prefix: str  # "episode_"
    digits: int  # 7
    spans: list[Span]

    def frame_path(self, frame: int) -> Path:
        return self.folder / f"{self.prefix}{frame:0{self.digits}d}.npz"


def read_split(folder: str | Path) -> CalvinSplit:
    """The naming pattern of the frame files (from the first one, as CALVIN's lookup) and the spans."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalvinError(f"{folder}: not a folder")
    first = next(iter(sorted(folder.glob("*.npz"))), None)
    match = FRAME_RE.match(first.name) if first else None
    if match is None:
        raise CalvinError(f"{folder}: no frame files (episode_XXXXXXX.npz)")
    ann_path = folder / "lang_annotations" / "auto_lang_ann.npy"
    if not ann_path.exists():
        ann_path = folder / "auto_lang_ann.npy"  # the fallback RoboVLMs reads
    if not ann_path.exists():
        raise CalvinError(f"{folder}: no lang_annotations/auto_lang_ann.npy")
    ann = load_pickled_npy(ann_path)
    try:
        indx, texts, tasks = ann["info"]["indx"], ann["language"]["ann"], ann["language"]["task"]
    except (KeyError, TypeError, IndexError) as e:
        raise CalvinError(f"{ann_path}: not a CALVIN language annotation (missing {e})") from None
    if not len(indx) == len(texts) == len(tasks):
        raise CalvinError(f"{ann_path}: {len(indx)} spans, {len(texts)} instructions, {len(tasks)} tasks")
    spans = []
    for i, ((s, e), text, task) in enumerate(zip(indx, texts, tasks)):
        if int(e) < int(s):
            raise CalvinError(f"{ann_path}: span {i} ends ({e}) before it starts ({s})")
        spans.append(Span(i, int(s), int(e), str(task), str(text)))
    return CalvinSplit(folder, match.group(1), len(match.group(2)), spans)


def span_windows(span: Span, window: int, chunk: int, skip: int = 1) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(start frame, frame ids [W + N - 1], valid [W + N - 1]) per sample of the span; ids past the span
    repeat its last frame, and are not valid."""
    out = []
    for idx in range(span.start, span.end + 1 - window, skip):
        ids = idx + np.arange(window + chunk - 1)
        valid = ids <= span.end
        out.append((idx, np.minimum(ids, span.end), valid))
    return out


def action_chunks(actions: np.ndarray, valid: np.ndarray, window: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per observation step t < W, the actions t..t+N-1: ([W, N, 7] float32, mask [W, N] bool)."""
    steps = np.arange(window)[:, None] + np.arange(chunk)[None, :]
    return actions[steps].astype(np.float32), valid[steps]


def normalize_actions(actions: np.ndarray, mode: str = "calvin", q01=None, q99=None) -> np.ndarray:
    """Arm dims to [-1, 1], gripper {-1, +1} to {0, 1}.

    calvin: clip to +-0.65, then 2 (a + 0.65) / 1.3 - 1 (RoboVLMs' norm_action for CALVIN);
    q99: clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) with per-dimension bounds (OXE-style data).
    """
    a = np.asarray(actions, dtype=np.float32).copy()
    arm = a[..., :6]
    if mode == "calvin":
        arm = 2.0 * (np.clip(arm, -ARM_CLIP, ARM_CLIP) + ARM_CLIP) / (2 * ARM_CLIP) - 1.0
    elif mode == "q99":
        lo, hi = np.asarray(q01, np.float32)[:6], np.asarray(q99, np.float32)[:6]
        arm = np.clip(2.0 * (arm - lo) / (hi - lo + 1e-8) - 1.0, -1.0, 1.0)
    else:
        raise ValueError(f"unknown action normalisation {mode!r} (calvin or q99)")
    a[..., :6] = arm
    a[..., 6] = (a[..., 6] > 0).astype(np.float32)  # -1 close -> 0, +1 open -> 1
    return a


def denormalize_actions(actions: np.ndarray, mode: str = "calvin", q01=None, q99=None) -> np.ndarray:
    """The inverse for execution: arm back to the data's range, gripper {0, 1} (or a probability) to -1 / +1."""
    a = np.asarray(actions, dtype=np.float32).copy()
    if mode == "calvin":
        a[..., :6] = 0.5 * (a[..., :6] + 1.0) * (2 * ARM_CLIP) - ARM_CLIP
    else:
        lo, hi = np.asarray(q01, np.float32)[:6], np.asarray(q99, np.float32)[:6]
        a[..., :6] = 0.5 * (a[..., :6] + 1.0) * (hi - lo) + lo
    a[..., 6] = np.where(a[..., 6] > 0.5, 1.0, -1.0)
    return a


class ActionTokenizer:
    """RoboVLMs' discretisation: 256 uniform bins on [lo, hi]; ids count down from the end of the vocabulary.

    orig = vocab size - special tokens - 10 (RoboVLMs' formula); a value's id is orig - digitize(a, bins),
    in [orig - 256, orig - 1], higher values getting lower ids; an id decodes to the centre of its bin.
    """

    def __init__(self, orig: int, bins: int = 256, lo: float = -1.0, hi: float = 1.0):
        self.orig, self.lo, self.hi = orig, lo, hi
        self.bins = np.linspace(lo, hi, bins)
        self.centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @classmethod
    def for_tokenizer(cls, tok, **kwargs) -> "ActionTokenizer":
        """RoboVLMs' orig, quirk included: it sums len() over the special-tokens map, which for a token
        given as a string counts its characters (Qwen2: 3 x len("<|endoftext|>") = 39), not tokens."""
        mapping = getattr(tok, "special_tokens_map_extended", None) or tok.special_tokens_map
        special = sum(len(v) for v in mapping.values())
        return cls(tok.vocab_size - special - 10, **kwargs)

    @property
    def id_range(self) -> tuple[int, int]:
        """[first, last] action token ids."""
        return self.orig - len(self.bins), self.orig - 1

    def encode(self, actions: np.ndarray) -> np.ndarray:
        return self.orig - np.digitize(np.clip(actions, self.lo, self.hi), self.bins)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self.centers[np.clip(self.orig - np.asarray(ids) - 1, 0, len(self.centers) - 1)]
