"""`make demo`: the paper's Table 1 in miniature, on a laptop CPU with nothing downloaded.

For each seed, the tiny language model first learns language: questions about shape scenes
described in words (the paper's backbone arrives pretrained). The tiny AKI is then pre-trained on
captions of synthetic shape scenes (causal), instruction-tuned twice from that checkpoint, once
with causal attention and once with MMA, and both are evaluated on held-out questions. Every step
runs the real code paths: `aki_training.train` for each stage and `aki_eval.run` for the scores. The
demo prints accuracy per policy (mean and spread over seeds) and the paired gap with its 95%
interval, and writes a bar chart (a line per seed), the two attention masks and an attention map.

    python -m aki_demo [--seeds 5] [--quick] [--out outputs/demo] [--language-model DIR]
"""

import argparse
import json
import logging
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from aki.attention_maps import import_pyplot, render_mask
from aki.masking import dense_attention_mask, token_roles

from .benchmark import Shapes
from .shapes import ShapesSource

logger = logging.getLogger("aki_demo")
CONFIGS = resources.files("aki_demo") / "configs"  # package data: found in a wheel install as in a checkout
BENCHMARK = "aki_demo.benchmark:Shapes"
POLICIES = ("causal", "mma")
QUICK_STEPS, QUICK_EVAL_SIZE = 8, 24


def run_seed(seed: int, out: Path, quick: bool, language_model: str | None = None) -> dict[str, float]:
    """Train and evaluate one seed; returns {policy: accuracy}.

    Language pre-training (text only), caption pre-training (causal), then instruction tuning
    twice from that checkpoint, once per policy, and evaluation of both. With `language_model` (a
    pretrained causal LM folder) the language stage is skipped: the tiny vision tower and
    connector are trained in front of that LM, with the `demo_lm_*` recipe.
    """
    from aki_eval.run import evaluate
    from aki_training.config import load_config
    from aki_training.train import train

    folder = out / f"seed{seed}"

    def stage(config: str, name: str, **overrides):
        overrides = {"output_dir": str(folder / name), "seed": seed, "save_every": 0, **overrides}
        if quick:
            overrides["max_steps"] = QUICK_STEPS
        cfg = load_config(CONFIGS / config, overrides)
        train(cfg)
        return cfg, folder / name / "final"

    if language_model:
        recipe = "demo_lm"
        _, pretrained = stage("demo_lm_pretrain.yaml", "pretrain", **{"model.language_model": language_model})
    else:
        recipe = "demo"
        _, language = stage("demo_language.yaml", "language")
        _, pretrained = stage("demo_pretrain.yaml", "pretrain", **{"model.pretrained": str(language)})
    scores = {}
    for policy in POLICIES:
        sft, export = stage(
            f"{recipe}_sft.yaml",
            f"sft_{policy}",
            **{"model.pretrained": str(pretrained), "model.attention_policy": policy},
        )
        (export / "shapes.json").write_text(json.dumps(sft.data[0].options))  # the held-out questions match training
        limit = QUICK_EVAL_SIZE if quick else None
        result = evaluate(str(export), [BENCHMARK], export, export.parent / "eval", limit=limit, batch_size=32)
        scores[policy] = result[Shapes.name].columns["Shapes"]
        held_out = limit or Shapes.size
        logger.info("seed %d, %s: %.1f%% on %s held-out questions", seed, policy, scores[policy], held_out)
    return scores


def mean_and_spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "seeds": values,
    }


