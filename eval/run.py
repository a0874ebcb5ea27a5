"""Evaluate an AKI checkpoint on the paper's benchmarks and print the paper-format table.

    python -m aki_eval.run --model DIR --benchmarks mme,pope,mmbench --data-root DIR
        [--limit N] [--batch-size B] [--policy causal|mma] [--output DIR]
        [--judge-base-url URL --judge-model NAME --judge-api-key KEY]

Predictions are appended to `OUTPUT/<benchmark>/predictions.jsonl` as they are generated, so a
killed run resumes where it stopped. `OUTPUT/results.json` holds every metric, and
`OUTPUT/table.md` the paper's columns with AKI-4B's numbers (Table 2) and the difference.
"""

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from aki.commands import add_debug_flag, model_folder, run_command
from aki.masking import ATTENTION_POLICIES

from .benchmarks import BENCHMARKS, NEEDS_JUDGE, Benchmark, Score, get_benchmark
from .data import Record
from .judge import Judge, JudgeError
from .paper import AKI_4B_TABLE_2, COLUMNS

logger = logging.getLogger("aki.eval")
JUDGE_FAILED = "judge failed"


def aki_content(message: list[dict]) -> tuple[list[dict], list]:
    """A VLMEvalKit message as AKI's wrapper sends it: the first image at its place, later images dropped."""
    content, images = [], []
    for item in message:
        if item["type"] == "image":
            if not images:
                images.append(item["value"])
                content.append({"type": "image"})
        elif item["value"]:
            content.append({"type": "text", "text": item["value"]})
    return content, images


def read_predictions(path: Path) -> dict[str, str]:
    """Predictions written so far. A line cut short by a kill, or one without an `index` and a
    text `prediction`, is dropped from the file (and its question asked again)."""
    predictions = {}
    if not path.exists():
        return predictions
    lines = path.read_text().splitlines()
    good = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and "index" in record and isinstance(record.get("prediction"), str)):
            logger.warning(
                "%s line %d is not a prediction; its question will be asked again: %.80s", path, number, line
            )
            continue
        predictions[str(record["index"])] = record["prediction"]
        good.append(line)
    if len(good) != len(lines):
        path.write_text("".join(line + "\n" for line in good))
    return predictions


