"""POPE: yes/no object questions; the headline is F1 pooled over the adversarial, popular and random splits."""

from collections import defaultdict

from ..data import Record
from .base import Benchmark, Score, judge_label
from .yorn import read_yes_no, yes_no_record


def rates(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 (x100) with 'Yes' as the positive class."""
    true_positive = sum(1 for truth, guess in pairs if truth == "Yes" and guess == "Yes")
    false_positive = sum(1 for truth, guess in pairs if truth == "No" and guess == "Yes")
    false_negative = sum(1 for truth, guess in pairs if truth == "Yes" and guess != "Yes")
    correct = sum(1 for truth, guess in pairs if truth == guess)
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0.0
    recall = true_positive / (true_positive + false_negative) if true_positive + false_negative else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"F1": 100 * f1, "acc": 100 * correct / len(pairs), "precision": 100 * precision, "recall": 100 * recall}


class POPE(Benchmark):
    name = "pope"
    columns = ("POPE",)
    tsv_names = ("POPE.tsv",)
    hf_dirs = ("POPE",)
    hf_split = "test"

    def from_tsv(self, row: dict) -> list[Record]:
        # `category` may be a comma list: one shared question can sit in several splits.
        return [yes_no_record(row, row["_images"], str(row["index"]))]

    def from_hf(self, row: dict) -> list[Record]:
        # question_id restarts in each split (adversarial, popular, random): the split makes it unique.
        return [yes_no_record(row, [row["image"]], f"{row['category']}-{row['question_id']}")]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        by_split, how = defaultdict(list), defaultdict(int)
        for record in records:
            guess, method = read_yes_no(record.question, predictions[record.index], judge)
            how[method] += 1
            for split in record.category.split(","):  # explode shared questions into each split
                by_split[split.strip()].append((record.answer, guess))
        pooled = rates([pair for pairs in by_split.values() for pair in pairs])
        return Score(
            columns={"POPE": pooled["F1"]},
            metrics={
                "Overall": pooled,
                "by_split": {split: rates(pairs) for split, pairs in sorted(by_split.items())},
                "rows": sum(len(p) for p in by_split.values()),
                "answers_read_by": dict(how),
            },
            judge=judge_label(judge, how),
        )
