"""Decode: JPEG frames to uint8 RGB, the reference's train-time augmentation, and normalisation.

simplejpeg (libjpeg-turbo) decodes the stored 384x384 frames about 2.5x faster than OpenCV and
3x faster than PIL here (tests/bench/bench_loader.py measures all three), so it is the decoder.
The augmentation re-implements, without torchvision, the reference's
ColorJitter(brightness=0.2, saturation=0.2) -> RandomPosterize(4, p=0.5) ->
RandomAdjustSharpness(1.5, p=0.5) -> RandomAutocontrast(p=0.5), following torchvision's tensor
definitions (uint8 after every step) with OpenCV kernels, the random draws taken from a generator
the caller seeds.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg
import torch

# OpenCV's thread pool does not survive fork(): a DataLoader worker forked after the main process
# used it hangs in its first cv2 call. Frames are small and workers are the parallelism, so none.
cv2.setNumThreads(1)

SHARPNESS_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


class FrameDecodeError(ValueError):
    pass


def decode_jpeg(data: bytes, size: int) -> np.ndarray:
    """HWC uint8 RGB; the stored size must be the one the model expects."""
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
        raise FrameDecodeError(f"JPEG does not decode: {e}") from None
    if img.shape[:2] != (size, size):
        raise FrameDecodeError(f"frame is {img.shape[1]}x{img.shape[0]}, the mix expects {size}x{size}")
    return img


# The ops follow torchvision's tensor definitions, computed with OpenCV's saturating uint8 arithmetic:
# OpenCV rounds where torchvision truncates, so a pixel can differ by one level.


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return cv2.convertScaleAbs(img, alpha=factor)  # blend with black


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)  # ITU-R 601-2 luma
    return cv2.addWeighted(img, factor, gray, 1.0 - factor, 0.0)


def posterize(img: np.ndarray, bits: int = 4) -> np.ndarray:
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def adjust_sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a 3x3 smoothed copy whose one-pixel border is the original (torchvision's definition)."""
    degenerate = cv2.filter2D(img, -1, SHARPNESS_KERNEL, borderType=cv2.BORDER_REPLICATE)
    degenerate[0], degenerate[-1], degenerate[:, 0], degenerate[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return cv2.addWeighted(img, factor, degenerate, 1.0 - factor, 0.0)


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel to 0..255 through a lookup table; a flat channel is left as it is."""
    extremes = [cv2.minMaxLoc(channel)[:2] for channel in cv2.split(img)]
    lo, hi = (np.array(v, dtype=np.float32) for v in zip(*extremes))
    levels = np.arange(256, dtype=np.float32)[:, None]
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1.0), 1.0)
    table = np.where(hi > lo, (levels - lo) * scale, levels)
    table = np.clip(np.floor(table), 0, 255).astype(np.uint8)
    return cv2.LUT(img, table.reshape(256, 1, img.shape[-1]))


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference's per-frame train-time augmentation, every draw from `rng`."""
    brightness, saturation = rng.uniform(0.8, 1.2, size=2)
    for op in rng.permutation(2):  # ColorJitter applies its transforms in a random order
        img = adjust_brightness(img, brightness) if op == 0 else adjust_saturation(img, saturation)
    if rng.random() < 0.5:
        img = posterize(img, 4)
    if rng.random() < 0.5:
        img = adjust_sharpness(img, 1.5)
    if rng.random() < 0.5:
        img = autocontrast(img)
    return img


def normalize_(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 255] float -> (x / 255 - 0.5) / 0.5, the reference's normalisation, in place for float."""
    if images.dtype == torch.uint8:
        images = images.float()
    return images.mul_(2.0 / 255.0).sub_(1.0)
