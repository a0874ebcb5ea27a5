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
