"""The SmolLM2 ablation's first two stages: the contrastive tower (aki_demo.tower) and the connector
alignment (aki_demo.align), checked against dense re-computations and on a few real steps."""

import json
import math

import pytest
import torch
from torch import nn

from aki_demo.align import caption_words, contrastive_loss, inverse_document_frequency, late_interaction
from aki_demo.shapes import scene
from aki_demo.tower import EMPTY, REGION_CAPTIONS, pretrained_tower, scenes_and_regions, sigmoid_loss

SMALL_TOWER = {
    "vision": {"image_size": 32, "patch_size": 16},
    "data": {"grid": 2, "most": 3, "image_size": 32, "distinct": True},
    "scenes": 64,
    "steps": 3,
    "batch": 8,
    "lr": 2.0e-3,
    "warmup": 1,
    "seed": 0,
}


def test_region_labels_follow_the_scene_cell_by_cell():
    data = {"grid": 2, "most": 3, "image_size": 32, "distinct": True}
    pixels, regions = scenes_and_regions(data, 20, 5)
    assert pixels.shape == (20, 3, 32, 32) and regions.shape == (20, 4)
    for index in range(20):
        expected = [EMPTY] * 4
        for colour, shape, cell in scene(5, index, 2, 3, distinct=True):
            expected[cell] = f"{colour} {shape}"
        assert [REGION_CAPTIONS[i] for i in regions[index]] == expected


def test_sigmoid_loss_is_siglips_over_the_captions_present():
    torch.manual_seed(0)
    patches = nn.functional.normalize(torch.randn(6, 8), dim=-1)
    captions = nn.functional.normalize(torch.randn(len(REGION_CAPTIONS), 8), dim=-1)
    regions = torch.tensor([0, 0, 3, 12, 12, 5])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = 0.0
    for i in range(6):
        for c in (0, 3, 5, 12):  # only the captions in the batch
            label = 1.0 if regions[i] == c else -1.0
            expected -= math.log(torch.sigmoid(label * (10 * patches[i] @ captions[c] - 10)).item())
    assert sigmoid_loss(patches, captions, regions, scale, bias).item() == pytest.approx(expected / 6, rel=1e-5)


def test_the_tower_is_trained_once_per_config_and_loads_as_a_siglip_folder(tmp_path):
    import yaml

    from aki.assemble import vision_state

    config = tmp_path / "tower.yaml"
    config.write_text(yaml.safe_dump(SMALL_TOWER))
    folder, record = pretrained_tower(tmp_path / "cache", config)
    assert record["config"] == SMALL_TOWER and 0 <= record["held_out_region_accuracy"] <= 100
    vision_config, state = vision_state(str(folder))
    assert (vision_config["image_size"], vision_config["patch_size"]) == (32, 16) and state
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained_tower(tmp_path / "cache", config)[0] == folder  # cached: not trained again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    config.write_text(yaml.safe_dump({**SMALL_TOWER, "steps": 4}))
    assert pretrained_tower(tmp_path / "cache", config)[0] != folder  # other settings, another tower


def test_idf_weighs_words_in_every_caption_zero():
    captions = [caption_words(c) for c in ("A red square in the top left.", "A blue circle in the top right.")]
    assert captions[0] == ["a", "red", "square", "in", "the", "top", "left"]
    idf = inverse_document_frequency(captions)
    assert idf["a"] == idf["in"] == idf["the"] == idf["top"] == 0
    assert idf["red"] == idf["right"] == pytest.approx(math.log(2))


def test_late_interaction_is_each_words_best_token_averaged_by_weight():
    torch.manual_seed(1)
    tokens = nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)
    words = nn.functional.normalize(torch.randn(3, 5, 16), dim=-1)
    weights = torch.rand(3, 5)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            for w in range(5):
                expected[i, j] += weights[j, w] * max(float(tokens[i, p] @ words[j, w]) for p in range(4))
    torch.testing.assert_close(late_interaction(tokens, words, weights), expected)


def test_scenes_with_the_same_caption_are_not_negatives():
    similarity = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.2], [0.1, 0.2, 0.8]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    masked = contrastive_loss(similarity, same, 0.1)
    alone = torch.eye(3, dtype=torch.bool)
    assert masked < contrastive_loss(similarity, alone, 0.1)
    # Rows 0 and 1 without their twin: softmaxes over (0.9, 0.1) and (0.9, 0.2) only.
    row0 = -torch.log_softmax(torch.tensor([9.0, 1.0]), 0)[0]
    row1 = -torch.log_softmax(torch.tensor([9.0, 2.0]), 0)[0]
    row2 = -torch.log_softmax(torch.tensor([1.0, 2.0, 8.0]), 0)[2]
    expected = (row0 + row1 + row2) / 3  # rows and columns alike (the matrix is symmetric)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture
def tiny_tower(tmp_path):
    import yaml

    config = tmp_path / "tower.yaml"
    config.write_text(yaml.safe_dump(SMALL_TOWER))
    return pretrained_tower(tmp_path / "cache", config)[0]


def test_alignment_trains_the_connector_alone(tmp_path, tiny_tower):
    from helpers import save_tiny_qwen2
    from safetensors.torch import load_file

    from aki_demo.align import aligned_model

    save_tiny_qwen2(tmp_path / "qwen2")
    record = aligned_model(tiny_tower, tmp_path / "qwen2", tmp_path / "aligned", steps=2, batch=4, scenes=16)
    assert set(record["nearest_word"]) == {"colour", "shape"} and math.isfinite(record["loss"])
    assert json.loads((tmp_path / "aligned" / "align.json").read_text())["config"]["steps"] == 2
    aligned = load_file(tmp_path / "aligned" / "model.safetensors")
    base = load_file(tmp_path / "qwen2" / "model.safetensors")
    tower = load_file(tiny_tower / "model.safetensors")
    name = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(aligned[f"model.language_model.{name}"], base[f"model.{name}"])
    tower_key = next(k for k in tower if "encoder.layers.0" in k)
    assert torch.equal(aligned[f"model.vision_tower.{tower_key.removeprefix('vision_model.')}"], tower[tower_key])
    assert aligned["model.connector.norm.weight"].shape == (32,)
