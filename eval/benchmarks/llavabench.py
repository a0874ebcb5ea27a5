"""LLaVA-Bench (in the wild): a judge rates the GPT-4 reference and our answer; relative score = ours / reference."""

from collections import defaultdict

from ..data import Record
from .base import NEEDS_JUDGE, Benchmark, Score, mean

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with a few sentences describing the image. \nPlease rate the helpfulness, relevance, "
    "accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, "
    "where a higher score indicates better overall performance.\nPlease first output a single line containing only "
    "two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)


def judge_prompt(caption: str, question: str, reference: str, prediction: str) -> str:
    return (
        f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{prediction}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{RULE}\n\n"
    )


def parse_scores(review: str) -> tuple[float, float]:
    """The two scores on the reply's first line; (-1, -1) otherwise (kept in the means, as VLMEvalKit does)."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    return -1.0, -1.0


class LLaVABench(Benchmark):
    name = "llavabench"
    columns = ("LLaVA-W",)
    tsv_names = ("LLaVABench.tsv",)
    hf_dirs = ("llava-bench-in-the-wild", "LLaVABench")
    hf_split = "train"

    def from_tsv(self, row: dict) -> list[Record]:
        return [
            Record(
                index=str(row["index"]),
                question=row["question"],
                answer=row["gpt4_ans"],
                images=row["_images"],
                category=row["category"],
                extra={"caption": row["caption"]},
            )
        ]

    def from_hf(self, row: dict) -> list[Record]:
        return [
            Record(
                index=str(row["question_id"]),
                question=row["question"],
                answer=row["gpt_answer"],
                images=[row["image"]],
                category=row["category"],
                extra={"caption": row["caption"]},
            )
        ]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        if judge is None:
            return Score(columns=dict.fromkeys(self.columns, NEEDS_JUDGE), notes=["no judge configured"])
        pairs = defaultdict(list)
        for record in records:
            prompt = judge_prompt(record.extra["caption"], record.question, record.answer, predictions[record.index])
            reference, ours = parse_scores(judge.ask(prompt, system=SYSTEM, temperature=0.2, max_tokens=1024))
            pairs["overall"].append((reference, ours))
            pairs[record.category].append((reference, ours))
        table = {
            split: {
                "Relative Score (main)": 100 * mean(o for _, o in values) / mean(r for r, _ in values),
                "VLM Score": 10 * mean(o for _, o in values),
                "GPT4 Score": 10 * mean(r for r, _ in values),
            }
            for split, values in pairs.items()
        }
        return Score(columns={"LLaVA-W": table["overall"]["Relative Score (main)"]}, metrics=table, judge=judge.name)
