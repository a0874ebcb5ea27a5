"""Benchmark files on disk: VLMEvalKit TSVs (base64 images) and Hugging Face dataset folders.

A TSV image cell of 64 characters or fewer points to the row whose `index` it holds (MME and
MMBench share images that way); MMMU cells may hold a Python list of base64 strings. A Hugging
Face folder is anything `datasets` reads locally: a `save_to_disk` folder, or parquet files.
"""

import ast
import base64
import csv
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

csv.field_size_limit(sys.maxsize)
logger = logging.getLogger("aki.eval.data")


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


def check_base64_image(data: str) -> None:
    """Raise a ValueError unless `data` is base64 of an image file PIL can read (its header and,
    for PNG, its checksums; the pixels are decoded only when the question is asked)."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            image.verify()
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"its image cell is not a base64 image ({error or type(error).__name__})") from error


def refuse_duplicates(keys: list[str], where: str, key: str = "index", place: str = "row") -> None:
    """Predictions are stored by index (a TSV row's, a record's id), so two questions with one would share
    one answer: raise a `BenchmarkDataError` naming each repeated key and where it is (counted from 1)."""
    places: dict[str, list[int]] = {}
    for number, value in enumerate(keys, 1):
        places.setdefault(value, []).append(number)
    repeated = [(value, numbers) for value, numbers in places.items() if len(numbers) > 1]
    if repeated:
        described = "; ".join(
            f"{key} {value!r} is on {place}s {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"
            for value, numbers in repeated[:5]
        )
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        raise BenchmarkDataError(f"{where}: {described}{more}. Give each question its own {key}.")


def read_tsv(path: Path, skipped: list[str] | None = None) -> list[dict[str, str]]:
    """The rows of a VLMEvalKit TSV, with `image` cells replaced by lazy image loaders (a list).

    A row whose image cell is not a readable base64 image (or points to no usable row) is left
    out, logged, and described in `skipped` ("FILE row N (index I): why").
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise BenchmarkDataError(f"{path} holds no rows.")
    if "index" not in rows[0]:
        raise BenchmarkDataError(f"{path} has no 'index' column; columns: {sorted(rows[0])}.")
    refuse_duplicates([row["index"] for row in rows], str(path))
    by_index = {row["index"]: row for row in rows}

    def loaders(cell: str) -> list:
        if is_missing(cell):
            return []
        if len(cell) <= 64:  # a pointer to another row's image
            if cell not in by_index:
                raise ValueError(f"its image cell {cell!r} points to no row")
            return loaders(by_index[cell]["image"])
        try:
            cells = ast.literal_eval(cell) if cell.startswith("[") else [cell]
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"its image cell is not a list of base64 images ({error})") from error
        for data in cells:
            check_base64_image(data)
        return [lambda data=data: decode_base64_image(data) for data in cells]

    good = []
    for number, row in enumerate(rows, 1):
        try:
            row["_images"] = loaders(row.get("image", ""))
        except ValueError as error:
            reason = f"{path.name} row {number} (index {row['index']}): {error}"
            logger.warning("skipping %s", reason)
            if skipped is not None:
                skipped.append(reason)
            continue
        good.append(row)
    return good


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


def options_of(row: dict, letters: str = "ABCDEFGHI") -> dict[str, str]:
    """The option columns A, B, ... that are present and not empty, in order."""
    return {letter: str(row[letter]) for letter in letters if letter in row and not is_missing(row[letter])}
