"""Evaluate an AKI checkpoint on the paper's benchmarks and print the paper-format table.

    python -m aki_eval.run --model DIR --benchmarks mme,pope,mmbench --data-root DIR
        [--limit N] [--batch-size B] [--max-new-tokens N] [--policy causal|mma] [--output DIR]
        [--judge-base-url URL --judge-model NAME --judge-api-key KEY] [--engine transformers|vllm]

Predictions are appended to `OUTPUT/<benchmark>/predictions.jsonl` as they are generated, so a
killed run resumes where it stopped. `OUTPUT/results.json` holds every metric, and
`OUTPUT/table.md` the paper's columns with AKI-4B's numbers (Table 2) and the difference.
Judge replies are kept in `OUTPUT/judge_replies.jsonl`: scoring again never asks the judge twice.

Data parallel, one process per GPU (`torchrun` or `accelerate launch` set RANK and WORLD_SIZE):

    torchrun --nproc_per_node 8 -m aki_eval.run --model DIR --data-root DIR --output DIR

Rank r answers every WORLD_SIZE-th question into `predictions.rank<r>.jsonl` (and resumes from it);
rank 0 then merges them into `predictions.jsonl`, scores and writes the table.

`--engine vllm` generates through vLLM and AKI's vLLM plugin (aki/vllm_plugin; vLLM's environment,
`make vllm`) instead of transformers, the same answers batched continuously; use a larger
`--batch-size` there (each batch is one `generate` call).
"""

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from aki.commands import add_debug_flag, model_folder, run_command
from aki.masking import ATTENTION_POLICIES

from .benchmarks import BENCHMARKS, NEEDS_JUDGE, Benchmark, Score, get_benchmark
from .data import Record
from .judge import CachedJudge, Judge, JudgeError
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


