"""The paper's ablation (causal vs MMA) in front of a pretrained language model, paired by seed.

One caption pre-training run (causal, the LM frozen, a fresh tiny vision tower and connector)
gives a checkpoint that every seed shares. From it, each seed instruction-tunes twice, once per
attention policy, on the same data order, and both are scored on the same held-out questions.
The paired gap (MMA - causal) per seed, its mean and its 95% t interval come from the demo's
`summarise`.

SmolLM2's chat template would add its own default system prompt, and AKI's template adds AKI's;
here the system turn is left empty, which cuts each sample to about 45 tokens.

A run whose folder already holds a policy's finished SFT and evaluation reuses them, so seeds can
run in parallel processes (`--first-seed`) and a last call with all seeds gathers them.

    python -m aki_demo.lm_ablation --language-model checkpoints/SmolLM2-135M-Instruct --seeds 3
    python -m aki_demo.lm_ablation ... --recipe full --seeds 5   # the demo_lm recipe (a GPU's budget)
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from aki.processing_aki import AKI_SYSTEM_PROMPT, CHATML_CHAT_TEMPLATE

from .benchmark import Shapes
from .run import BENCHMARK, CONFIGS, POLICIES, bar_chart, summarise, table

logger = logging.getLogger("aki_demo.lm_ablation")
# AKI's ChatML template with an empty default system turn.
CHATML_NO_SYSTEM = CHATML_CHAT_TEMPLATE.replace(AKI_SYSTEM_PROMPT.replace("'", "\\'"), "")
RECIPES = {  # (pre-training config, SFT config)
    "cpu": ("demo_smollm2_pretrain.yaml", "demo_smollm2_sft.yaml"),
    "full": ("demo_lm_pretrain.yaml", "demo_lm_sft.yaml"),
}


def timed_stage(config: str, overrides: dict) -> dict:
    """Train one stage; returns its export folder, steps, seconds and final loss."""
    from aki_training.config import load_config
    from aki_training.train import train

    cfg = load_config(CONFIGS / config, {"save_every": 0, **overrides})
    started = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - started
    # The stage is exported: its resume checkpoint (weights and optimiser state, GBs for SmolLM2) is not needed.
    shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
    record = {
        "steps": cfg.max_steps,
        "seconds": seconds,
        "loss": summary.loss,
        "data_options": cfg.data[0].options,
    }
    (Path(cfg.output_dir) / "stage.json").write_text(json.dumps(record, indent=2))
    return {**record, "export": Path(cfg.output_dir) / "final"}


def reused_stage(folder: Path) -> dict:
    """A finished stage's record (its `stage.json`), to build on without training it again."""
    record = folder / "stage.json"
    if not (folder / "final" / "model.safetensors").is_file() or not record.is_file():
        raise SystemExit(f"error: {folder} holds no finished stage (final/ and stage.json): drop --reuse-pretrain.")
    return {**json.loads(record.read_text()), "export": folder / "final"}


