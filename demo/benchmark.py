"""The demo's benchmark: questions about generated shape scenes (`aki_demo.shapes`), held out by seed.

aki-eval --model DIR --benchmarks aki_demo.benchmark:Shapes
"""

import json
from pathlib import Path

from aki_eval.benchmarks.base import Benchmark, Score, mean
from aki_eval.data import Record
from aki_training.data import VQA_PROMPT  # held-out questions are asked as training asked them

from .shapes import ShapesSource


class Shapes(Benchmark):
    """Exact-match accuracy on scenes the training stream never draws (another seed).

    The scenes are generated, not read. Their settings (ShapesSource's grid, most, kinds, image_size)
    come from `DATA_ROOT/shapes.json` when it exists, so they match the training data's.
    """

    name = "shapes"
    columns = ("Shapes",)
    max_new_tokens = 8
    image_separator = "\n"  # the training template's `<image>\n`
    size, seed = 300, 10_000
    reads_back_predictions = False  # not a VLMEvalKit benchmark

    def load(self, data_root, hf_config=None, skipped=None) -> list[Record]:
        settings_file = Path(data_root) / "shapes.json"
        settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
        source = ShapesSource(self.size, self.seed, stage="sft", **settings)
        records = []
        for index in range(len(source)):
            sample = source[index]
            item = sample["record"]
            records.append(
                Record(
                    index=str(index),
                    question=VQA_PROMPT.format(question=item["question"]),
                    answer=item["answer"],
                    images=[item["image"]],
                    category=sample["kind"],
                )
            )
        return records

    def score_read_back(self, records, predictions, judge=None) -> Score:
        def normalise(text: str) -> str:
            return text.strip().rstrip(".").lower()

        hits = {r.index: float(normalise(predictions[r.index]) == r.answer) for r in records}
        overall = 100 * mean(hits.values())
        by_kind = {}
        for record in records:
            by_kind.setdefault(record.category, []).append(hits[record.index])
        return Score(
            columns={"Shapes": overall},
            metrics={"Overall": overall, "by_question": {k: 100 * mean(v) for k, v in by_kind.items()}},
        )
