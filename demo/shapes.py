"""Coloured shapes on a grid, generated on the fly: data for tiny runs that needs no download.

Each item is a pure function of (seed, index). Pre-training items are captions that list every
shape; SFT items ask about one shape through the paper's VQA template, or (text modality) ask
about a scene described in words. `write_webdataset` and `write_llava_json` save the same items
in the public formats, for the file readers' tests.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
CELL_NAMES = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Pick questions name one of 2-3 objects by one attribute and ask for another: the answer needs the
# image and the question together (the SmolLM2 ablation). Scenes for them hold distinct colours and shapes.
PICK_KINDS = ("by_position", "by_colour", "by_shape")
QUESTION_KINDS = ("colour_at", "count_colour", "count_shape", "count_both", *PICK_KINDS)
CHANCE = {"by_position": 100 / len(COLOURS), "by_colour": 100 / len(SHAPES), "by_shape": 100 / len(CELL_NAMES[2])}


def draw_scene(objects: list[tuple[str, str, int]], size: int, grid: int = 2) -> Image.Image:
    """objects: (colour, shape, cell) with cells 0..grid*grid-1, row by row."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    step = size // grid
    for colour, shape, cell in objects:
        x0, y0 = (cell % grid) * step + step // 6, (cell // grid) * step + step // 6
        x1, y1 = x0 + step * 2 // 3, y0 + step * 2 // 3
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def scene(
    seed: int, index: int, grid: int = 2, most: int = 3, least: int = 1, distinct: bool = False
) -> list[tuple[str, str, int]]:
    """least..most objects in distinct cells; with `distinct`, no two share a colour or a shape."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(least, most + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    if distinct:
        colours = rng.choice(list(COLOURS), size=count, replace=False)
        shapes = rng.choice(SHAPES, size=count, replace=False)
        return [(str(c), str(s), int(cell)) for c, s, cell in zip(colours, shapes, cells, strict=True)]
    return [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), int(cell)) for cell in cells]


def caption_of(objects, grid: int = 2, order: np.random.Generator | None = None) -> str:
    """The objects in reading order, or in a random order drawn from `order` (a caption whose word
    order gives the cells away teaches less about which image token holds which cell)."""
    names = CELL_NAMES[grid]
    listed = sorted(objects, key=lambda o: o[2])
    if order is not None:
        listed = [listed[i] for i in order.permutation(len(listed))]
    parts = [f"a {colour} {shape} in the {names[cell]}" for colour, shape, cell in listed]
    return " and ".join(parts).capitalize() + "."


def conjunction_scene(seed: int, index: int, grid: int, most: int) -> tuple[list, str, str, int]:
    """A scene for "How many red circles?": 0-3 copies of the target, and distractors that share
    its colour or its shape but never both, so only the conjunction counts."""
    rng = np.random.default_rng([seed, index, 11])
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    count = int(rng.integers(0, 4))
    distractors = int(rng.integers(max(0, 1 - count), max(1, most - count) + 1))
    cells = rng.choice(grid * grid, size=count + distractors, replace=False)
    objects = [(colour, shape, int(cell)) for cell in cells[:count]]
    for cell in cells[count:]:
        if rng.random() < 0.5:  # same colour, another shape
            other = str(rng.choice([s for s in SHAPES if s != shape]))
            objects.append((colour, other, int(cell)))
        else:  # same shape, another colour
            other = str(rng.choice([c for c in COLOURS if c != colour]))
            objects.append((other, shape, int(cell)))
    return objects, colour, shape, count


def question_kind(seed: int, index: int, kinds: tuple[str, ...]) -> str:
    return kinds[int(np.random.default_rng([seed, index, 5]).integers(len(kinds)))]


def question_about(objects, index: int, seed: int, grid: int, kind: str) -> tuple[str, str]:
    """A (question, answer) pair of one kind about a scene from `scene`, deterministic per (seed, index)."""
    rng = np.random.default_rng([seed, index, 7])
    if kind in ("colour_at", "by_position"):
        colour, _, cell = objects[index % len(objects)]
        return f"What colour is the shape in the {CELL_NAMES[grid][cell]}?", colour
    if kind == "by_colour":
        colour, shape, _ = objects[index % len(objects)]
        return f"What shape is the {colour} one?", shape
    if kind == "by_shape":
        _, shape, cell = objects[index % len(objects)]
        return f"Where is the {shape}?", CELL_NAMES[grid][cell]
    if kind == "count_colour":
        colour = str(rng.choice(list(COLOURS)))
        return f"How many {colour} shapes are there?", NUMBERS[sum(o[0] == colour for o in objects)]
    if kind == "count_shape":
        shape = str(rng.choice(SHAPES))
        return f"How many {shape}s are there?", NUMBERS[sum(o[1] == shape for o in objects)]
    raise ValueError(f"Unknown question kind {kind!r}; choose from {QUESTION_KINDS}.")


class ShapesSource:
    """`size` scenes; `stage` "pretrain" gives image-caption pairs, "sft" gives VQA task items.

    `grid` is 2 (2x2 cells) or 3 (3x3); a scene holds `least` to `most` shapes, with `distinct`
    no two of one colour or one shape. `kinds` are the SFT items' question kinds (see
    `QUESTION_KINDS`). "count_both" questions ("How many red circles?") get scenes of their own,
    whose distractors share the target's colour or shape but not both. `shuffle` lists a caption's
    objects in random order. `modality="text"` gives text-only SFT items instead: the scene
    described in words ("Scene: " and its caption), then the question, as an AKI prompt puts the
    image before the question (the demo's language pre-training). `modality="blank"` keeps the
    question and answer but draws no shape: the text-only baseline, which can learn only the
    answers' priors.
    """

    def __init__(
        self,
        size: int = 256,
        seed: int = 0,
        image_size: int = 32,
        stage: str = "pretrain",
        grid: int = 2,
        most: int = 3,
        kinds: tuple[str, ...] = ("colour_at",),
        modality: str = "image",
        least: int = 1,
        distinct: bool = False,
        shuffle: bool = False,
    ):
        if modality not in ("image", "text", "blank") or (modality != "image" and stage != "sft"):
            raise ValueError(
                f"modality must be 'image', or 'text'/'blank' for SFT items; got {modality!r} for {stage!r}."
            )
        if not 1 <= least <= most <= (min(len(COLOURS), len(SHAPES)) if distinct else grid * grid):
            raise ValueError(f"least={least}, most={most} do not fit a {grid}x{grid} grid (distinct={distinct}).")
        unknown = set(kinds) - set(QUESTION_KINDS)
        if unknown:
            raise ValueError(f"Unknown question kinds {sorted(unknown)}; choose from {QUESTION_KINDS}.")
        self.size, self.seed, self.image_size, self.stage = size, seed, image_size, stage
        self.grid, self.most, self.kinds, self.modality = grid, most, tuple(kinds), modality
        self.least, self.distinct, self.shuffle = least, distinct, shuffle

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        kind = question_kind(self.seed, index, self.kinds) if self.stage == "sft" else None
        if kind == "count_both":
            objects, colour, shape, count = conjunction_scene(self.seed, index, self.grid, self.most)
            question, answer = f"How many {colour} {shape}s are there?", NUMBERS[count]
        else:
            objects = scene(self.seed, index, self.grid, self.most, self.least, self.distinct)
        if self.stage == "pretrain":
            order = np.random.default_rng([self.seed, index, 3]) if self.shuffle else None
            caption = caption_of(objects, self.grid, order)
            return {"image": draw_scene(objects, self.image_size, self.grid), "text": caption}
        if kind != "count_both":
            question, answer = question_about(objects, index, self.seed, self.grid, kind)
        if self.modality == "text":
            described = f"Scene: {caption_of(objects, self.grid)}\n{question}"
            turns = [{"from": "human", "value": described}, {"from": "gpt", "value": answer}]
            return {"task": "llava", "record": {"conversations": turns}, "image_root": None, "kind": kind}
        image = draw_scene([] if self.modality == "blank" else objects, self.image_size, self.grid)
        record = {"image": image, "question": question, "answer": answer}
        return {"task": "vqa", "record": record, "image_root": None, "kind": kind}


def write_webdataset(folder: Path, shards: int, per_shard: int, seed: int = 0, image_size: int = 32) -> str:
    """Caption shards `folder/{000..shards-1}.tar`; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    source = ShapesSource(shards * per_shard, seed, image_size)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:03d}.tar", "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                item = source[index]
                buffer = io.BytesIO()
                item["image"].save(buffer, format="JPEG", quality=95)
                for extension, payload in (("jpg", buffer.getvalue()), ("txt", item["text"].encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"{{000..{shards - 1:03d}}}.tar")


def write_llava_json(folder: Path, size: int, seed: int = 0, image_size: int = 32) -> Path:
    """A LLaVA-format JSON of two-turn conversations about saved PNGs; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(size):
        objects = scene(seed, index)
        name = f"{index:06d}.png"
        draw_scene(objects, image_size).save(folder / name)
        colour, shape, cell = objects[0]
        cells = CELL_NAMES[2]
        records.append(
            {
                "id": str(index),
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat shape is in the {cells[cell]}?"},
                    {"from": "gpt", "value": f"A {shape}."},
                    {"from": "human", "value": "What colour is it?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    path = folder / "conversations.json"
    path.write_text(json.dumps(records))
    return path