class Predictor:
    """Batched greedy generation with left padding."""

    def __init__(self, model_dir: str, policy: str | None = None, dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import aki  # noqa: F401  (registers the Auto classes)

        model_dir = model_folder(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        if policy:
            self.model.config.attention_policy = policy
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"

    @torch.no_grad()
    def generate(
        self, contents: list[list[dict]], images: list, max_new_tokens: int, image_separator: str = "", prefix: str = ""
    ) -> list[str]:
        """Greedy answers to user turns (`content` items, `{"type": "image"}` where each image goes)."""
        prompts = [
            prefix
            + self.processor.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=False,
                image_separator=image_separator,
            )
            for content in contents
        ]
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt").to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, benchmark: Benchmark, records: list[Record]) -> list[str]:
        contents, images = [], []
        for record in records:
            content, first_image = aki_content(benchmark.message(replace(record, images=record.load_images())))
            contents.append(content)
            images += first_image
        return self.generate(
            contents, images, benchmark.max_new_tokens, benchmark.image_separator, benchmark.prompt_prefix
        )


def predict(benchmark: Benchmark, records: list[Record], predictor, path: Path, batch_size: int) -> dict[str, str]:
    """Predictions for every record, reusing and extending the JSONL file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    predictions = read_predictions(path)
    todo = [record for record in records if record.index not in predictions]
    if predictions:
        logger.info("%s: %d predictions on disk, %d to go", benchmark.name, len(records) - len(todo), len(todo))
    with (
        path.open("a") as handle,
        tqdm(total=len(records), initial=len(records) - len(todo), desc=benchmark.name) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for record, prediction in zip(batch, predictor(benchmark, batch), strict=True):
                predictions[record.index] = prediction
                handle.write(json.dumps({"index": record.index, "prediction": prediction}) + "\n")
            handle.flush()
            bar.update(len(batch))
    return predictions


def score_without_a_failed_judge(benchmark: Benchmark, records, predictions, judge: Judge | None) -> Score:
    """The benchmark's score; if the judge fails for good, the score without it: columns that need
    the judge read JUDGE_FAILED, the rule-scored ones keep their numbers, and a note says so."""
    try:
        return benchmark.score(records, predictions, judge)
    except JudgeError as error:
        logger.error("%s: %s; scoring without the judge", benchmark.name, error)
        score = benchmark.score(records, predictions, None)
        columns = {name: JUDGE_FAILED if value == NEEDS_JUDGE else value for name, value in score.columns.items()}
        note = f"the judge failed ({error}); the numbers here are the rules' alone"
        return replace(score, columns=columns, notes=[*score.notes, note])


def write_results(scores: dict[str, Score], output: Path, label: str) -> None:
    results = {
        name: {"columns": s.columns, "metrics": s.metrics, "judge": s.judge, "notes": s.notes}
        for name, s in scores.items()
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output / "table.md").write_text(table(scores, label))


def format_number(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def table(scores: dict[str, Score], label: str) -> str:
    """Markdown: our row, the paper's AKI-4B row (Table 2) and the difference, in the paper's column order."""
    ours = {}
    for score in scores.values():
        ours.update(score.columns)
    judges = sorted({score.judge for score in scores.values() if score.judge})
    header = "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    rows = [
        f"| {label} | " + " | ".join(format_number(ours.get(column)) for column in COLUMNS) + " |",
        "| AKI-4B (paper, Table 2) | " + " | ".join(format_number(AKI_4B_TABLE_2[c]) for c in COLUMNS) + " |",
    ]
    differences = []
    for column in COLUMNS:
        value = ours.get(column)
        differences.append(
            f"{value - AKI_4B_TABLE_2[column]:+.1f}"
            if isinstance(value, (int, float)) and not math.isnan(value)
            else "-"
        )
    rows.append("| difference | " + " | ".join(differences) + " |")
    footer = f"\nJudge: {', '.join(judges)}.\n" if judges else "\nNo LLM judge was used.\n"
    return header + "\n".join(rows) + "\n" + footer


def evaluate(
    model: str,
    benchmarks: list[str],
    data_root: Path,
    output: Path,
    limit: int | None = None,
    batch_size: int = 8,
    policy: str | None = None,
    judge: Judge | None = None,
    predictor=None,
) -> dict[str, Score]:
    selected = [get_benchmark(name) for name in benchmarks]  # unknown names fail before any work
    predictor = predictor or Predictor(model, policy)
    label = f"ours ({Path(model).name}{', ' + policy if policy else ''})"
    scores = {}
    for benchmark in selected:
        started = time.perf_counter()
        skipped = []
        records = benchmark.load(data_root, skipped)
        records = records[:limit] if limit else records
        predictions = predict(benchmark, records, predictor, output / benchmark.name / "predictions.jsonl", batch_size)
        score = score_without_a_failed_judge(benchmark, records, predictions, judge)
        if skipped:
            score.metrics["skipped_rows"] = skipped
            score.notes.append(f"{len(skipped)} row(s) skipped: {skipped[0]}{' ...' if len(skipped) > 1 else ''}")
        scores[benchmark.name] = score
        logger.info("%s: %s (%.0f s)", benchmark.name, score.columns, time.perf_counter() - started)
        write_results(scores, output, label)  # after each benchmark: a later failure keeps these
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a native AKI folder")
    parser.add_argument(
        "--benchmarks",
        default=",".join(BENCHMARKS),
        help=f"comma-separated: {', '.join(BENCHMARKS)}, or module:Class (e.g. aki_demo.benchmark:Shapes)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=Path("data/benchmarks"), help="folder with the TSVs / dataset folders"
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/eval"))
    parser.add_argument("--limit", type=int, help="first N questions of each benchmark")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--policy", choices=ATTENTION_POLICIES, help="override the checkpoint's attention policy")
    parser.add_argument("--judge-base-url")
    parser.add_argument("--judge-model")
    parser.add_argument("--judge-api-key")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    judge = Judge.from_environment(args.judge_base_url, args.judge_model, args.judge_api_key)
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    output = args.output / args.policy if args.policy else args.output
    run_command(
        lambda: evaluate(args.model, names, args.data_root, output, args.limit, args.batch_size, args.policy, judge),
        args.debug,
    )
    print((output / "table.md").read_text())


if __name__ == "__main__":
    main()
