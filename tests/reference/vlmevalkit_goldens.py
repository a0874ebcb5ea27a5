"""Golden scores from VLMEvalKit's own `evaluate()` (commit 6c85ef78, the AKI paper's) on small real-layout files.

Not a test: it made `tests/reference/vlmevalkit/` (the TSVs, `predictions.json` and `goldens.json`) and
`tests/reference/vlmevalkit/missing/` (every benchmark of the paper's table answered with texts pandas reads as
missing), which `tests/test_eval_parity.py` and `tests/test_eval_missing_predictions.py` score with aki_eval and
compare. Run it in a scratch environment outside the repository, never in the project's (VLMEvalKit's package
imports pull in far more than its scoring needs):

    python -m venv /tmp/vlmeval-venv
    /tmp/vlmeval-venv/bin/pip install "pandas==2.2.3" "numpy<2.2" openpyxl xlsxwriter requests tqdm tabulate \
        validators sty huggingface_hub portalocker rich pillow matplotlib
    git clone https://github.com/open-compass/VLMEvalKit /tmp/VLMEvalKit && git -C /tmp/VLMEvalKit checkout 6c85ef78
    git clone https://github.com/sony/aki /tmp/sony-aki
    /tmp/vlmeval-venv/bin/python tests/reference/vlmevalkit_goldens.py --vlmevalkit /tmp/VLMEvalKit \
        --aki-official /tmp/sony-aki

Each benchmark goes the way VLMEvalKit's `run.py` sends it: the TSV read with pandas, the predictions written to
an .xlsx file and read back, then the dataset's `evaluate()`. The LLM judge is a stand-in, `stand_in_reply`, that
the parity tests ask too; every prompt VLMEvalKit sends it is recorded, so the tests can compare judge calls.
pandas 2.2.3 was the release when that commit was made (VLMEvalKit pins none); pandas 3.1.1 writes the same
goldens but for the version it records. CV-Bench is not VLMEvalKit's in the paper: its golden comes from the AKI authors' own script
(`codes/open_flamingo/eval_cv_bench/eval.py`), run with its model and dataset loader replaced by the fixture's
predictions and rows (its scoring and its pandas frames run as written).
"""

import argparse
import ast
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
MISSING_FOLDER = FOLDER / "missing"


def stand_in_reply(prompt: str) -> str:
    """The judge's reply: X from `judge-says-<X>` in the prompt (possibly empty); else, where the question asks
    `judge-by-length`, a verdict that depends on the answer shown (`by_length`); else one that reads as nothing."""
    match = re.search(r"judge-says-<(.*?)>", prompt)
    if match:
        return match[1]
    if "judge-by-length" in prompt:
        return by_length(prompt)
    if "single-choice question" in prompt:
        return "Z"
    if "The options are only Yes / No" in prompt:
        return "Unknown"
    if "Extracted answer:" in prompt:
        return ""
    return "0.0"


def by_length(prompt: str) -> str:
    """A verdict from the length n of the answer the judge is shown, so "nan" (3) and "None" (4) differ: option A
    or Yes for odd n, else B or No; MathVista's extracted answer n; an MM-Vet grade n/10; LLaVA-W's pair "5 n"."""
    n = len(judged_answer(prompt))
    if "single-choice question" in prompt:
        return "AB"[n % 2 == 0]
    if "The options are only Yes / No" in prompt:
        return ("Yes", "No")[n % 2 == 0]
    if "Extracted answer:" in prompt:
        return str(n)
    if "[Assistant 2]" in prompt:
        return f"5 {min(n, 10)}"
    return f"{min(n, 10) / 10:.1f}"  # MM-Vet


