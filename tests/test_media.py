"""aki.media, alone: what `aki serve` does to a request's images before the model sees them."""

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from aki.media import MediaPolicy, MediaReader, PixelBudget, RequestError, local_file
from aki.processing_aki import AkiImageProcessor


def encoded(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def read(reader: MediaReader, source, budget=None) -> Image.Image:
    policy = reader.policy
    return asyncio.run(reader.decode(source, "The image", "p", budget or PixelBudget(policy)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_shrinking_at_decode_gives_the_processors_pixels(mode):
    """The reader shrinks each image to the processor's size as it decodes it; the processor's own resize
    of the original gives the very same tensor."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (300, 500), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (300, 500, 4), dtype=np.uint8), "RGBA").convert(mode)
    processor = AkiImageProcessor(size={"height": 64, "width": 48})
    reader = MediaReader(MediaPolicy(), fit=(48, 64), resample=processor.resample)
    shrunk = read(reader, encoded(image))
    reader.close()
    assert shrunk.size == (48, 64) and shrunk.mode == "RGB"
    from aki.processing_aki import load_image

    original = processor(load_image(encoded(image)), return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(shrunk, return_tensors="pt")["pixel_values"], original)


def test_the_pixel_budget_counts_each_image_and_the_request():
    policy = MediaPolicy(max_pixels=100, max_request_pixels=150)
    budget = PixelBudget(policy)
    budget.spend(10, 10, "a", "p")
    with pytest.raises(RequestError) as raised:
        budget.spend(10, 11, "b", "p")
    assert raised.value.code == "image_too_large" and "--max-image-pixels" in raised.value.message
    with pytest.raises(RequestError) as raised:
        budget.spend(10, 6, "c", "p")
    assert raised.value.code == "request_images_too_large" and "--max-request-image-pixels" in raised.value.message
    budget.spend(10, 5, "d", "p")  # what is left fits


def test_a_header_over_the_budget_is_refused_before_decoding():
    reader = MediaReader(MediaPolicy(max_pixels=10_000))
    with pytest.raises(RequestError) as raised:
        read(reader, encoded(Image.new("RGB", (200, 200))))
    reader.close()
    assert raised.value.code == "image_too_large" and "200x200" in raised.value.message


def test_every_unresolvable_path_is_the_missing_files_answer(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    policy = MediaPolicy(local_root=root.resolve())
    answers = []
    for name in ("missing.png", str(tmp_path / "loop_a"), "y" * 300, "a/" * 3000 + "b", "nul\x00.png"):
        with pytest.raises(RequestError) as raised:
            local_file(name, policy, "p")
        answers.append(raised.value.body())
    assert answers[0]["error"]["code"] == "image_not_found"
    assert all(answer == answers[0] for answer in answers)


def test_more_images_than_the_limit_are_refused_before_any_is_read():
    reader = MediaReader(MediaPolicy(max_images=2))
    part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/never-fetched.png"}}
    messages = [{"role": "user", "content": [part, part, part]}]
    with pytest.raises(RequestError) as raised:
        asyncio.run(reader.read_messages(messages))
    reader.close()
    assert raised.value.code == "too_many_images" and "at most 2" in raised.value.message


def test_huge_images_decode_on_their_own_lower_priority_lane():
    """An image over LARGE_IMAGE_PIXELS waits for the one large-image thread (nice +10 on Linux); an
    ordinary image is decoded meanwhile, however busy that thread is."""
    import os
    import threading

    from aki.media import LARGE_IMAGE_NICENESS, LARGE_IMAGE_PIXELS

    reader = MediaReader(MediaPolicy(), fit=(16, 16), resample=Image.Resampling.BICUBIC)
    large_thread = reader.large_decoder.submit(threading.get_native_id).result()
    if hasattr(os, "getpriority"):
        expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + LARGE_IMAGE_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, large_thread) == expected
    release = threading.Event()
    reader.large_decoder.submit(release.wait, 30)  # the large lane, busy
    huge = encoded(Image.new("RGB", (LARGE_IMAGE_PIXELS // 4000 + 1, 4000), "teal"))

    async def both():
        large = asyncio.ensure_future(reader.decode(huge, "The huge image", "p", PixelBudget(reader.policy)))
        small = await asyncio.wait_for(
            reader.decode(encoded(Image.new("RGB", (64, 64), "red")), "The image", "p", PixelBudget(reader.policy)),
            timeout=10,
        )
        await asyncio.sleep(0.2)
        waiting = not large.done()
        release.set()
        return small, waiting, await asyncio.wait_for(large, timeout=30)

    small, waiting, large = asyncio.run(both())
    reader.close()
    assert small.getpixel((0, 0)) == (255, 0, 0) and waiting  # the small one was not queued behind
    assert large.size == (16, 16) and large.getpixel((0, 0)) == (0, 128, 128)
