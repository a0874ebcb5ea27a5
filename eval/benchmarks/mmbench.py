"""MMBench dev (English, v1.0): circular evaluation, a question counts only if all its rotations are right."""

from ..data import Record, is_missing, options_of
from .base import Score
from .mcq import MCQBenchmark, mcq_prompt


class MMBench(MCQBenchmark):
    name = "mmbench"
    columns = ("MMB",)
    tsv_names = ("MMBench_DEV_EN.tsv",)
    hf_dirs = ("MMBench", "MMBench_DEV_EN")
    hf_split = "dev"
    hf_config = "en"  # lmms-lab/MMBench holds cc, cn and en
    circular = True

    def from_hf(self, row: dict) -> list[Record]:
        hint = None if is_missing(row.get("hint")) else row["hint"]
        options = options_of(row, "ABCD")
        return [
            Record(
                index=str(row["index"]),
                question=mcq_prompt(row["question"], options, hint),
                answer=row["answer"],
                images=[row["image"]],
                options=options,
                category=row.get("category", ""),
                extra={"raw_question": row["question"], "l2-category": row.get("L2-category", "")},
            )
        ]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        hits, how = self.evaluate(records, predictions, judge)  # once: every judge call is paid for
        score = self.summarise(records, hits, how, judge)
        score.metrics["by_l2_category"] = self.accuracy_by(records, hits, lambda r: r.extra.get("l2-category", ""))
        score.metrics["questions"] = len(hits)
        return score
