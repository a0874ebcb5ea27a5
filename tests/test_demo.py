"""The demo: its synthetic data, a short end-to-end run, `aki chat` and the attention maps."""

import io
import json

import numpy as np
import pytest

from aki_demo.shapes import (
    CELL_NAMES,
    COLOURS,
    NUMBERS,
    ShapesSource,
    caption_of,
    draw_scene,
    question_about,
    question_kind,
    scene,
)


def colour_at(image, cell: int, grid: int):
    """Read a cell's colour back from the rendered picture (its centre pixel)."""
    step = image.size[0] // grid
    x, y = (cell % grid) * step + step // 2, (cell // grid) * step + step // 2
    pixel = image.getpixel((x, y))
    return next((name for name, rgb in COLOURS.items() if rgb == pixel), None)


@pytest.mark.parametrize("grid", [2, 3])
def test_scenes_are_deterministic_and_answers_match_the_picture(grid):
    kinds = ("colour_at", "count_colour", "count_shape")
    first = ShapesSource(50, 3, stage="sft", grid=grid, most=3, image_size=48, kinds=kinds)
    second = ShapesSource(50, 3, stage="sft", grid=grid, most=3, image_size=48, kinds=kinds)
    for index in range(50):
        a, b = first[index]["record"], second[index]["record"]
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        objects = scene(3, index, grid, 3)
        seen = {cell: colour_at(a["image"], cell, grid) for cell in range(grid * grid)}
        assert {cell: colour for colour, _, cell in objects} == {c: v for c, v in seen.items() if v}
        question, answer = question_about(objects, index, 3, grid, question_kind(3, index, kinds))
        if question.startswith("What colour"):
            cell = CELL_NAMES[grid].index(question.removeprefix("What colour is the shape in the ").rstrip("?"))
            assert answer == seen[cell]
        elif question.startswith("How many") and question.split()[2] in COLOURS:
            assert answer == NUMBERS[sum(v == question.split()[2] for v in seen.values())]
    other_seed = ShapesSource(50, 4, stage="sft", grid=grid, most=3, image_size=48, kinds=kinds)
    assert any(other_seed[i]["record"]["question"] != first[i]["record"]["question"] for i in range(50))


def test_text_items_describe_the_scene_before_the_question():
    import re

    described = ShapesSource(60, 3, stage="sft", grid=3, most=3, modality="text")
    pictured = ShapesSource(60, 3, stage="sft", grid=3, most=3, image_size=48)
    for index in range(60):
        item = described[index]
        assert item["task"] == "llava" and "image" not in item["record"]
        user, assistant = item["record"]["conversations"]
        description, question = user["value"].split("\n")
        assert description == "Scene: " + caption_of(scene(3, index, 3, 3), 3)
        assert (
            question == pictured[index]["record"]["question"]
            and assistant["value"] == pictured[index]["record"]["answer"]
        )
        cell = question.removeprefix("What colour is the shape in the ").rstrip("?")
        assert re.search(rf"a {assistant['value']} \w+ in the {cell}( and|\.)", description, re.IGNORECASE)
    with pytest.raises(ValueError, match="modality"):
        ShapesSource(4, 0, stage="pretrain", modality="text")


def test_draw_scene_places_shapes_in_their_cells():
    image = draw_scene([("red", "square", 4)], 48, grid=3)
    assert colour_at(image, 4, 3) == "red" and colour_at(image, 0, 3) is None


def test_the_gap_interval_is_students_t_over_the_paired_seeds():
    from aki_demo.run import paired_interval, summarise, verdict

    low, high = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.3027
    assert low == pytest.approx(2 - 4.3027 / 3**0.5, abs=1e-3) and high == pytest.approx(2 + 4.3027 / 3**0.5, abs=1e-3)
    assert paired_interval([4.0]) is None

    def said(causal, mma):
        per_seed = {seed: {"causal": c, "mma": m} for seed, (c, m) in enumerate(zip(causal, mma, strict=True))}
        return verdict(summarise(per_seed)["gap"])

    assert "above zero: MMA scores higher" in said([50, 60, 70], [55, 64, 76])
    assert "below zero: causal scores higher" in said([50, 60, 70], [45, 56, 64])
    assert "contains zero" in said([50, 60, 70], [55, 56, 71]) and "ahead in 2 of 3 seeds" in said(
        [50, 60, 70], [55, 56, 71]
    )
    assert said([50], [55]).startswith("One seed")


def test_quick_demo_around_a_pretrained_language_model(tmp_path):
    from helpers import save_tiny_qwen2

    from aki_demo.run import main

    tokenizer = save_tiny_qwen2(tmp_path / "qwen2")
    main(["--quick", "--out", str(tmp_path / "demo"), "--language-model", str(tmp_path / "qwen2")])
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["language_model"] == str(tmp_path / "qwen2") and set(results["per_seed"]["0"]) == {"causal", "mma"}
    export = tmp_path / "demo" / "seed0" / "sft_mma" / "final"
    config = json.loads((export / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2" and config["attention_policy"] == "mma"
    generation = json.loads((export / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]  # answers stop at ChatML's end
    predictions = (export.parent / "eval" / "shapes" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 24 and (tmp_path / "demo" / "accuracy.png").stat().st_size > 0


def test_aki_chat_streams_the_answer(tiny_checkpoint, images, tmp_path, capsys):
    from aki.cli import Chat, interactive, load, main

    path = tmp_path / "photo.png"
    images[0].save(path)
    main(
        [
            "chat",
            "--model",
            str(tiny_checkpoint),
            "--image",
            str(path),
            "--max-new-tokens",
            "6",
            "What is in the image?",
        ]
    )
    streamed = capsys.readouterr().out
    model, processor = load(str(tiny_checkpoint))
    output = io.StringIO()
    chat = Chat(model, processor, max_new_tokens=6, output=output)
    chat.add_image(str(path))
    answer = chat.ask("What is in the image?")
    assert streamed.strip() == answer.strip() == output.getvalue().strip()
    # Interactive: an image, two turns (the second re-encodes the first), then quit.
    lines = iter([f"/image {path}", "What colour?", "And the shape?", "/quit"])
    chat = Chat(model, processor, max_new_tokens=4, output=io.StringIO())
    interactive(chat, read=lambda prompt: next(lines))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert len(chat.images) == 1


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
    main(
        [
            "attention",
            "--model",
            str(tiny_checkpoint),
            "--image",
            str(path),
            "What colour?",
            "--out",
            str(tmp_path / "map.png"),
        ]
    )
    assert (tmp_path / "map.png").stat().st_size > 0


def test_conjunction_scenes_need_both_colour_and_shape():
    from aki_demo.shapes import conjunction_scene

    answers = set()
    for index in range(200):
        objects, colour, shape, count = conjunction_scene(5, index, 3, 6)
        assert sum(o[0] == colour and o[1] == shape for o in objects) == count
        assert all((o[0] == colour) != (o[1] == shape) for o in objects if not (o[0] == colour and o[1] == shape))
        item = ShapesSource(200, 5, stage="sft", grid=3, most=6, image_size=48, kinds=("count_both",))[index]["record"]
        assert item["question"] == f"How many {colour} {shape}s are there?" and item["answer"] == NUMBERS[count]
        seen = [colour_at(item["image"], cell, 3) for cell in range(9)]
        assert sorted(v for v in seen if v) == sorted(o[0] for o in objects)
        answers.add(count)
    assert answers == {0, 1, 2, 3}