def paired_interval(gaps: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean paired gap; None for a single seed."""
    if len(gaps) < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, len(gaps) - 1)) * statistics.stdev(gaps) / len(gaps) ** 0.5
    mean = statistics.mean(gaps)
    return mean - half, mean + half


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """Accuracy per policy, and the paired gap: both policies of a seed share its pre-training and data."""
    summary = {policy: mean_and_spread([scores[policy] for scores in per_seed.values()]) for policy in POLICIES}
    gaps = [scores["mma"] - scores["causal"] for scores in per_seed.values()]
    summary["gap"] = {**mean_and_spread(gaps), "ci95": paired_interval(gaps)}
    return summary


def verdict(gap: dict) -> str:
    """What the seeds say about the gap, in one sentence."""
    wins, count = sum(v > 0 for v in gap["seeds"]), len(gap["seeds"])
    if gap["ci95"] is None:
        return "One seed gives no interval: run more seeds (--seeds 5) to measure the gap."
    low, high = gap["ci95"]
    interval = (
        f"MMA is ahead in {wins} of {count} seeds; "
        f"95% interval of the mean gap (paired t, {count - 1} df): [{low:+.1f}, {high:+.1f}]"
    )
    if low > 0:
        return interval + ", above zero: MMA scores higher."
    if high < 0:
        return interval + ", below zero: causal scores higher."
    return interval + ", which contains zero: these seeds do not separate the two policies."


def table(summary: dict, seeds: list[int]) -> str:
    lines = [
        "| attention | accuracy (mean ± std over seeds) | per seed |",
        "|---|---|---|",
    ]
    for policy in POLICIES:
        row = summary[policy]
        per = ", ".join(f"{v:.1f}" for v in row["seeds"])
        lines.append(f"| {policy} | {row['mean']:.1f} ± {row['std']:.1f} | {per} |")
    gap = summary["gap"]
    per = ", ".join(f"{v:+.1f}" for v in gap["seeds"])
    lines.append(f"| MMA - causal (same seed) | {gap['mean']:+.1f} ± {gap['std']:.1f} | {per} |")
    lines.append(f"\n{verdict(gap)} Seeds: {seeds}.")
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path, title: str) -> None:
    plt = import_pyplot()
    figure, axis = plt.subplots(figsize=(4, 3.5))
    means = [summary[p]["mean"] for p in POLICIES]
    errors = [summary[p]["std"] for p in POLICIES]
    axis.bar(POLICIES, means, yerr=errors, capsize=6, color=["#8c8c8c", "#2e8b57"])
    # One line per seed: both policies share that seed's pre-training and data.
    for causal, mma in zip(summary["causal"]["seeds"], summary["mma"]["seeds"], strict=True):
        axis.plot([0, 1], [causal, mma], color="black", marker="o", markersize=3, linewidth=0.8, zorder=3)
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_masks(model, processor, image, question: str, out: Path) -> dict[str, Path]:
    """The MMA and causal masks of one prompt, as pictures."""
    inputs = processor.question_inputs(image, question)
    windows = model.model.window_ids(inputs["input_ids"], inputs["attention_mask"])
    roles = token_roles(inputs["input_ids"], model.config.image_token_id, windows, inputs["attention_mask"])[0]
    paths = {}
    for policy in POLICIES:
        allowed = dense_attention_mask(windows, inputs["attention_mask"], policy)[0]
        opened = int((allowed & ~torch.ones_like(allowed).tril()).sum())
        title = f"{policy.upper()}: {inputs['input_ids'].shape[1]} tokens, {opened} pairs opened above the diagonal"
        paths[policy] = Path(render_mask(allowed, roles, str(out / f"mask_{policy}.png"), title))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="a few steps and one seed: checks the pipeline, not the gap"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--language-model",
        help="a pretrained causal LM folder (Phi-3, Llama, Qwen2, ...) to use instead of the tiny random one",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1 if args.quick else args.seeds))

    per_seed = {seed: run_seed(seed, args.out, args.quick, args.language_model) for seed in seeds}
    summary = summarise(per_seed)
    elapsed = time.perf_counter() - started
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from aki.attention_maps import save_attention_maps
    from aki_training.data import VQA_PROMPT

    mma_model_dir = args.out / f"seed{seeds[0]}" / "sft_mma" / "final"
    model = AutoModelForImageTextToText.from_pretrained(mma_model_dir).eval()
    processor = AutoProcessor.from_pretrained(mma_model_dir)
    options = json.loads((mma_model_dir / "shapes.json").read_text())
    example = ShapesSource(1, 99, stage="sft", **options)[0]["record"]
    question = VQA_PROMPT.format(question=example["question"])
    masks = draw_masks(model, processor, example["image"], question, args.out)
    attention_map = save_attention_maps(model, processor, example["image"], question, args.out / "attention_map.png")
    backbone = f"{Path(args.language_model).name} backbone" if args.language_model else "Tiny AKI"
    title = f"{backbone}, {len(seeds)} seed(s), {'quick' if args.quick else 'full'} run"
    bar_chart(summary, args.out / "accuracy.png", title)

    report = table(summary, seeds)
    results = {
        "summary": summary,
        "per_seed": per_seed,
        "elapsed_s": elapsed,
        "quick": args.quick,
        "language_model": args.language_model,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\nBar chart     : {args.out / 'accuracy.png'}")
    for policy, path in masks.items():
        print(f"Mask ({policy:6s}): {path}")
    print(f"Attention map : {attention_map}")
    print(f"Elapsed       : {elapsed:.0f} s on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
