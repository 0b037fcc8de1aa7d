"""Configs: typed dataclasses loaded strictly from YAML (unknown keys and wrong types are errors)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


# PyYAML follows YAML 1.1, which reads an exponent without a dot (1e-5, 3E4) as a string; YAML 1.2 and every
# user mean a number. Only a float field takes such a string, and only when it is exactly a decimal literal.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(name: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: {value!r} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is float and type(value) is int:
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    # bool is a subclass of int in Python, but `num_frames: true` is a mistake, not 1
    ok = type(value) is bool if hint is bool else isinstance(value, hint) and type(value) is not bool
    if not ok:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
                          f"known: {', '.join(sorted(names))}")
    values = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Defaults of `cls`, then the YAML file, then explicit overrides (None values are ignored)."""
    data = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(loaded, (dict, type(None))):
            raise ConfigError(f"{path}: top level must be a mapping")
        data.update(loaded or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(obj) -> str:
    return yaml.safe_dump(asdict(obj), sort_keys=False, allow_unicode=True)


@dataclass
class NavShardConfig:
    """Options of `streamvln-shards nav`; defaults are the reference's."""

    num_frames: int = 32  # F: actions per sample (chunk length)
    num_future_steps: int = 4  # K: actions per assistant turn, one current frame per turn
    num_history: int = 8  # H: history frames for chunks after the first
    remove_init_turns: bool = False
    history_mode: str = "exact"  # "exact" (at most H frames) or "reference" (its arange)
    image_size: int = 384
    jpeg_quality: int = 95
    # episode: each used frame stored once per episode, samples reference it by byte range (2-3x smaller);
    # sample: every sample carries its own copies (self-contained WebDataset samples, as schema 2)
    frame_storage: str = "episode"
    samples_per_shard: int = 256  # target; a shard holds whole episodes, so it can exceed this
    max_tokens: int = 32768  # longer samples are rejected (the reference would truncate them)
    seed: int = 0
    split: str = "train"
    # Beyond the reference, off by default: each answer first says what its frame shows, from the annotations'
    # "descriptions" (`streamvln-sim trajectories` with `describe: true`), then its actions. Episodes without
    # descriptions are rejected. The agent reads only the action symbols of an answer, so it drives either kind.
    describe: bool = False
    # With describe, per instruction this many more sample streams whose first decoy word (e.g. the goal's colour)
    # is swapped for another of the list; their actions are not labelled (they walk to the real goal), their
    # descriptions are: a description the instruction predicts is copied from it instead of read off the frame.
    describe_decoys: int = 0
    decoy_words: list[str] = field(default_factory=list)

    def validate(self):
        _check_positive(self, "num_frames", "num_future_steps", "num_history", "image_size", "samples_per_shard",
                        "max_tokens")
        if self.history_mode not in ("exact", "reference"):
            raise ConfigError(f"history_mode must be 'exact' or 'reference', got {self.history_mode!r}")
        if self.frame_storage not in ("episode", "sample"):
            raise ConfigError(f"frame_storage must be 'episode' or 'sample', got {self.frame_storage!r}")
        if self.describe_decoys < 0 or (self.describe_decoys and (not self.describe or len(self.decoy_words) < 2)):
            raise ConfigError("describe_decoys needs describe: true and at least two decoy_words")
        _check_output(self)


def _check_positive(cfg, *names: str):
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _check_output(cfg):
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality must be in 1..100, got {cfg.jpeg_quality}")
    if not cfg.split or not cfg.split.replace("_", "").isalnum():
        raise ConfigError(f"split must be a plain name like 'train' or 'val', got {cfg.split!r}")


@dataclass
class CotrainShardConfig:
    """Options every co-training task shares (`streamvln-shards videoqa | scanqa | mmc4`)."""

    image_size: int = 384
    jpeg_quality: int = 95
    samples_per_shard: int = 256  # one sample per input record
    max_tokens: int = 32768  # longer samples are rejected (the reference would truncate them)
    seed: int = 0  # random:N sampling
    split: str = "train"

    def validate(self):
        _check_positive(self, "image_size", "samples_per_shard", "max_tokens")
        _check_output(self)


@dataclass
class VideoQAShardConfig(CotrainShardConfig):
    """LLaVA-Video-178K conversations over mp4 files; defaults are the reference's (section 7)."""

    frames_upbound: int = 32  # at most this many frames (linspace over the video); 0: no bound
    video_fps: int = 1  # frames kept per second before the bound applies
    force_sample: bool = False  # always take frames_upbound frames by linspace
    add_time_instruction: bool = False  # the reference's "The video lasts for ..." text
    image_to_front: bool = True  # a single <image> inside the first turn moves to its front (reference)
    remove_noisy_marker: bool = True  # delete "QA_GT_caption_based_noisy" from every turn (reference)

    def validate(self):
        super().validate()
        _check_positive(self, "video_fps")
        if self.frames_upbound < 0 or (self.force_sample and self.frames_upbound < 1):
            raise ConfigError(f"frames_upbound must be >= 0 (>= 1 with force_sample), got {self.frames_upbound}")


@dataclass
class ScanQAShardConfig(CotrainShardConfig):
    """ScanQA / SQA3D conversations over ScanNet posed-image folders."""

    frame_stride: int = 10  # every 10th posed image is kept ...
    frames_upbound: int = 32  # ... then this many are taken (repeating when too few)
    frame_sampling: str = "reference"  # the reference's stride (a prefix of long scenes) | linspace (whole scene)
    remove_noisy_marker: bool = True  # delete "QA_GT_caption_based_noisy" from every turn (reference)

    def validate(self):
        super().validate()
        _check_positive(self, "frame_stride", "frames_upbound")
        if self.frame_sampling not in ("reference", "linspace"):
            raise ConfigError(f"frame_sampling must be 'reference' or 'linspace', got {self.frame_sampling!r}")


@dataclass
class MMC4ShardConfig(CotrainShardConfig):
    """MMC4 interleaved image-text documents."""

    max_images: int = 6  # images used per document
    image_choice: str = "reference"  # reference: the first 6 listed, then by sentence | sentence_order
    sentence_join: str = ""  # the reference glues sentences ("a.B"); " " separates them

    def validate(self):
        super().validate()
        _check_positive(self, "max_images")
        if self.image_choice not in ("reference", "sentence_order"):
            raise ConfigError(f"image_choice must be 'reference' or 'sentence_order', got {self.image_choice!r}")


@dataclass
class CalvinShardConfig:
    """Options of `streamvln-shards calvin`; defaults are RoboVLMs' CALVIN fine-tuning (robovlms.md (a), (e))."""

    window: int = 8  # W: observation steps per sample
    chunk: int = 10  # N: actions predicted per step (t..t+N-1)
    skip_frames: int = 1  # stride between a span's sample start frames
    use_hand_rgb: bool = True  # also store the gripper camera (frames W..2W-1 of a sample)
    normalization: str = "calvin"  # calvin: clip +-0.65, scale to [-1, 1]; q99: per-dimension q01/q99 bounds
    q01: list[float] | None = None  # q99 only: the 7 lower bounds (the gripper's are not used)
    q99: list[float] | None = None
    exclude_tasks: list[str] | None = None  # spans of these tasks are left out (counted)
    prompt: str = "What action should the robot take to {instruction}?"  # RoboVLMs' action-prediction prompt
    source: str | None = None  # the index's source name (default: the split folder's parent's name)
    image_size: int = 224  # RoboVLMs' image_size; both cameras resized to it once, here
    jpeg_quality: int = 95
    samples_per_shard: int = 256  # a shard holds whole spans, so it can exceed this
    max_tokens: int = 32768
    seed: int = 0
    split: str = "train"

    def validate(self):
        _check_positive(self, "window", "chunk", "skip_frames", "image_size", "samples_per_shard", "max_tokens")
        if self.normalization not in ("calvin", "q99"):
            raise ConfigError(f"normalization must be 'calvin' or 'q99', got {self.normalization!r}")
        if self.normalization == "q99" and not (self.q01 and self.q99 and len(self.q01) == len(self.q99) == 7):
            raise ConfigError("normalization q99 needs q01 and q99: 7 values each (e.g. from the dataset's statistics)")
        if "{instruction}" not in self.prompt:
            raise ConfigError("prompt must contain {instruction}")
        _check_output(self)
