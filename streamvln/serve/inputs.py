"""What clients send, checked before any work: a frame (JPEG or PNG, sides in range) and an instruction."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from .config import ServeConfig

# Text the prompt builder would read as a placeholder or a chat-format token: an instruction holding one
# would splice frames that do not exist (a crash) or forge turns. Refused, never escaped silently.
_MARKUP = re.compile(r"<(image|memory|video)>|<\|[^|>]*\|>", re.IGNORECASE)


class InputError(ValueError):
    """A request the service refuses: `status` (413 or 422), `kind` for the metrics, and a clear message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def decode_frame(data: bytes, cfg: ServeConfig) -> np.ndarray:
    """JPEG or PNG bytes -> HxWx3 uint8 RGB; the size is read from the header before anything is decoded."""
    if not data:
        raise InputError(422, "bad_image", "empty frame: send the JPEG or PNG bytes as the request body")
    if len(data) > cfg.max_upload_bytes:
        raise InputError(413, "too_large", f"frame of {len(data)} bytes exceeds max_upload_bytes "
                                          f"{cfg.max_upload_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ("JPEG", "PNG"):
                raise InputError(422, "bad_image", f"frame format {img.format} refused: send JPEG or PNG")
            w, h = img.size
            if not (cfg.min_image_side <= w <= cfg.max_image_side and cfg.min_image_side <= h <= cfg.max_image_side):
                raise InputError(422, "bad_image", f"frame of {w}x{h} pixels: each side must lie in "
                                                  f"[{cfg.min_image_side}, {cfg.max_image_side}]")
            rgb = np.asarray(img.convert("RGB"))
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(422, "bad_image", f"the frame could not be decoded as JPEG or PNG ({e})") from None
    return np.ascontiguousarray(rgb)


def check_instruction(text, cfg: ServeConfig) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(422, "bad_instruction", "instruction must be a non-empty string")
    if len(text) > cfg.max_instruction_chars:
        raise InputError(422, "bad_instruction", f"instruction of {len(text)} characters exceeds "
                                                f"max_instruction_chars {cfg.max_instruction_chars}")
    found = _MARKUP.search(text)
    if found:
        raise InputError(422, "bad_instruction", f"instruction contains {found.group(0)!r}: placeholders and "
                                                f"chat-format tokens are not allowed in an instruction")
    return text
