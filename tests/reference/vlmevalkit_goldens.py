"""Golden scores from VLMEvalKit's own `evaluate()` (commit 6c85ef78, the AKI paper's) on small real-layout files.

Not a test: it made `tests/reference/vlmevalkit/` (the TSVs, `predictions.json` and `goldens.json`), which
`tests/test_eval_parity.py` scores with aki_eval and compares. Run it in a scratch environment outside the
repository, never in the project's (VLMEvalKit's package imports pull in far more than its scoring needs):

    python -m venv /tmp/vlmeval-venv
    /tmp/vlmeval-venv/bin/pip install pandas numpy openpyxl xlsxwriter requests tqdm tabulate validators sty \
        huggingface_hub portalocker rich pillow matplotlib
    git clone https://github.com/open-compass/VLMEvalKit /tmp/VLMEvalKit && git -C /tmp/VLMEvalKit checkout 6c85ef78
    /tmp/vlmeval-venv/bin/python tests/reference/vlmevalkit_goldens.py --vlmevalkit /tmp/VLMEvalKit

Each benchmark goes the way VLMEvalKit's `run.py` sends it: the TSV read with pandas, the predictions written to
an .xlsx file and read back, then the dataset's `evaluate()`. The LLM judge is a stand-in, `stand_in_reply`, that
the parity test asks too; every prompt VLMEvalKit sends it is recorded, so the test can compare judge calls.
"""

import argparse
import base64
import io
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path

FOLDER = Path(__file__).parent / "vlmevalkit"


def stand_in_reply(prompt: str) -> str:
    """The judge's reply: X from `judge-says-<X>` in the prompt (possibly empty), else one that reads as nothing."""
    match = re.search(r"judge-says-<(.*?)>", prompt)
    if match:
        return match[1]
    if "single-choice question" in prompt:
        return "Z"
    if "The options are only Yes / No" in prompt:
        return "Unknown"
    if "Extracted answer:" in prompt:
        return ""
    return "0.0"


def judged_answer(prompt: str) -> str:
    """The model answer a judge prompt asks about (MCQ, MathVista and MM-Vet prompts)."""
    if prompt.rstrip().endswith("|"):  # MM-Vet: the last row of its table, "question | truth | answer | "
        return prompt.rstrip().split("\n")[-1].split("|")[2].strip()
    return re.findall(r"(?:Answer|Model respone): (.*?)(?:\nYour output|Extracted answer:)", prompt, re.S)[-1]


