"""RealWorldQA: multiple choice from the A-D columns (TSV), or parsed from the question (Hugging Face)."""

import re

from ..data import Record
from .base import Score, judge_label, mean
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

    def score_read_back(self, records, predictions, judge=None) -> Score:
        # A row without options is always wrong in VLMEvalKit: no letter can match its free-form truth.
        # Ours skips the judge there, which VLMEvalKit asks in vain.
        with_options = [r for r in records if r.options]
        hits, how = self.evaluate(with_options, predictions, judge)
        hits.update({r.index: 0.0 for r in records if not r.options})
        overall = 100 * mean(hits.values())
        return Score(
            columns={"RWQA": overall},
            metrics={"Overall": overall, "answers_read_by": how, "without_options": len(records) - len(with_options)},
            judge=judge_label(judge, how),
        )