def judged_answer(prompt: str) -> str:
    """The model answer a judge prompt asks about (MCQ, yes/no, MathVista, MM-Vet and LLaVA-W prompts)."""
    if prompt.rstrip().endswith("|"):  # MM-Vet: the last row of its table, "question | truth | answer | "
        return prompt.rstrip().split("\n")[-1].split("|")[2].strip()
    if "[Assistant 2]" in prompt:  # LLaVA-W: the reference is assistant 1, the model assistant 2
        return re.findall(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", prompt, re.S)[-1]
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

# Texts pandas reads as missing: after VLMEvalKit's .xlsx round trip each of them is scored as the text "nan".
MISSING = ("None", "NA", "N/A", "null", "nan", "")
AN = {"A": "an", "B": "the"}  # "an" is in "nan": the read-back text names A by the option-text rule
YES_NO = {"A": "Yes", "B": "No"}  # "no" is in "none": the text "None" itself would name B
ASK = "Which word fits? (judge-by-length)"  # what the rules cannot read goes to the judge, which sees its length
CATEGORIES = {
    "coarse_perception": "image_style",
    "finegrained_perception (instance-level)": "ocr",
}
MME_SUBTASKS = (
    "OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene",
    "code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation",
)  # fmt: skip


def mcq_missing(options_and_truths, **extra):
    """For each (options, truth), a question answered with each missing text in turn, numbered from 0."""
    return [
        mcq(len(MISSING) * k + i, truth, text, options, question=ASK, **extra)
        for k, (options, truth) in enumerate(options_and_truths)
        for i, text in enumerate(MISSING)
    ]


def circular_missing():
    """MMBench: one circular group per missing text and option set; both rotations answered with that text."""
    rows = []
    for k, (options, truth) in enumerate([(AN, "A"), (YES_NO, "B")]):
        for i, text in enumerate(MISSING):
            group = len(MISSING) * k + i
            letters = list(options)
            rotated = dict(zip(letters, [options[letter] for letter in letters[1:] + letters[:1]], strict=True))
            rotated_truth = letters[letters.index(truth) - 1]
            l2, category = list(CATEGORIES.items())[k]
            for index, opts, answer in ((group, options, truth), (1_000_000 + group, rotated, rotated_truth)):
                rows.append(
                    mcq(index, answer, text, opts, question=ASK, hint="", category=category, **{"l2-category": l2})
                )
    return rows


def mathvista_missing():
    choice = {
        "question_type": "multi_choice", "answer_type": "text", "choices": "['an', 'the']", "answer": "an",
        "answer_option": "A", "task": "figure question answering", "skills": "['algebraic reasoning']",
    }  # fmt: skip
    number = {
        "question_type": "free_form", "answer_type": "integer", "choices": "", "answer": "3", "answer_option": "",
        "task": "math word problem", "skills": "['arithmetic reasoning']",
    }  # fmt: skip
    return [
        *[({"index": i, "question": ASK, **choice}, text) for i, text in enumerate(MISSING)],  # "nan" names 'an'
        *[({"index": 10 + i, "question": ASK, **number}, text) for i, text in enumerate(MISSING)],  # judged: 3
        # The judge's own reply goes through VLMEvalKit's .xlsx file too: an extracted "None" is "nan" there.
        *[({"index": 20 + i, "question": "Which word fits?", **choice}, f"judge-says-<{text}>") for i, text in
          enumerate(MISSING)],
    ]  # fmt: skip


def mme_missing():
    """MME: two questions per image in every subtask (its rating needs all 14); the answers cycle through the
    missing texts, plus a plain yes and no, so each text meets both truths."""
    texts = [*MISSING, "Yes, it is.", "no"]
    rows = []
    for k, subtask in enumerate(MME_SUBTASKS):
        for j, truth in enumerate(("Yes", "No")):
            index = 2 * k + j
            row = {
                "index": index, "question": "Is it there? (judge-by-length)", "answer": truth,
                "category": subtask, "image_path": f"{subtask}/{k}.jpg",
            }  # fmt: skip
            rows.append((row, texts[(index + k) % len(texts)]))
    return rows


def pope_missing():
    texts = [*MISSING, "Yes", "No."]
    splits = ("adversarial", "popular", "random", "adversarial,popular")
    return [
        (
            {"index": i, "question": "Is there a dog? (judge-by-length)", "answer": ("Yes", "No")[i % 2],
             "category": splits[i % len(splits)]},
            texts[i % len(texts)],
        )
        for i in range(16)
    ]  # fmt: skip


MISSING_CASES = {
    "MME": mme_missing(),
    "MMBench_DEV_EN": circular_missing(),
    "SEEDBench_IMG": [*mcq_missing([(AN, "A"), (YES_NO, "A")]), mcq(12, "B", "The answer is B", YES_NO)],
    "LLaVABench": [
        (
            {
                "index": i,
                "question": "Describe it. (judge-by-length)",
                "caption": "A cat on a mat.",
                "gpt4_ans": "A cat sits on a mat.",
                "category": ("conv", "detail", "complex")[i % 3],
            },
            text,
        )
        for i, text in enumerate([*MISSING, "A cat."])
    ],
    "MMMU_DEV_VAL": [
        *mcq_missing([(AN, "A")], split="validation", category="Art"),
        # Open questions: the truth becomes option A, "Other Answers" option B; "an" is in "nan".
        *[
            mcq(10 + i, "an", text, {}, question=ASK, split="validation", category="Math")
            for i, text in enumerate(MISSING)
        ],
    ],
    "MathVista_MINI": mathvista_missing(),
    "POPE": pope_missing(),
    "MMVet": [
        ({"index": i, "question": "What is it? (judge-by-length)", "answer": "a cat", "category": category}, text)
        for i, (text, category) in enumerate(
            zip([*MISSING, "a cat"], ["rec", "ocr", "rec,ocr", "know", "spat", "gen", "ocr,spat,math"], strict=True)
        )  # its rating divides by the count of each of the six capabilities
    ],
    # The case: "None" to a yes/no question whose truth is "No" (13 rows, like the report that found it).
    "RealWorldQA": [*mcq_missing([(AN, "A"), (YES_NO, "B")]), mcq(12, "A", "A", YES_NO)],
}

# CV-Bench as the Hugging Face rows the AKI authors' script reads; idx restarts in each half.
CVBENCH_ROWS = [
    {"idx": idx, "type": kind, "source": source, "task": task, "question": "Which is closer to the camera?",
     "choices": ["the chair", "the lamp"], "answer": answer, "filename": f"img/{kind}/{source}/{idx}.png"}
    for kind, source, task, start in (("2D", "ADE20K", "Count", 0), ("2D", "COCO", "Relation", 4),
                                      ("3D", "Omni3D", "Depth", 0))
    for idx, answer in zip(range(start, start + 4), ("(A)", "(B)", "(A)", "(B)"), strict=True)
]  # fmt: skip
CVBENCH_PREDICTIONS = dict(
    zip(
        [f"{row['type']}-{row['idx']}" for row in CVBENCH_ROWS],
        ["A", *MISSING[:3], "B", "A.", *MISSING[3:], "B", "A", "(B)"],  # only the bare letter counts there
        strict=True,
    )
)

COLOURS = ("red", "green", "blue", "white")


def write_fixtures(folder: Path, cases: dict) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    predictions = {}
    for name, rows_and_predictions in cases.items():
        rows = [
            {**row, "image": image_b64(COLOURS[i % len(COLOURS)])} for i, (row, _) in enumerate(rows_and_predictions)
        ]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        # Written as text, so cells such as "None" reach the readers exactly as a real TSV holds them.
        frame = pd.DataFrame([{key: str(row.get(key, "")) for key in columns} for row in rows], columns=columns)
        frame.to_csv(folder / f"{name}.tsv", sep="\t", index=False)
        predictions[name] = {str(row["index"]): prediction for row, prediction in rows_and_predictions}
    if folder == MISSING_FOLDER:
        (folder / "CV-Bench.json").write_text(json.dumps(CVBENCH_ROWS, indent=1) + "\n")
        predictions["CV-Bench"] = CVBENCH_PREDICTIONS
    (folder / "predictions.json").write_text(json.dumps(predictions, indent=1) + "\n")


def import_vlmevalkit(root: Path):
    """VLMEvalKit's dataset modules, without running its package `__init__` files (they import every model)."""
    for name, path in (("vlmeval", root / "vlmeval"), ("vlmeval.dataset", root / "vlmeval" / "dataset")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from vlmeval.dataset import image_mcq, image_vqa, image_yorn
    from vlmeval.smp import dump, load

    return image_mcq, image_vqa, image_yorn, load, dump


class StandInJudge:
    """The goldens' judge, answering with `stand_in_reply` and recording each prompt: VLMEvalKit asks it through
    `generate` (it stands in for what VLMEvalKit's build_judge returns), aki_eval through `ask` (as its Judge)."""

    name = "stand-in"

    def __init__(self, asked: list | None = None):
        self.asked = [] if asked is None else asked

    def working(self) -> bool:
        return True

    def generate(self, prompt, **kwargs) -> str:
        self.asked.append(prompt)
        return stand_in_reply(prompt)

    def ask(self, prompt, system=None, **kwargs) -> str:
        return self.generate(prompt)

    @property
    def judged(self) -> list[str]:
        """The model answers it was asked about, in order."""
        return [judged_answer(prompt) for prompt in self.asked]


def frame_records(frame, key: str | None = None) -> list[dict]:
    """A result frame as JSON-ready rows (NaN as None), sorted by `key` where VLMEvalKit orders rows by a set."""
    records = json.loads(frame.to_json(orient="records"))
    return sorted(records, key=lambda row: row[key]) if key else records


def run_vlmevalkit(root: Path, folder: Path, names: list[str]) -> dict:
    image_mcq, image_vqa, image_yorn, load, dump = import_vlmevalkit(root)
    os.environ["OPENAI_API_KEY"] = "sk-stand-in"  # gpt_key_set(); no request leaves the stand-in
    predictions = json.loads((folder / "predictions.json").read_text())
    classes = {
        "MME": image_yorn.ImageYORNDataset,
        "SEEDBench_IMG": image_mcq.ImageMCQDataset,
        "RealWorldQA": image_mcq.ImageMCQDataset,
        "MMMU_DEV_VAL": image_mcq.MMMUDataset,
        "MMBench_DEV_EN": image_mcq.ImageMCQDataset,
        "LLaVABench": image_vqa.LLaVABench,
        "MathVista_MINI": image_vqa.MathVista,
        "POPE": image_yorn.ImageYORNDataset,
        "MMVet": image_vqa.MMVet,
    }
    goldens = {"vlmevalkit_commit": "6c85ef78"}
    for name in [name for name in classes if name in names]:
        cls = classes[name]
        asked = []
        for module in (image_mcq, image_vqa, image_yorn):
            module.build_judge = lambda asked=asked, **kwargs: StandInJudge(asked)
        dataset = cls.__new__(cls)  # the constructor would download the TSV
        dataset.dataset_name = name
        dataset.data = load(str(folder / f"{name}.tsv"))
        with tempfile.TemporaryDirectory() as scratch:
            # inference.py: the dataset's rows with a `prediction` column, no images, saved as .xlsx.
            data = load(str(folder / f"{name}.tsv"))
            data["prediction"] = [str(predictions[name][str(index)]) for index in data["index"]]
            data.pop("image")
            eval_file = str(Path(scratch) / f"AKI_{name}.xlsx")
            dump(data, eval_file)
            judged_by_gpt4 = cls in (image_vqa.MathVista, image_vqa.MMVet, image_vqa.LLaVABench)
            judge = {"model": "gpt-4-turbo"} if judged_by_gpt4 else {"model": "chatgpt-0125"}
            score = dataset.evaluate(eval_file, nproc=1, **judge)
            score_rows = frame_records(score, key="split" if "split" in score else None)
            per_row = per_row_results(cls, eval_file, load, image_vqa, image_yorn)
        goldens[name] = {
            "score": score_rows,
            "per_row": per_row,
            "judged": sorted(judged_answer(prompt) for prompt in asked),
        }  # fmt: skip
    return goldens


def per_row_results(cls, eval_file: str, load, image_vqa, image_yorn) -> dict:
    """What VLMEvalKit's evaluate() kept per question, from the files it wrote beside `eval_file`."""
    if cls is image_vqa.MMVet:
        detail = load(eval_file.replace(".xlsx", "_gpt-4-turbo.xlsx"))
        return {str(i): float(g) for i, g in zip(detail["index"], detail["score"], strict=True)}
    if cls is image_vqa.MathVista:
        detail = load(eval_file.replace(".xlsx", "_gpt-4-turbo.xlsx"))
        return {
            str(i): {"res": str(r), "log": str(g)}
            for i, r, g in zip(detail["index"], detail["res"], detail["log"], strict=True)
        }
    if cls is image_vqa.LLaVABench:  # the judge's (reference, model) pair
        detail = load(eval_file.replace(".xlsx", "_openai_result.xlsx"))
        return {
            str(i): [float(r), float(m)]
            for i, r, m in zip(detail["index"], detail["gpt4_score"], detail["score"], strict=True)
        }
    if cls is image_yorn.ImageYORNDataset:  # Yes, No or Unknown
        detail = load(eval_file.replace(".xlsx", "_auxmatch.xlsx"))
        return {str(i): str(e) for i, e in zip(detail["index"], detail["extracted"], strict=True)}
    detail = load(eval_file.replace(".xlsx", "_openai_result.xlsx"))
    return {str(i): int(h) for i, h in zip(detail["index"], detail["hit"], strict=True)}


def run_authors_cvbench(aki_root: Path, folder: Path) -> dict:
    """The AKI authors' CV-Bench script, run as written except for its model and its dataset: `process_input`
    answers with the fixture's prediction, `load_dataset` gives the fixture's rows. Its per-question `result` and
    its per-source accuracies (its own `calculate_accuracy`) and the 2D / 3D lines it writes are the golden."""
    script = aki_root / "codes" / "open_flamingo" / "eval_cv_bench" / "eval.py"
    tree = ast.parse(script.read_text())
    *definitions, main_block = tree.body
    assert isinstance(main_block, ast.If), "the script no longer ends with its `if __name__ == '__main__':` block"
    for module in ("torch", "datasets", "open_flamingo"):  # imported at its top, used only to load and run the model
        sys.modules[module] = types.ModuleType(module)
    sys.modules["datasets"].load_dataset = sys.modules["open_flamingo"].create_model_and_transforms = None
    namespace = {"__name__": "cv_bench_eval"}
    exec(compile(ast.Module(definitions, type_ignores=[]), str(script), "exec"), namespace)

    rows = json.loads((folder / "CV-Bench.json").read_text())
    predictions = json.loads((folder / "predictions.json").read_text())["CV-Bench"]
    ids = [f"{row['type']}-{row['idx']}" for row in rows]
    namespace["load_model_and_processor"] = lambda path: (None, None, None)
    namespace["load_dataset"] = lambda name: {
        "test": [{**row, "image": key} for row, key in zip(rows, ids, strict=True)]
    }
    namespace["process_input"] = lambda image, text: predictions[image]  # the image slot carries the row's id
    sys.argv = [str(script), "stand-in-checkpoint.pt"]
    with tempfile.TemporaryDirectory() as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)  # it writes cv_bench_results.csv and .txt to the working folder
        try:
            exec(compile(ast.Module(main_block.body, type_ignores=[]), str(script), "exec"), namespace)
            written = (Path(scratch) / "cv_bench_results.txt").read_text()
        finally:
            os.chdir(cwd)
    results = namespace["results"]
    lines = dict(re.findall(r"^(.+?) Accuracy: ([0-9.]+)$", written, re.M))
    return {
        "reference": "github.com/sony/aki codes/open_flamingo/eval_cv_bench/eval.py",
        "per_row": {key: int(hit) for key, hit in zip(ids, results["result"], strict=True)},
        "by_source": {
            source: float(namespace["calculate_accuracy"](results, source)) for source in ("ADE20K", "COCO", "Omni3D")
        },
        "written": {name: float(value) for name, value in lines.items()},
    }


def pandas_missing(load, dump) -> dict[str, list[str]]:
    """Which texts come back from VLMEvalKit's .xlsx round trip as missing, and which as themselves."""
    import pandas as pd

    texts = [
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
        "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
        "none", "NONE", " None", "None ", "Nan", "NAN", "na", "Null", "nil", "-", "N.A.", "0", "False", "n / a",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "texts.xlsx")
        dump(pd.DataFrame({"index": range(len(texts)), "prediction": texts}), path)
        read = load(path)["prediction"]
    return {
        "read_as_missing": [text for text, value in zip(texts, read, strict=True) if pd.isna(value)],
        "read_as_text": [text for text, value in zip(texts, read, strict=True) if not pd.isna(value)],
        "pandas": pd.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlmevalkit", type=Path, required=True, help="a VLMEvalKit checkout at commit 6c85ef78")
    parser.add_argument("--aki-official", type=Path, required=True, help="a checkout of github.com/sony/aki")
    args = parser.parse_args()
    write_fixtures(FOLDER, CASES)
    goldens = run_vlmevalkit(args.vlmevalkit, FOLDER, list(CASES))
    (FOLDER / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")

    write_fixtures(MISSING_FOLDER, MISSING_CASES)
    goldens = run_vlmevalkit(args.vlmevalkit, MISSING_FOLDER, list(MISSING_CASES))
    goldens["CV-Bench"] = run_authors_cvbench(args.aki_official, MISSING_FOLDER)
    _, _, _, load, dump = import_vlmevalkit(args.vlmevalkit)
    goldens["pandas_missing"] = pandas_missing(load, dump)
    (MISSING_FOLDER / "goldens.json").write_text(json.dumps(goldens, indent=1) + "\n")


if __name__ == "__main__":
    main()
