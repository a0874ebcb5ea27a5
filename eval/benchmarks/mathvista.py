"""MathVista testmini: rule prefetch, else the judge extracts the answer; then VLMEvalKit's exact checks.

Kept as VLMEvalKit scores it: integer and float answers must equal the truth exactly after int() or
float(), and text or list answers never count (a bug of the toolkit that the paper's number carries).
"""

import ast
from collections import defaultdict

from ..data import Record, as_read_back, is_missing
from ..extract import can_infer
from .base import NEEDS_JUDGE, Benchmark, Score

TASK = "\nPlease read the following example.\nThen extract the answer from the model response and type it at the end of the prompt.\n\n"
EXAMPLES = [
    "\nHint: Please answer the question requiring an integer answer and provide the final value,\ne.g., 1, 2, 3, at the end.\n\n"
    "Question: Which number is missing?\n\nModel response: The number missing in the sequence is 14.\n\nExtracted answer: 14\n",
    "\nHint: Please answer the question requiring a floating-point number with one decimal place and provide the final value,\n"
    "e.g., 1.2, 1.3, 1.4, at the end.\n\nQuestion: What is the fraction of females facing the camera?\n\n"
    "Model response: The fraction of females facing the camera is 0.6,\nwhich means that six out of ten females in the group are facing the camera.\n\n"
    "Extracted answer: 0.6\n",
    "\nHint: Please answer the question requiring a floating-point number with two decimal places and provide the final value,\n"
    "e.g., 1.23, 1.34, 1.45, at the end.\n\nQuestion: How much money does Luca need to buy a sour apple candy and a butter-scotch candy? (Unit: $)\n\n"
    "Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.\n\nExtracted answer: 1.45\n",
    "\nHint: Please answer the question requiring a Python list as an answer and provide the final list,\n"
    "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n\nQuestion: Between which two years does the line graph saw its maximum peak?\n\n"
    "Model response: The line graph saw its maximum peak between 2007 and 2008.\n\nExtracted answer: [2007, 2008]\n",
    "\nHint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n\n"
    "Question: What fraction of the shape is blue?\n\nChoices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n\n"
    "Model response: The correct answer is (B) 8/11.\n\nExtracted answer: B\n",
]


def judge_prompt(question: str, prediction: str) -> str:
    # "respone" and the missing newline before "Extracted answer:" are the toolkit's, kept for parity.
    return (
        TASK
        + "".join(example + "\n" for example in EXAMPLES)
        + question
        + "\n"
        + "Model respone: "
        + prediction
        + "Extracted answer:"
    )


def prefetch(record: Record, prediction: str):
    """VLMEvalKit's rule answer, final when truthy: for a choice question any letter the rules find (even a
    wrong one, or 'Z'); for a number, the number when it equals the truth. Zero is falsy there, so a right
    answer 0 still goes to the judge."""
    try:
        if record.extra["question_type"] == "multi_choice":
            return can_infer(prediction, record.options)
        if record.extra["answer_type"] == "integer" and int(prediction) == int(record.answer):
            return int(prediction)
        if record.extra["answer_type"] == "float" and float(prediction) == float(record.answer):
            return float(prediction)
    except ValueError:
        pass
    return False


def check(record: Record, response: str) -> bool:
    """VLMEvalKit's post_check for the final (prefetched or extracted) response."""
    kind = record.extra["question_type"]
    try:
        if kind == "multi_choice":
            return can_infer(response, record.options) == record.extra["answer_option"]
        if record.extra["answer_type"] == "integer":
            return int(response) == int(record.answer)
        if record.extra["answer_type"] == "float":
            return float(response) == float(record.answer)
    except ValueError:
        return False
    return False  # text and list answers: never equal in the toolkit


class MathVista(Benchmark):
    name = "mathvista"
    columns = ("MathV",)
    tsv_names = ("MathVista_MINI.tsv",)
    hf_dirs = ("MathVista",)
    hf_split = "testmini"

    def from_tsv(self, row: dict) -> list[Record]:
        choices = [] if is_missing(row.get("choices")) else ast.literal_eval(row["choices"])
        return [
            Record(
                index=str(row["index"]),
                question=row["question"],
                answer=str(row["answer"]),
                images=row["_images"],
                options={chr(65 + i): str(choice) for i, choice in enumerate(choices)},
                category=row.get("task", ""),
                extra={
                    "question_type": row["question_type"],
                    "answer_type": row["answer_type"],
                    "answer_option": row.get("answer_option", ""),
                    "skills": row.get("skills", "[]"),
                },
            )
        ]

    def from_hf(self, row: dict) -> list[Record]:
        choices = list(row["choices"] or [])
        options = {chr(65 + i): str(choice) for i, choice in enumerate(choices)}
        answer_option = next((letter for letter, text in options.items() if text == str(row["answer"])), "")
        metadata = row.get("metadata") or {}
        return [
            Record(
                index=str(row["pid"]),
                question=row["query"],
                answer=str(row["answer"]),
                images=[row.get("decoded_image") or row["image"]],
                options=options,
                category=metadata.get("task", ""),
                extra={
                    "question_type": row["question_type"],
                    "answer_type": row["answer_type"],
                    "answer_option": answer_option,
                    "skills": str(metadata.get("skills", [])),
                },
            )
        ]

    def extract(self, record: Record, prediction: str, judge) -> tuple[str, bool]:
        """(the response to check, whether the rules sufficed). The judge is asked once: VLMEvalKit retries
        only a failed API call (which our Judge retries itself) and keeps even an empty reply. Its reply is
        checked after VLMEvalKit's .xlsx round trip too, so an extracted "None" or "" is the text "nan"."""
        rule = prefetch(record, prediction)
        if rule:
            return str(rule), True
        if judge is None:
            return "", False
        reply = judge.ask(judge_prompt(record.question, prediction), temperature=0.0, max_tokens=128)
        return as_read_back(reply.strip()), False

    def score_read_back(self, records, predictions, judge=None) -> Score:
        totals, hits, prefetched = defaultdict(int), defaultdict(int), defaultdict(int)
        for record in records:
            response, by_rule = self.extract(record, predictions[record.index], judge)
            try:
                skills = ast.literal_eval(record.extra["skills"])
            except (ValueError, SyntaxError):
                skills = [record.extra["skills"]]
            for key in ("Overall", record.category, *skills):
                totals[key] += 1
                prefetched[key] += by_rule
                hits[key] += check(record, response)
        metrics = {
            key: {"acc": 100 * hits[key] / totals[key], "prefetch_rate": 100 * prefetched[key] / totals[key]}
            for key in totals
        }
        if judge is None:  # VLMEvalKit requires a judge; what the rules alone read is only a lower bound
            rule_based = {"rule-based lower bound (prefetch only, no judge)": metrics["Overall"]["acc"]}
            return Score(columns={"MathV": NEEDS_JUDGE}, metrics={**rule_based, "by_task": metrics})
        return Score(columns={"MathV": metrics["Overall"]["acc"]}, metrics=metrics, judge=judge.name)
