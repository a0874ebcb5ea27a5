"""Multiple-choice benchmarks the VLMEvalKit way: the MCQ prompt, rule extraction, optional judge."""

import logging
import random
from collections import defaultdict

from ..data import Record, is_missing, options_of
from ..extract import can_infer
from .base import Benchmark, Score, judge_label, mean

logger = logging.getLogger("aki.eval")

# VLMEvalKit's option matcher, used only when the rules find no option and a judge is configured.
MATCH_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: "
)


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's ImageMCQDataset prompt."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def judge_option(judge, record: Record, prediction: str) -> str:
    """The judge's letter for a prediction the rules could not read (3 tries, then random over options + Z)."""
    options = "There are several options: \n" + "".join(
        f"{letter}. {text}\n" for letter, text in record.options.items()
    )
    question = record.extra.get("raw_question", record.question)
    prompt = MATCH_PROMPT.format(question=question, options=options, prediction=prediction)
    for _ in range(3):
        reply = judge.ask(prompt, max_tokens=16)
        letter = can_infer(reply, dict(record.options)) if reply else False
        if letter:
            return letter
    return random.Random(record.index).choice([*record.options, "Z"])


def choose(record: Record, prediction: str, judge) -> tuple[str, str]:
    """(letter, how): the rules first; the judge only for what they cannot read; else 'Z'."""
    letter = can_infer(prediction, record.options)
    if letter:
        return letter, "rule"
    if judge is not None:
        return judge_option(judge, record, prediction), "judge"
    return "Z", "unreadable"


def group_of(record: Record) -> str:
    """The circular group of a rotated copy: its index modulo 1e6 (VLMEvalKit's `g_index`)."""
    return str(int(float(record.index)) % 1_000_000)


def circular_hit(rotations: list[Record], predictions: dict[str, str], judge, how: dict) -> float:
    """1.0 when every rotation is right, judging as VLMEvalKit does: none when the rules already read a
    wrong letter, and rotation by rotation (in index order) only until the first wrong one."""
    letters = [can_infer(predictions[rotation.index], rotation.options) for rotation in rotations]
    how["rule"] += sum(1 for letter in letters if letter)
    if any(letter and letter != rotation.answer for letter, rotation in zip(letters, rotations, strict=True)):
        return 0.0
    for letter, rotation in zip(letters, rotations, strict=True):
        if letter:
            continue
        if judge is None:
            how["unreadable"] += 1
            return 0.0
        how["judge"] += 1
        if judge_option(judge, rotation, predictions[rotation.index]) != rotation.answer:
            return 0.0
    return 1.0


class MCQBenchmark(Benchmark):
    """Plain accuracy over questions; subclasses map their columns."""

    circular = False

    def from_tsv(self, row: dict) -> list[Record]:
        hint = None if is_missing(row.get("hint")) else row["hint"]
        options = options_of(row)
        return [
            Record(
                index=str(row["index"]),
                question=mcq_prompt(row["question"], options, hint),
                answer=row["answer"],
                images=row["_images"],
                options=options,
                category=row.get("category", ""),
                extra={
                    "raw_question": row["question"],
                    "l2-category": row.get("l2-category", ""),
                    "split": row.get("split", ""),
                },
            )
        ]

    def evaluate(self, records: list[Record], predictions: dict[str, str], judge) -> tuple[dict[str, float], dict]:
        """Hits per question (per circular group when `circular`), with counts of how answers were read."""
        how = defaultdict(int)
        if not self.circular:
            hits = {}
            for record in records:
                letter, method = choose(record, predictions[record.index], judge)
                how[method] += 1
                hits[record.index] = float(letter == record.answer)
            return hits, dict(how)
        groups = defaultdict(list)
        for record in sorted(records, key=lambda r: int(float(r.index))):
            groups[group_of(record)].append(record)
        hits = {group: circular_hit(rotations, predictions, judge, how) for group, rotations in groups.items()}
        return hits, dict(how)

    def accuracy_by(self, records: list[Record], hits: dict[str, float], key) -> dict[str, float]:
        grouped = defaultdict(list)
        seen = set()
        for record in records:
            group = group_of(record) if self.circular else record.index
            if group in seen:
                continue
            seen.add(group)
            grouped[key(record)].append(hits[group])
        return {name: 100 * mean(values) for name, values in sorted(grouped.items())}

    def score_read_back(self, records: list[Record], predictions: dict[str, str], judge=None) -> Score:
        hits, how = self.evaluate(records, predictions, judge)
        return self.summarise(records, hits, how, judge)

    def summarise(self, records: list[Record], hits: dict[str, float], how: dict, judge) -> Score:
        overall = 100 * mean(hits.values())
        metrics = {
            "Overall": overall,
            "answers_read_by": how,
            "by_category": self.accuracy_by(records, hits, lambda r: r.category),
        }
        return Score(
            columns={self.columns[0]: overall},
            metrics=metrics,
            judge=judge_label(judge, how),
        )
