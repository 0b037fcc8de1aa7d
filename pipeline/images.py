"""Images: decode a source frame (file or video array), resize it to the model's input size, encode it as JPEG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class FrameError(ValueError):
    """A frame that cannot be decoded."""


def resize_frame(path: str, size: int, quality: int) -> bytes:
    """JPEG bytes of the frame resized to size x size.

    PIL bicubic with aspect ratio not kept, as the SigLIP processor the reference uses; done once
    here so the loader only decodes. Any decode problem (truncated, corrupt, not an image) raises
    FrameError naming the file.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FrameError(f"cannot decode frame {path}: {e}") from None
    return _jpeg(im, quality)


def encode_array(rgb: np.ndarray, size: int, quality: int) -> bytes:
    """JPEG bytes of a decoded HxWx3 uint8 RGB frame (a video frame), resized as resize_frame."""
    im = Image.fromarray(rgb, "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return _jpeg(im, quality)


def _jpeg(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()
