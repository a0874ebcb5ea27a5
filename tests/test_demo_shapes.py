"""The demo's generated data (aki_demo.shapes): scenes, questions and answers that match the picture."""

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
