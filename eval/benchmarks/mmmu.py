"""MMMU dev/validation as VLMEvalKit scores it: open questions become a two-option question after inference."""

import ast
import re
import string
from dataclasses import replace

from ..data import Record, is_missing, options_of
from .base import Score, judge_label, mean
from .mcq import MCQBenchmark, choose, mcq_prompt

IMAGE_TAG = re.compile(r"<image (\d+)>")
LETTERS = frozenset(string.ascii_uppercase)


def interleave(text: str, images: list) -> list[dict]:
    """VLMEvalKit's MMMU message: text split at `<image k>`, image k placed where its tag stands."""
    items, position = [], 0
    for match in IMAGE_TAG.finditer(text):
        if text[position : match.start()]:
            items.append({"type": "text", "value": text[position : match.start()]})
        number = int(match[1])
        if 1 <= number <= len(images):
            items.append({"type": "image", "value": images[number - 1]})
        position = match.end()
    if text[position:]:
        items.append({"type": "text", "value": text[position:]})
    if not any(item["type"] == "image" for item in items) and images:  # no tags: images first
        items = [{"type": "image", "value": image} for image in images] + items
    return items


class MMMU(MCQBenchmark):
    name = "mmmu"
    columns = ("MMMU",)
    tsv_names = ("MMMU_DEV_VAL.tsv",)
    hf_dirs = ("MMMU",)
    hf_split = "validation"

    def from_tsv(self, row: dict) -> list[Record]:
        options = options_of(row)
        return [
            Record(
                index=str(row["index"]),
                question=mcq_prompt(row["question"], options),
                answer=str(row["answer"]),
                images=row["_images"],
                options=options,
                category=row.get("category", ""),
                extra={"raw_question": row["question"], "split": row.get("split", "validation")},
            )
        ]

    def from_hf(self, row: dict) -> list[Record]:
        choices = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
        options = {chr(65 + i): str(choice) for i, choice in enumerate(choices)}
        images = [row[f"image_{k}"] for k in range(1, 8) if not is_missing(row.get(f"image_{k}"))]
        split = "dev" if str(row["id"]).startswith("dev_") else "validation"
        return [
            Record(
                index=str(row["id"]),
                question=mcq_prompt(row["question"], options),
                answer=str(row["answer"]),
                images=images,
                options=options,
                category=row.get("subfield", ""),
                extra={"raw_question": row["question"], "split": split},
            )
        ]

    def message(self, record: Record) -> list[dict]:
        return interleave(record.question, record.images)

    def score_read_back(self, records, predictions, judge=None) -> Score:
        hits, how = {}, {}
        for record in records:
            if not record.options:  # open question (VLMEvalKit's MMMU_preproc)
                record = replace(record, options={"A": record.answer, "B": "Other Answers"})
            # VLMEvalKit maps a truth that is not a capital letter to 'A'; a letter stays, even one with no option.
            record = replace(record, answer=record.answer if record.answer in LETTERS else "A")
            letter, method = choose(record, predictions[record.index], judge)
            how[method] = how.get(method, 0) + 1
            hits[record.index] = (record.extra.get("split", "validation"), float(letter == record.answer))
        by_split = {}
        for split in sorted({split for split, _ in hits.values()}):
            by_split[split] = 100 * mean(hit for s, hit in hits.values() if s == split)
        headline = by_split.get("validation", 100 * mean(hit for _, hit in hits.values()))
        return Score(
            columns={"MMMU": headline},
            metrics={"by_split": by_split, "answers_read_by": how},
            judge=judge_label(judge, how),
        )
