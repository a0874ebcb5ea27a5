"""RealWorldQA: multiple choice from the A-D columns (TSV), or parsed from the question (Hugging Face)."""

import re

from ..data import Record
from .base import Score
from .mcq import MCQBenchmark, mcq_prompt

OPTION_LINE = re.compile(r"^([A-F])\.\s*(.+)$")


def split_question(text: str) -> tuple[str, dict[str, str]]:
    """The Hugging Face question embeds its options and an instruction; separate them."""
    stem, options = [], {}
    for line in text.splitlines():
        match = OPTION_LINE.match(line.strip())
        if match:
            options[match[1]] = match[2].strip()
        elif not options and not line.startswith("Please answer"):
            stem.append(line)
    return "\n".join(stem).strip(), options


class RealWorldQA(MCQBenchmark):
    name = "realworldqa"
    columns = ("RWQA",)
    tsv_names = ("RealWorldQA.tsv",)
    hf_dirs = ("RealWorldQA",)
    hf_split = "test"

    def from_hf(self, row: dict) -> list[Record]:
        stem, options = split_question(row["question"])
        return [
            Record(
                index=str(row.get("index", row["_position"])),
                question=mcq_prompt(stem, options),
                answer=str(row["answer"]).strip(),
                images=[row["image"]],
                options=options,
                extra={"raw_question": stem},
            )
        ]

    def score(self, records, predictions, judge=None) -> Score:
        lettered = [r for r in records if r.answer in r.options]
        free_form = [r for r in records if r.answer not in r.options]
        hits, how = self.evaluate(lettered, predictions, judge)
        # Free-form answers (a word or a number): normalised exact match.
        for record in free_form:
            hits[record.index] = float(predictions[record.index].strip().rstrip(".").lower() == record.answer.lower())
        overall = 100 * sum(hits.values()) / len(hits)
        return Score(
            columns={"RWQA": overall}, metrics={"Overall": overall, "answers_read_by": how, "free_form": len(free_form)}
        )
