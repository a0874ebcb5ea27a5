"""Pictures of attention: the mask picture and the per-layer image-to-question maps."""

import sys

import pytest
import torch
from PIL import Image

from aki.attention_maps import OPENED_COLOUR, import_pyplot, render_mask
from aki.masking import dense_attention_mask, mma_window_ids, token_roles

IMG, PHI_MARKER = 3, [7]


def test_render_mask(tmp_path):
    ids = torch.tensor([1, 6, 3, 3, 20, 21, 8, 7, 22, 2])
    windows = mma_window_ids(ids[None], IMG, PHI_MARKER)
    allowed = dense_attention_mask(windows)[0]
    path = render_mask(allowed, token_roles(ids[None], IMG, windows)[0], str(tmp_path / "mask.png"), "MMA", cell=4)
    picture = Image.open(path).convert("RGB")
    strip = 3 * 4 + 4
    # Query 2 (an image token) sees key 4 (its question) through the opened rectangle.
    assert picture.getpixel((strip + 4 * 4 + 1, strip + 2 * 4 + 1)) == OPENED_COLOUR
    # Query 4 (text) never sees key 5.
    assert picture.getpixel((strip + 5 * 4 + 1, strip + 4 * 4 + 1)) == (255, 255, 255)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'aki\[viz\]'"):
        import_pyplot()


def test_attention_maps(tiny_checkpoint, images, tmp_path):
    from aki.attention_maps import image_to_question_attention
    from aki.cli import load, main

    model, processor = load(str(tiny_checkpoint))
    maps, labels = image_to_question_attention(model, processor, images[0], "What colour is it?")
    assert maps.shape[0] == model.config.text_config.num_hidden_layers
    assert maps.shape[1] == model.config.num_image_tokens and maps.shape[2] == len(labels)
    assert (maps > 0).all()  # under MMA every image token attends to its question
    path = tmp_path / "photo.png"
    images[0].save(path)
    source = ["--model", str(tiny_checkpoint), "--image", str(path)]
    main(["attention", *source, "What colour?", "--out", str(tmp_path / "map.png")])
    assert (tmp_path / "map.png").stat().st_size > 0
