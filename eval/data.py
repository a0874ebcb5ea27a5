"""Benchmark files on disk: VLMEvalKit TSVs (base64 images) and Hugging Face dataset folders.

A TSV image cell of 64 characters or fewer points to the row whose `index` it holds (MME and
MMBench share images that way); MMMU cells may hold a Python list of base64 strings. A Hugging
Face folder is anything `datasets` reads locally: a `save_to_disk` folder, or parquet files.
"""

import ast
import base64
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

csv.field_size_limit(sys.maxsize)


class BenchmarkDataError(ValueError):
    """A benchmark's files are missing or malformed; the message names the file and the problem."""


@dataclass
class Record:
    """One benchmark question, normalised across file formats.

    `images` holds PIL images or zero-argument callables that decode one (TSV images are decoded
    only when the question is asked).
    """

    index: str
    question: str
    answer: str = ""
    images: list = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str = ""
    extra: dict = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        return [image() if callable(image) else image for image in self.images]


# The strings pandas' read_csv and read_excel turn into NaN by default. VLMEvalKit reads its TSVs
# with pandas, so an option cell "None" or "N/A" is no option there, and a prediction "None" that
# went through its .xlsx file is scored as the text "nan".
PANDAS_MISSING = frozenset(
    ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null")
)  # fmt: skip


def is_missing(value) -> bool:
    """Whether pandas would read the cell as missing (NaN)."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and value in PANDAS_MISSING)
    )


def as_read_back(prediction: str) -> str:
    """A prediction as VLMEvalKit scores it after its .xlsx round trip: what pandas reads as missing becomes 'nan'."""
    return "nan" if is_missing(prediction) else prediction


def decode_base64_image(data: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise BenchmarkDataError(f"An image cell is not a base64 image ({error}).") from error


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The rows of a VLMEvalKit TSV, with `image` cells replaced by lazy image loaders (a list)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise BenchmarkDataError(f"{path} holds no rows.")
    if "index" not in rows[0]:
        raise BenchmarkDataError(f"{path} has no 'index' column; columns: {sorted(rows[0])}.")
    by_index = {row["index"]: row for row in rows}

    def loaders(cell: str) -> list:
        if is_missing(cell):
            return []
        if len(cell) <= 64:  # a pointer to another row's image
            if cell not in by_index:
                raise BenchmarkDataError(f"{path}: image cell {cell!r} points to no row.")
            return loaders(by_index[cell]["image"])
        if cell.startswith("["):
            return [lambda data=data: decode_base64_image(data) for data in ast.literal_eval(cell)]
        return [lambda: decode_base64_image(cell)]

    for row in rows:
        row["_images"] = loaders(row.get("image", ""))
    return rows


def read_hf(path: Path, split: str | None = None, config: str | None = None) -> list[dict]:
    """The rows of a local Hugging Face dataset (decoded images are PIL images).

    `config` picks one config of a hub snapshot that declares several (MMBench's cc, cn, en).
    """
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        dataset = datasets.load_from_disk(str(path))
    else:
        configs = datasets.get_dataset_config_names(str(path))
        if config is not None and config not in configs:
            raise BenchmarkDataError(f"{path} has no config {config!r}; configs: {configs}.")
        if config is None and len(configs) > 1:
            raise BenchmarkDataError(f"{path} holds configs {configs}; choose one (--hf-config BENCHMARK=CONFIG).")
        dataset = datasets.load_dataset(str(path), config)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = next(iter(dataset))
        if split not in dataset:
            raise BenchmarkDataError(f"{path} has no split {split!r}; splits: {sorted(dataset)}.")
        dataset = dataset[split]
    return list(dataset)


def refuse_duplicate_ids(records: list[Record], path: Path) -> None:
    """Predictions are keyed by record id: two records with one id would overwrite each other's."""
    seen = set()
    for record in records:
        if record.index in seen:
            raise BenchmarkDataError(
                f"{path}: the record id {record.index!r} occurs twice; ids must be unique within a benchmark."
            )
        seen.add(record.index)


def options_of(row: dict, letters: str = "ABCDEFGHI") -> dict[str, str]:
    """The option columns A, B, ... that are present and not empty, in order."""
    return {letter: str(row[letter]) for letter in letters if letter in row and not is_missing(row[letter])}