def drop_system_prompt(folder: Path) -> None:
    """Give the exported processor the ChatML template without a default system prompt."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    if processor.chat_template == CHATML_NO_SYSTEM:
        return
    if processor.chat_template != CHATML_CHAT_TEMPLATE:
        raise ValueError(f"{folder} does not speak AKI's ChatML template: this ablation needs a ChatML backbone.")
    processor.chat_template = CHATML_NO_SYSTEM
    processor.save_pretrained(folder)


def finished_run(folder: Path) -> dict | None:
    """A policy's SFT and evaluation finished by an earlier (or a parallel) run: its record, score and
    evaluation time (from the file times: evaluation starts when the stage record is written)."""
    record, scores = folder / "stage.json", folder / "eval" / "results.json"
    if not (record.is_file() and scores.is_file()):
        return None
    stage = {**json.loads(record.read_text()), "export": folder / "final"}
    stage["eval_seconds"] = scores.stat().st_mtime - record.stat().st_mtime
    stage["accuracy"] = json.loads(scores.read_text())[Shapes.name]["columns"]["Shapes"]
    return stage


def run(args) -> dict:
    from aki_eval.run import evaluate

    pretrain_config, sft_config = RECIPES[args.recipe]
    common = {"micro_batch_size": args.batch} if args.batch else {}
    if args.reuse_pretrain:
        pretrain = reused_stage(args.out / "pretrain")
    else:
        overrides = {"model.language_model": args.language_model, "seed": 0}
        if args.pretrain_steps:
            overrides["max_steps"] = args.pretrain_steps
        pretrain = timed_stage(pretrain_config, {**common, "output_dir": str(args.out / "pretrain"), **overrides})
    drop_system_prompt(pretrain["export"])
    stages, per_seed = {"pretrain": pretrain}, {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        per_seed[seed] = {}
        for policy in args.policies:
            name = f"seed{seed}_sft_{policy}"
            sft = finished_run(args.out / name)
            if sft is None:
                overrides = {"model.pretrained": str(pretrain["export"]), "model.attention_policy": policy}
                if args.sft_steps:
                    overrides["max_steps"] = args.sft_steps
                sft = timed_stage(sft_config, {**common, "output_dir": str(args.out / name), "seed": seed, **overrides})
                export = sft["export"]
                (export / "shapes.json").write_text(json.dumps(sft["data_options"]))  # held-out questions match
                evaluate(str(export), [BENCHMARK], export, export.parent / "eval", args.eval_size, args.eval_batch)
                sft = finished_run(args.out / name)
            per_seed[seed][policy] = sft["accuracy"]
            stages[name] = sft
            logger.info(
                "seed %d, %s: %.1f%% (SFT %.1f s/step)", seed, policy, sft["accuracy"], sft["seconds"] / sft["steps"]
            )

    if set(args.policies) != set(POLICIES):
        return {"per_seed": per_seed}  # one policy alone has no gap: a later call with both gathers the runs
    summary = summarise(per_seed)
    sft_stages = [s for name, s in stages.items() if name != "pretrain"]
    timing = {
        "pretrain_s_per_step": pretrain["seconds"] / pretrain["steps"],
        "sft_s_per_step": sum(s["seconds"] for s in sft_stages) / sum(s["steps"] for s in sft_stages),
        "eval_s_per_run": sum(s["eval_seconds"] for s in sft_stages) / len(sft_stages),
        # The stages one after another, as a single process runs them (parallel or resumed runs included).
        "total_s": pretrain["seconds"] + sum(s["seconds"] + s["eval_seconds"] for s in sft_stages),
    }
    report = table(summary, list(per_seed)) + "\n\n" + timing_line(args, pretrain, sft_stages, timing)
    title = f"{Path(args.language_model).name}, {len(per_seed)} seeds, {args.recipe} recipe"
    bar_chart(summary, args.out / "accuracy.png", title)
    results = {
        "summary": summary,
        "per_seed": per_seed,
        "timing": timing,
        "stages": {name: {k: v for k, v in s.items() if k != "export"} for name, s in stages.items()},
        "recipe": args.recipe,
        "language_model": args.language_model,
        "eval_size": args.eval_size,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return results


def timing_line(args, pretrain: dict, sft_stages: list[dict], timing: dict) -> str:
    return (
        f"Recipe {args.recipe}: {pretrain['steps']} pre-training steps (shared), {sft_stages[0]['steps']} SFT steps "
        f"per policy and seed, {args.eval_size or 'all'} held-out questions. Time per step (stage wall time / "
        f"steps, loading and export included): pre-training {timing['pretrain_s_per_step']:.2f} s, "
        f"SFT {timing['sft_s_per_step']:.2f} s; evaluation {timing['eval_s_per_run']:.0f} s per run; "
        f"all stages together {timing['total_s'] / 60:.1f} min."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--language-model", default="checkpoints/SmolLM2-135M-Instruct", help="a ChatML causal LM folder"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--pretrain-steps", type=int, help="overrides the recipe's")
    parser.add_argument("--sft-steps", type=int, help="overrides the recipe's")
    parser.add_argument("--batch", type=int, help="micro batch size; overrides the recipe's")
    parser.add_argument("--eval-size", type=int, help="held-out questions per run (default: all 300)")
    parser.add_argument("--eval-batch", type=int, default=8, help="questions per generate() call")
    parser.add_argument("--out", type=Path, default=Path("outputs/smollm2_ablation"))
    parser.add_argument(
        "--reuse-pretrain", action="store_true", help="start the SFT runs from OUT/pretrain, trained by an earlier run"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    main()
