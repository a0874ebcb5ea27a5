"""MME: yes/no questions in pairs per image; a subtask scores acc + acc+ (both questions right), max 200."""

from collections import defaultdict

from ..data import Record
from .base import Benchmark, Score, judge_label, mean
from .yorn import read_yes_no, yes_no_record

PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene")
COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


class MME(Benchmark):
    name = "mme"
    columns = ("MME-P", "MME-C")
    tsv_names = ("MME.tsv",)
    hf_dirs = ("MME",)
    hf_split = "test"

    def from_tsv(self, row: dict) -> list[Record]:
        # The two questions of an image share its path (or point at the same image row).
        image_key = row.get("image_path") or (row["image"] if len(row["image"]) <= 64 else row["index"])
        return [yes_no_record(row, row["_images"], str(row["index"]), image=image_key)]

    def from_hf(self, row: dict) -> list[Record]:
        return [yes_no_record(row, [row["image"]], str(row["_position"]), image=row["question_id"])]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        per_image = defaultdict(list)
        how = defaultdict(int)
        for record in records:
            answer, method = read_yes_no(record.question, predictions[record.index], judge)
            how[method] += 1
            per_image[(record.category, record.extra["image"])].append(float(answer == record.answer))
        categories = {}
        for category in sorted({category for category, _ in per_image}):
            images = [hits for (c, _), hits in per_image.items() if c == category]
            acc = 100 * mean(hit for hits in images for hit in hits)
            acc_plus = 100 * mean(float(all(hits)) for hits in images)
            categories[category] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}
        perception = sum(categories[c]["score"] for c in PERCEPTION if c in categories)
        cognition = sum(categories[c]["score"] for c in COGNITION if c in categories)
        missing = [c for c in (*PERCEPTION, *COGNITION) if c not in categories]
        return Score(
            columns={"MME-P": perception, "MME-C": cognition},
            metrics={
                "perception": perception,
                "cognition": cognition,
                "by_category": categories,
                "answers_read_by": dict(how),
            },
            judge=judge_label(judge, how),
            notes=[f"subtasks without data: {', '.join(missing)}"] if missing else [],
        )
