"""Images: decode a source frame, resize it to the model's input size and re-encode it as JPEG."""

from __future__ import annotations

import io

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
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()
