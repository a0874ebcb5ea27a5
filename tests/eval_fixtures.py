"""Benchmark files in the real formats, written by the tests (no download)."""

import base64
import csv
import io
from pathlib import Path

from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "white", "black")


def image_b64(seed: int, size: int = 24) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[seed % len(COLOURS)]).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """A VLMEvalKit-style TSV (the union of the rows' columns, in first-seen order)."""
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})
    return path