def image_b64(colour: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mcq(index, answer, prediction, options, question="Which one?", **extra):
    return {"index": index, "question": question, **options, "answer": answer, **extra}, prediction


ABCD = {"A": "apple", "B": "banana", "C": "cherry", "D": "grape"}

# Each case: (a TSV row without its image, the model's prediction). Comments say what differs from a naive reading.
CASES = {
    "SEEDBench_IMG": [
        mcq(0, "D", "D", {**ABCD, "D": "None"}),  # pandas reads the option "None" as missing: D is no option
        mcq(1, "A", "A", {**ABCD, "C": "N/A"}),
        mcq(2, "B", "None", ABCD),  # read back from .xlsx as "nan": the judge gets it
        mcq(3, "C", "I pick judge-says-<C>", ABCD),
        mcq(4, "A", "B", ABCD),
        mcq(5, "A", "null", {**ABCD, "B": "null"}),
        mcq(6, "B", "The answer is (B).", ABCD),
        mcq(7, "A", "", ABCD),  # an empty answer is "nan" too
    ],
    "RealWorldQA": [
        mcq(0, "B", "None", {"A": "Yes", "B": "No"}),  # "nan" holds no "no"
        mcq(1, "Red", "Red", {}),  # no options: always wrong there
        mcq(2, "C", "C", {"A": "1", "B": "2", "C": "3"}),
        mcq(3, "5", "5", {}),
        mcq(4, "A", "Yes, it is.", {"A": "Yes", "B": "No"}),
    ],
    "MMMU_DEV_VAL": [
        mcq(0, "E", "A", ABCD, split="validation", category="Art"),  # a letter without option stays the truth
        mcq(1, "banana", "A", {"A": "apple", "B": "banana"}, split="validation", category="Art"),  # not a letter: 'A'
        mcq(2, "B", "B", {}, split="validation", category="Math"),  # open, truth a letter: 'B' = "Other Answers"
        mcq(3, "3.5", "The speed is 3.5 m/s", {}, split="validation", category="Physics"),
        mcq(4, "E", "E", ABCD, split="validation", category="Art"),
        mcq(5, "C", "judge-says-<C>", ABCD, split="dev", category="Art"),
    ],
    "MathVista_MINI": [
        *[
            (
                {
                    "index": i,
                    "question": "Which fraction?",
                    "answer": "8/11",
                    "question_type": "multi_choice",
                    "answer_type": "text",
                    "choices": "['3/11', '8/11', '6/11']",
                    "answer_option": "B",
                    "task": "figure question answering",
                    "skills": "['algebraic reasoning']",
                },
                prediction,
            )
            for i, prediction in enumerate(
                ["The answer is (C)", "Z judge-says-<B>", "(B) 8/11", "I think judge-says-<B>"]
            )  # a wrong rule letter, even 'Z', is final: the judge is not asked
        ],
        *[
            (
                {
                    "index": 10 + i,
                    "question": "How many?",
                    "answer": answer,
                    "question_type": "free_form",
                    "answer_type": kind,
                    "choices": "",
                    "answer_option": "",
                    "task": "math word problem",
                    "skills": "['arithmetic reasoning', 'numeric commonsense']",
                },
                prediction,
            )
            for i, (answer, kind, prediction) in enumerate(
                [
                    ("0", "integer", "0"),  # 0 is falsy: the rule's answer is dropped and the judge asked
                    ("14", "integer", "14"),
                    ("7", "integer", "seven judge-says-<>"),  # an empty first reply is kept
                    ("7", "integer", "seven judge-says-<7>"),
                    ("1.5", "float", "1.5"),
                    ("1.5", "float", "judge-says-<1>"),
                    ("cat", "text", "cat"),  # text answers never count there
                ]
            )
        ],
    ],  # fmt: skip
    "MMBench_DEV_EN": [
        # Group 0 right by the rules; group 1 lost by a rule letter (no judge); group 2 judged twice, lost at
        # the second; group 3 lost at the first judged rotation (the second is not asked); group 4 won by a judge.
        *[
            mcq(
                index,
                answer,
                prediction,
                options,
                question="What fruit?",
                hint="",
                category=category,
                **{"l2-category": l2},
            )
            for index, answer, prediction, options, category, l2 in [
                (0, "A", "A", {"A": "apple", "B": "banana"}, "image_style", "coarse_perception"),
                (1, "A", "B", {"A": "apple", "B": "banana"}, "image_style", "coarse_perception"),
                (
                    2,
                    "A",
                    "hmm judge-says-<A>",
                    {"A": "apple", "B": "banana"},
                    "ocr",
                    "finegrained_perception (instance-level)",
                ),
                (
                    3,
                    "A",
                    "hmm judge-says-<B>",
                    {"A": "apple", "B": "banana"},
                    "ocr",
                    "finegrained_perception (instance-level)",
                ),
                (4, "B", "(B)", {"A": "apple", "B": "banana"}, "ocr", "finegrained_perception (instance-level)"),
                (1_000_000, "B", "B", {"A": "banana", "B": "apple"}, "image_style", "coarse_perception"),
                (1_000_001, "B", "judge-says-<B>", {"A": "banana", "B": "apple"}, "image_style", "coarse_perception"),
                (
                    1_000_002,
                    "B",
                    "judge-says-<A>",
                    {"A": "banana", "B": "apple"},
                    "ocr",
                    "finegrained_perception (instance-level)",
                ),
                (
                    1_000_003,
                    "B",
                    "judge-says-<B>",
                    {"A": "banana", "B": "apple"},
                    "ocr",
                    "finegrained_perception (instance-level)",
                ),
                (
                    1_000_004,
                    "A",
                    "well judge-says-<A>",
                    {"A": "banana", "B": "apple"},
                    "ocr",
                    "finegrained_perception (instance-level)",
                ),
            ]
        ],
    ],  # fmt: skip
    "MMVet": [
        # VLMEvalKit's per-capability numbers count a single-capability row twice (as capability and combination).
        ({"index": index, "question": "What is it?", "answer": "a cat", "category": category}, prediction)
        for index, (category, prediction) in enumerate(
            [
                ("rec", "judge-says-<1.0>"),
                ("rec,ocr", "judge-says-<0.0>"),
                ("ocr", "judge-says-<0.5>"),
                ("rec,know,gen", "judge-says-<1.0>"),
                ("ocr,spat,math", "judge-says-<0.2>"),
                ("rec,ocr", "no idea"),
            ]
        )
    ],  # fmt: skip
}
COLOURS = ("red", "green", "blue", "white")


def write_fixtures() -> None:
    import pandas as pd

    FOLDER.mkdir(parents=True, exist_ok=True)
    predictions = {}
    for name, cases in CASES.items():
        rows = [{**row, "image": image_b64(COLOURS[i % len(COLOURS)])} for i, (row, _) in enumerate(cases)]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        # Written as text, so cells such as "None" reach the readers exactly as a real TSV holds them.
        frame = pd.DataFrame([{key: str(row.get(key, "")) for key in columns} for row in rows], columns=columns)
        frame.to_csv(FOLDER / f"{name}.tsv", sep="\t", index=False)
        predictions[name] = {str(row["index"]): prediction for row, prediction in cases}
    (FOLDER / "predictions.json").write_text(json.dumps(predictions, indent=1) + "\n")


def import_vlmevalkit(root: Path):
    """VLMEvalKit's dataset modules, without running its package `__init__` files (they import every model)."""
    for name, path in (("vlmeval", root / "vlmeval"), ("vlmeval.dataset", root / "vlmeval" / "dataset")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from vlmeval.dataset import image_mcq, image_vqa
    from vlmeval.smp import dump, load

    return image_mcq, image_vqa, load, dump


class StandInJudge:
    """What VLMEvalKit's build_judge returns, answering with `stand_in_reply` and recording each prompt."""

    def __init__(self, asked: list):
        self.asked = asked

    def working(self) -> bool:
        return True

    def generate(self, prompt, **kwargs) -> str:
        self.asked.append(prompt)
        return stand_in_reply(prompt)


def frame_records(frame) -> list[dict]:
    """A result frame as JSON-ready rows (NaN as None)."""
    return json.loads(frame.to_json(orient="records"))


def run_vlmevalkit(root: Path) -> dict:
    image_mcq, image_vqa, load, dump = import_vlmevalkit(root)
    os.environ["OPENAI_API_KEY"] = "sk-stand-in"  # gpt_key_set(); no request leaves the stand-in
    predictions = json.loads((FOLDER / "predictions.json").read_text())
    classes = {
        "SEEDBench_IMG": image_mcq.ImageMCQDataset,
        "RealWorldQA": image_mcq.ImageMCQDataset,
        "MMMU_DEV_VAL": image_mcq.MMMUDataset,
        "MMBench_DEV_EN": image_mcq.ImageMCQDataset,
        "MathVista_MINI": image_vqa.MathVista,
        "MMVet": image_vqa.MMVet,
    }
    goldens = {"vlmevalkit_commit": "6c85ef78"}
    for name, cls in classes.items():
        asked = []
        image_mcq.build_judge = image_vqa.build_judge = lambda asked=asked, **kwargs: StandInJudge(asked)
        dataset = cls.__new__(cls)  # the constructor would download the TSV
        dataset.dataset_name = name
        dataset.data = load(str(FOLDER / f"{name}.tsv"))
        with tempfile.TemporaryDirectory() as scratch:
            # inference.py: the dataset's rows with a `prediction` column, no images, saved as .xlsx.
            data = load(str(FOLDER / f"{name}.tsv"))
            data["prediction"] = [str(predictions[name][str(index)]) for index in data["index"]]
            data.pop("image")
            eval_file = str(Path(scratch) / f"AKI_{name}.xlsx")
            dump(data, eval_file)
            judged_by_gpt4 = cls in (image_vqa.MathVista, image_vqa.MMVet)
            judge = {"model": "gpt-4-turbo"} if judged_by_gpt4 else {"model": "chatgpt-0125"}
            score = dataset.evaluate(eval_file, nproc=1, **judge)
            if cls is image_vqa.MMVet:
                detail = load(eval_file.replace(".xlsx", "_gpt-4-turbo.xlsx"))
                per_row = {str(i): float(g) for i, g in zip(detail["index"], detail["score"], strict=True)}
            elif cls is image_vqa.MathVista:
                detail = load(eval_file.replace(".xlsx", "_gpt-4-turbo.xlsx"))
                per_row = {
                    str(i): {"res": str(r), "log": str(g)}
                    for i, r, g in zip(detail["index"], detail["res"], detail["log"], strict=True)
                }
            else:
                detail = load(eval_file.replace(".xlsx", "_openai_result.xlsx"))
                per_row = {str(i): int(h) for i, h in zip(detail["index"], detail["hit"], strict=True)}
        goldens[name] = {
            "score": frame_records(score),
            "per_row": per_row,
            "judged": sorted(judged_answer(prompt) for prompt in asked),
        }  # fmt: skip
    return goldens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlmevalkit", type=Path, required=True, help="a VLMEvalKit checkout at commit 6c85ef78")
    args = parser.parse_args()
    write_fixtures()
    goldens = run_vlmevalkit(args.vlmevalkit)
    (FOLDER / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")


if __name__ == "__main__":
    main()
