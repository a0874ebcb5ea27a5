"""Images however they arrive (path, PIL, array, tensor; 8 or 16 bits; integers or floats; with
alpha) give the same pixel values: 16-bit images keep their scale, floats in [0, 1] are not
rescaled twice, transparency is composited onto white."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from aki.processing_aki import load_image
from aki_training.data import open_image


def pixels(processor, image) -> torch.Tensor:
    return processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]


def saved(tmp_path, image: Image.Image, name: str):
    path = tmp_path / name
    image.save(path)
    return path


def test_a_16_bit_png_keeps_its_grey(tmp_path, tiny):
    _, processor = tiny
    grey = np.full((20, 30), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    path = saved(tmp_path, Image.fromarray(grey), "grey16.png")
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # PIL reads it as 16/32-bit integers
        from_pil = pixels(processor, opened.copy())
    expected = pixels(processor, Image.new("RGB", (30, 20), (128, 128, 128)))
    for image in (str(path), from_pil, grey):
        got = image if isinstance(image, torch.Tensor) else pixels(processor, image)
        assert torch.allclose(got, expected, atol=1e-6), float(got.mean())
    assert torch.allclose(pixels(processor, open_image(path.name, str(tmp_path))), expected, atol=1e-6)


def test_a_float_array_in_0_1_is_not_rescaled_again(tiny):
    _, processor = tiny
    rng = np.random.default_rng(0)
    as_bytes = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    expected = pixels(processor, as_bytes)
    for image in (as_bytes / 255.0, (as_bytes / 255.0).astype(np.float32), torch.from_numpy(as_bytes / 255.0)):
        assert torch.allclose(pixels(processor, image), expected, atol=1e-6)
    channels_first = torch.from_numpy(as_bytes / 255.0).permute(2, 0, 1)
    assert torch.allclose(pixels(processor, channels_first), expected, atol=1e-6)


def test_float_arrays_outside_0_1_are_refused(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixels(processor, np.full((8, 8, 3), 200.0))


def test_alpha_is_composited_onto_white_however_the_image_arrives(tmp_path, tiny):
    _, processor = tiny
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent on the left half
    rgba[:, 8:, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    path = saved(tmp_path, image, "rgba.png")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    expected_rgb = np.full((16, 16, 3), 255, dtype=np.uint8)
    expected_rgb[:, 8:] = (255, 0, 0)
    expected = pixels(processor, expected_rgb)
    for given in (str(path), image, rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        assert torch.allclose(pixels(processor, given), expected, atol=1e-6), type(given)
    for given in (open_image(path.name, str(tmp_path)), open_image(encoded.getvalue()), open_image(image)):
        assert np.array_equal(np.asarray(given), expected_rgb)
    palette = image.convert("PA")  # transparency in a palette image
    assert np.array_equal(np.asarray(load_image(palette)), expected_rgb)
