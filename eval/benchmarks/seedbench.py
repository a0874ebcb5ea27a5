"""SEED-Bench, image questions: plain multiple-choice accuracy."""

from ..data import Record
from .mcq import MCQBenchmark, mcq_prompt

# question_type_id -> the image dimension VLMEvalKit reports as `category`.
DIMENSIONS = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding",
}  # fmt: skip


class SEEDBench(MCQBenchmark):
    name = "seedbench"
    columns = ("SEED-I",)
    tsv_names = ("SEEDBench_IMG.tsv",)
    hf_dirs = ("SEED-Bench", "SEEDBench_IMG")
    hf_split = "test"

    def from_hf(self, row: dict) -> list[Record]:
        if row.get("data_type", "image") != "image":
            return []
        options = {letter: str(row[f"choice_{letter.lower()}"]) for letter in "ABCD"}
        images = row["image"] if isinstance(row["image"], list) else [row["image"]]
        return [
            Record(
                index=str(row["question_id"]),
                question=mcq_prompt(row["question"], options),
                answer=row["answer"],
                images=images[:1],
                options=options,
                category=DIMENSIONS.get(int(row.get("question_type_id", 0)), ""),
                extra={"raw_question": row["question"]},
            )
        ]
