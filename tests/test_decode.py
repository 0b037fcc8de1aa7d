"""Augmentation ops against their torchvision definitions on hand-made pixels; decoding and size checks."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from streamvln.data.decode import (FrameDecodeError, adjust_brightness, adjust_saturation, adjust_sharpness, augment,
                                   autocontrast, decode_jpeg, normalize_, posterize)


def near(a, b):
    """OpenCV rounds where torchvision truncates: equal within one level."""
    return np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_brightness_and_saturation():
    img = np.array([[[100, 150, 200], [250, 10, 0]]], dtype=np.uint8)
    assert adjust_brightness(img, 1.2).tolist() == [[[120, 180, 240], [255, 12, 0]]]
    gray = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert near(adjust_saturation(img, 0.0), np.repeat(gray[..., None], 3, axis=2))  # factor 0: greyscale
    assert near(adjust_saturation(img, 0.5), np.clip(0.5 * img + 0.5 * gray[..., None], 0, 255))
    assert near(adjust_saturation(img, 1.5), np.clip(1.5 * img - 0.5 * gray[..., None], 0, 255))


def test_posterize_keeps_the_top_four_bits():
    img = np.array([[[0, 15, 16], [127, 200, 255]]], dtype=np.uint8)
    assert posterize(img, 4).tolist() == [[[0, 0, 16], [112, 192, 240]]]


def test_autocontrast_stretches_each_channel_and_leaves_flat_ones():
    img = np.array([[[50, 7, 9], [100, 7, 200]], [[150, 7, 9], [75, 7, 9]]], dtype=np.uint8)
    out = autocontrast(img)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert (out[..., 1] == 7).all()  # a flat channel is unchanged
    assert out[1, 1, 0] == int((75 - 50) * 255 / 100)


def test_sharpness_keeps_the_border_and_sharpens_the_inside():
    img = np.full((5, 5, 3), 100, dtype=np.uint8)
    img[2, 2] = 200
    out = adjust_sharpness(img, 1.5)
    assert (out[0] == 100).all() and (out[:, 0] == 100).all()
    blurred_centre = (8 * 100 + 5 * 200) / 13
    assert near(out[2, 2, 0], min(255, 1.5 * 200 - 0.5 * blurred_centre))
    blurred_next = (7 * 100 + 200 + 5 * 100) / 13
    assert near(out[2, 1, 0], 1.5 * 100 - 0.5 * blurred_next)
    assert out[2, 1, 0] < 100 < out[2, 2, 0] - 50  # the bright spot got brighter, its neighbour darker


def test_augment_is_seeded_and_varies():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = augment(img, np.random.default_rng([1, 2, 3]))
    b = augment(img, np.random.default_rng([1, 2, 3]))
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    outs = {augment(img, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) == 8


def test_decode_checks_size_and_reports_corruption():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, "JPEG")
    assert decode_jpeg(buf.getvalue(), 32).shape == (32, 32, 3)
    with pytest.raises(FrameDecodeError, match="frame is 32x32, the mix expects 64x64"):
        decode_jpeg(buf.getvalue(), 64)
    with pytest.raises(FrameDecodeError, match="does not decode"):
        decode_jpeg(b"\xff\xd8 nope", 32)


def test_normalize_matches_the_reference():
    x = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert torch.allclose(normalize_(x), (x.float() / 255 - 0.5) / 0.5, atol=1e-6)
