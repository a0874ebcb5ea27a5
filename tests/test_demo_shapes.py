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


def test_pick_questions_name_one_object_and_ask_for_another():
    """Each pick question names exactly one object of a 2-3 object scene (distinct colours and shapes),
    and its answer is that object's other attribute, as the picture shows it."""
    from aki_demo.shapes import CHANCE, PICK_KINDS

    source = ShapesSource(300, 7, stage="sft", grid=2, least=2, most=3, distinct=True, kinds=PICK_KINDS)
    kinds = set()
    for index in range(300):
        item = source[index]
        question, answer, image = item["record"]["question"], item["record"]["answer"], item["record"]["image"]
        objects = scene(7, index, 2, 3, least=2, distinct=True)
        assert 2 <= len(objects) <= 3
        assert len({o[0] for o in objects}) == len({o[1] for o in objects}) == len(objects)
        seen = {cell: colour_at(image, cell, 2) for cell in range(4)}
        assert {cell: colour for colour, _, cell in objects} == {c: v for c, v in seen.items() if v}
        kinds.add(item["kind"])
        if item["kind"] == "by_position":
            cell = CELL_NAMES[2].index(question.removeprefix("What colour is the shape in the ").rstrip("?"))
            assert answer == seen[cell]
        elif item["kind"] == "by_colour":
            colour = question.removeprefix("What shape is the ").removesuffix(" one?")
            assert [o[1] for o in objects if o[0] == colour] == [answer]
        else:
            shape = question.removeprefix("Where is the ").rstrip("?")
            (target,) = [o for o in objects if o[1] == shape]
            assert answer == CELL_NAMES[2][target[2]] and seen[target[2]] == target[0]
    assert kinds == set(PICK_KINDS) == set(CHANCE)
    assert CHANCE == {"by_position": 25.0, "by_colour": 100 / 3, "by_shape": 25.0}


def test_blank_items_keep_the_question_and_show_nothing():
    pictured = ShapesSource(20, 2, stage="sft", least=2, distinct=True, kinds=("by_colour",))
    blank = ShapesSource(20, 2, stage="sft", least=2, distinct=True, kinds=("by_colour",), modality="blank")
    for index in range(20):
        a, b = pictured[index]["record"], blank[index]["record"]
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        assert np.asarray(b["image"]).std() == 0 and np.asarray(a["image"]).std() > 0


def test_shuffled_captions_list_the_same_objects_in_another_order():
    plain = ShapesSource(200, 1, most=3, distinct=True)
    shuffled = ShapesSource(200, 1, most=3, distinct=True, shuffle=True)
    reordered = 0
    for index in range(200):
        a, b = plain[index]["text"], shuffled[index]["text"]
        assert sorted(a.lower().rstrip(".").split(" and ")) == sorted(b.lower().rstrip(".").split(" and "))
        reordered += a != b
    assert reordered > 30  # 2- and 3-object scenes, reordered about half the time or more


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kinds": ("by_size",)}, "Unknown question kinds"),
        ({"least": 3, "most": 2}, "least=3, most=2"),
        ({"most": 4, "distinct": True}, "distinct=True"),
        ({"modality": "blank", "stage": "pretrain"}, "modality"),
    ],
)
def test_impossible_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        ShapesSource(4, 0, **{"stage": "sft", **options})
