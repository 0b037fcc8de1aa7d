"""Collate: pad decoded samples into the reference's batch tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.tokens import IGNORE_INDEX

from .decode import normalize_


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (keys and other lists stay as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised; inside a DataLoader worker it is allocated in shared memory directly, so
    sending the batch to the main process does not copy it once more (as torch's default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate(samples: list[dict], *, pad_id: int, max_tokens: int, image_size: int, uint8: bool) -> dict:
    """Each sample: input_ids, labels (int32 arrays), frames (list of HWC uint8), time_ids, n_history, task_id
    (the reference's: 0 navigation, 1 video QA, ...), mix_id (its entry in the mix) and key.

    input_ids padded with pad_id and labels with -100, both cut to max_tokens (as the reference);
    attention_mask = input_ids != pad_id; images zero-padded to the most frames in the batch,
    [B, T, 3, H, W], float normalised, or uint8 for normalisation on the device; time_ids padded -1.
    """
    B = len(samples)
    length = min(max(len(s["input_ids"]) for s in samples), max_tokens)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    frames = max(len(s["frames"]) for s in samples)
    images = _batch_tensor((B, frames, 3, image_size, image_size), torch.uint8 if uint8 else torch.float32)
    steps = max(len(s["time_ids"]) for s in samples)
    time_ids = torch.full((B, steps), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        n = min(len(s["input_ids"]), length)
        input_ids[i, :n] = torch.from_numpy(s["input_ids"][:n].astype(np.int64))
        labels[i, :n] = torch.from_numpy(s["labels"][:n].astype(np.int64))
        for t, frame in enumerate(s["frames"]):
            images[i, t].copy_(torch.from_numpy(frame).permute(2, 0, 1))  # HWC uint8 -> CHW, any dtype
        if s["frames"] and not uint8:
            normalize_(images[i, : len(s["frames"])])
        images[i, len(s["frames"]) :] = 0  # padding frames are zeros, as the reference's
        time_ids[i, : len(s["time_ids"])] = torch.tensor(s["time_ids"], dtype=torch.long)
    n_images = torch.tensor([len(s["frames"]) for s in samples], dtype=torch.long)
    extra = {}
    if "actions" in samples[0]:  # manipulation samples: [B, W, N, 7] normalised actions, [B, W, N] mask
        shapes = {s["actions"].shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"manipulation samples of different window/chunk shapes in one batch: {sorted(shapes)}")
        extra = {"actions": torch.from_numpy(np.stack([s["actions"] for s in samples])),
                 "action_mask": torch.from_numpy(np.stack([s["action_mask"] for s in samples])),
                 "manip_tasks": [s["manip_task"] for s in samples]}
    return {**extra,
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": input_ids.ne(pad_id),
        "images": images,
        "time_ids": time_ids,
        "task_ids": torch.tensor([s["task_id"] for s in samples], dtype=torch.long),
        "mix_ids": torch.tensor([s["mix_id"] for s in samples], dtype=torch.long),
        "n_history": torch.tensor([s["n_history"] for s in samples], dtype=torch.long),
        "n_images": n_images,
        "keys": [s["key"] for s in samples],
    }