def read_predictions(path: Path, repair: bool = True) -> dict[str, str]:
    """Predictions written so far. A line cut short by a kill, or one without an `index` and a
    text `prediction`, is dropped (and its question asked again).

    With `repair`, the file is rewritten without such lines (only its own writer may do that)."""
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
    if repair and len(good) != len(lines):
        path.write_text("".join(line + "\n" for line in good))
    return predictions


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        """RANK, WORLD_SIZE and LOCAL_RANK, as torchrun and accelerate launch set them."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def shard(self, records: list[Record]) -> list[Record]:
        return records[self.rank :: self.world_size]

    def predictions_file(self, folder: Path) -> Path:
        return folder / ("predictions.jsonl" if self.world_size == 1 else f"predictions.rank{self.rank}.jsonl")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def merge_predictions(folder: Path) -> dict[str, str]:
    """Rank 0, after every rank finished: the rank files folded into `predictions.jsonl` (then removed)."""
    merged = folder / "predictions.jsonl"
    predictions = read_predictions(merged)
    rank_files = sorted(folder.glob("predictions.rank*.jsonl"))
    for path in rank_files:
        predictions.update(read_predictions(path, repair=False))
    if rank_files:
        partial = merged.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps({"index": k, "prediction": v}) + "\n" for k, v in predictions.items()))
        partial.replace(merged)
        for path in rank_files:
            path.unlink()
    return predictions


def chat_prompts(processor, contents: list[list[dict]], image_separator: str = "", prefix: str = "") -> list[str]:
    """One prompt per user turn (`content` items, `{"type": "image"}` where each image goes); `prefix` goes
    right after the BOS the template writes (or first, where it writes none)."""
    bos = processor.tokenizer.bos_token or ""
    prompts = []
    for content in contents:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=False,
            image_separator=image_separator,
        )
        head = bos if bos and prompt.startswith(bos) else ""
        prompts.append(head + prefix + prompt[len(head) :])
    return prompts


class Predictor:
    """Batched greedy generation with left padding."""

    def __init__(
        self,
        model_dir: str,
        policy: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        max_new_tokens: int | None = None,
    ):
        self.max_new_tokens = max_new_tokens  # None: each benchmark's own (VLMEvalKit's)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import aki  # registers the Auto classes

        model_dir = model_folder(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.set_attn_implementation(aki.split_attention.default_attn_implementation(self.device))
        self.model.eval()
        if policy:
            self.model.config.attention_policy = policy
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"

    @torch.no_grad()
    def generate(
        self,
        contents: list[list[dict]],
        images: list,
        max_new_tokens: int,
        image_separator: str = "",
        prefix: str = "",
        do_sample: bool = False,
        **sampling,
    ) -> list[str]:
        """Answers to user turns (`content` items, `{"type": "image"}` where each image goes); greedy by default,
        else sampled with `sampling` (temperature, top_p)."""
        prompts = chat_prompts(self.processor, contents, image_separator, prefix)
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt").to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, benchmark: Benchmark, records: list[Record]) -> list[str]:
        contents, images = [], []
        for record in records:
            content, first_image = aki_content(benchmark.message(replace(record, images=record.load_images())))
            contents.append(content)
            images += first_image
        return self.generate(
            contents,
            images,
            self.max_new_tokens or benchmark.max_new_tokens,
            benchmark.image_separator,
            benchmark.prompt_prefix,
        )


class VllmPredictor(Predictor):
    """The same answers through vLLM (AKI's plugin): each batch is one `generate` call, batched continuously.

    Stops where transformers' `generate` stops, at the generation config's EOS ids only (vLLM would
    also stop at the tokenizer's EOS token)."""

    def __init__(
        self,
        model_dir: str,
        policy: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int | None = None,
        **engine,
    ):
        from transformers import AutoProcessor, GenerationConfig
        from vllm import LLM

        import aki  # noqa: F401  (registers AkiProcessor)

        self.max_new_tokens = max_new_tokens
        model_dir = model_folder(model_dir)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        self.stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        # vLLM's defaults: the plugin keeps MMA exact under prefix caching and chunked prefill (docs/vllm.md).
        settings = dict(engine)
        if policy:
            settings["hf_overrides"] = {"attention_policy": policy}
        self.llm = LLM(str(model_dir), dtype=dtype, **settings)

    def generate(
        self,
        contents: list[list[dict]],
        images: list,
        max_new_tokens: int,
        image_separator: str = "",
        prefix: str = "",
        do_sample: bool = False,
        **sampling,
    ) -> list[str]:
        from vllm import SamplingParams

        prompts = chat_prompts(self.processor, contents, image_separator, prefix)
        requests, remaining = [], list(images)
        for prompt, content in zip(prompts, contents, strict=True):
            count = sum(item["type"] == "image" for item in content)
            own, remaining = remaining[:count], remaining[count:]
            requests.append({"prompt": prompt, "multi_modal_data": {"image": own}} if own else {"prompt": prompt})
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=sampling.get("temperature", 1.0) if do_sample else 0.0,
            top_p=sampling.get("top_p", 1.0) if do_sample else 1.0,
            ignore_eos=True,
            stop_token_ids=self.stop_token_ids,
        )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        # Decoded as the transformers engine decodes (vLLM's own text holds back a trailing partial character).
        tokens = [output.outputs[0].token_ids for output in outputs]
        return self.processor.batch_decode(tokens, skip_special_tokens=True)


def predict(
    benchmark: Benchmark, records: list[Record], predictor, folder: Path, batch_size: int, ranks: Ranks = Ranks()
) -> dict[str, str]:
    """This rank's predictions for its shard of `records`, reusing and extending its JSONL file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if ranks.world_size == 1:
        merge_predictions(folder)  # what a stopped multi-process run left counts as done
    path = ranks.predictions_file(folder)
    predictions = read_predictions(path)
    if ranks.world_size > 1:  # what an earlier run merged counts as done
        predictions = {**read_predictions(folder / "predictions.jsonl", repair=False), **predictions}
    shard = ranks.shard(records)
    todo = [record for record in shard if record.index not in predictions]
    if len(todo) < len(shard):
        logger.info("%s: %d predictions on disk, %d to go", benchmark.name, len(shard) - len(todo), len(todo))
    with (
        path.open("a") as handle,
        tqdm(total=len(shard), initial=len(shard) - len(todo), desc=benchmark.name, disable=ranks.rank != 0) as bar,
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
    hf_configs: dict[str, str] | None = None,
    max_new_tokens: int | None = None,
    engine: str = "transformers",
) -> dict[str, Score]:
    """Per benchmark: predict this rank's shard, then on rank 0 merge, score and rewrite the results,
    so a later failure keeps what was scored. Returns the scores on rank 0, an empty dict elsewhere."""
    selected = [get_benchmark(name) for name in benchmarks]  # unknown names fail before any work
    ranks = Ranks.from_environment()
    device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
    if ranks.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)  # NCCL's barrier runs on the current device
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if predictor is None and engine == "vllm":
        if ranks.world_size > 1:
            raise ValueError("--engine vllm batches by itself: run one process (vLLM uses the GPUs it is given).")
        predictor = VllmPredictor(model, policy, max_new_tokens=max_new_tokens)
    predictor = predictor or Predictor(model, policy, device=device, max_new_tokens=max_new_tokens)
    judge = CachedJudge(judge, output / "judge_replies.jsonl") if judge is not None else None
    label = f"ours ({Path(model).name}{', ' + policy if policy else ''})"
    scores = {}
    for benchmark in selected:
        started = time.perf_counter()
        skipped = []
        records = benchmark.load(data_root, (hf_configs or {}).get(benchmark.name), skipped)
        records = records[:limit] if limit else records
        predict(benchmark, records, predictor, output / benchmark.name, batch_size, ranks)
        ranks.barrier()  # every rank's predictions are on disk
        if ranks.rank != 0:
            continue
        predictions = merge_predictions(output / benchmark.name)
        score = score_without_a_failed_judge(benchmark, records, predictions, judge)
        if skipped:
            score.metrics["skipped_rows"] = skipped
            score.notes.append(f"{len(skipped)} row(s) skipped: {skipped[0]}{' ...' if len(skipped) > 1 else ''}")
        scores[benchmark.name] = score
        logger.info("%s: %s (%.0f s)", benchmark.name, score.columns, time.perf_counter() - started)
        write_results(scores, output, label)  # after each benchmark: a later failure keeps these
    return scores


def parse_hf_configs(text: str | None) -> dict[str, str]:
    """`mmbench=cn,pope=default` -> {"mmbench": "cn", "pope": "default"}."""
    configs = {}
    for item in (text or "").split(","):
        if item.strip():
            name, separator, config = item.partition("=")
            if not separator or not config.strip():
                raise ValueError(f"--hf-config takes BENCHMARK=CONFIG pairs; got {item!r}.")
            configs[get_benchmark(name.strip()).name] = config.strip()
    return configs


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
    parser.add_argument("--max-new-tokens", type=int, help="cap every answer (default: each benchmark's own)")
    parser.add_argument("--policy", choices=ATTENTION_POLICIES, help="override the checkpoint's attention policy")
    parser.add_argument(
        "--hf-config", help="config of a multi-config Hugging Face folder, e.g. mmbench=cn (mmbench reads en)"
    )
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="generate with transformers (default) or vLLM (AKI's vLLM plugin, in vLLM's environment: make vllm)",
    )
    parser.add_argument("--judge-base-url")
    parser.add_argument("--judge-model")
    parser.add_argument("--judge-api-key")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    judge = Judge.from_environment(args.judge_base_url, args.judge_model, args.judge_api_key)
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    output = args.output / args.policy if args.policy else args.output
    configs = parse_hf_configs(args.hf_config)

    def run() -> dict[str, Score]:
        try:
            return evaluate(
                args.model, names, args.data_root, output, args.limit, args.batch_size, args.policy, judge,
                hf_configs=configs, max_new_tokens=args.max_new_tokens, engine=args.engine,
            )  # fmt: skip
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    if run_command(run, args.debug):
        print((output / "table.md").read_text())


if __name__ == "__main__":
    main()
