"""The paper's ablation (causal vs MMA) in front of a pretrained language model, paired by seed.

SmolLM2-135M-Instruct learns to see in five stages, the first four shared by every seed:

1. tower: a tiny SigLIP-style vision tower pre-trained contrastively on region captions (cached;
   `aki_demo.tower`), as real AKI starts from a pretrained SigLIP;
2. align: the fresh MLP connector (ending in an RMSNorm at SmolLM2's word scale) alone learns to
   put each cell's image token near SmolLM2's embeddings of its words (`aki_demo.align`);
3. pretrain: caption pre-training (causal; captions list the objects in random order), LoRA on
   SmolLM2 and the connector;
4. text lesson: the questions about scenes described in words, so SmolLM2 learns the task's
   format and answers before the image has to carry the scene (causal);
5. per seed, instruction tuning from the text lesson with causal attention, with MMA, and a
   text-only baseline (causal, every picture blank), each scored on the same 300 held-out questions.

Questions pick one of 2-3 objects (distinct colours and shapes) by position, colour or shape and ask
for another attribute, so the answer needs the image and the question together. Per question kind:
accuracy of each policy, the paired gap (MMA - causal) with its 95% t interval, chance, and the
text-only baseline; SFT loss curves of both policies on one plot; the time of every stage.

Finished stages and runs in OUT are reused, so an interrupted run resumes, and seeds can run in
parallel processes (`--first-seed`) before a last call with all seeds gathers them.

    python -m aki_demo.lm_ablation --seeds 5
"""

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from aki.processing_aki import AKI_SYSTEM_PROMPT, CHATML_CHAT_TEMPLATE

from .benchmark import Shapes
from .run import BENCHMARK, CONFIGS, POLICIES, mean_and_spread, summarise
from .shapes import CHANCE, PICK_KINDS

logger = logging.getLogger("aki_demo.lm_ablation")
# AKI's ChatML template with an empty default system turn (AKI's would cost ~30 tokens a sample).
CHATML_NO_SYSTEM = CHATML_CHAT_TEMPLATE.replace(AKI_SYSTEM_PROMPT.replace("'", "\\'"), "")
PRETRAIN_CONFIG, SFT_CONFIG = "demo_smollm2_pretrain.yaml", "demo_smollm2_sft.yaml"
TEXT_ONLY = "text_only"
RUNS = {  # run name: (attention policy, SFT data modality)
    "causal": ("causal", "image"),
    "mma": ("mma", "image"),
    TEXT_ONLY: ("causal", "blank"),
}


def sized(overrides: dict, steps: int | None, batch: int | None) -> dict:
    """`overrides` with the step count and micro batch the command line asked for."""
    return {
        **overrides,
        **({"max_steps": steps} if steps else {}),
        **({"micro_batch_size": batch} if batch else {}),
    }


def finished_stage(folder: Path) -> dict | None:
    """A stage an earlier (or a parallel) run finished: its record, with its export folder."""
    record = folder / "stage.json"
    if not (record.is_file() and (folder / "final" / "model.safetensors").is_file()):
        return None
    return {**json.loads(record.read_text()), "export": folder / "final"}


def timed_stage(config: str, folder: Path, overrides: dict) -> dict:
    """Train one stage into `folder` (or reuse it, finished); returns its record and export folder."""
    from aki_training.config import load_config
    from aki_training.train import train

    done = finished_stage(folder)
    if done:
        return done
    cfg = load_config(CONFIGS / config, {"save_every": 0, **overrides, "output_dir": str(folder)})
    started = time.perf_counter()
    summary = train(cfg)
    record = {
        "steps": cfg.max_steps,
        "seconds": time.perf_counter() - started,
        "loss": summary.loss,
        "data_options": cfg.data[0].options,
    }
    # The stage is exported: its resume checkpoint (weights and optimiser state) is not needed.
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    (folder / "stage.json").write_text(json.dumps(record, indent=2))
    return {**record, "export": folder / "final"}


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


def evaluated_run(folder: Path, config: str, overrides: dict, eval_size: int | None, eval_batch: int) -> dict:
    """One SFT run and its held-out scores per question kind (reused when finished)."""
    from aki_eval.run import evaluate

    scores = folder / "eval" / "results.json"
    sft = timed_stage(config, folder, overrides)
    export = sft["export"]
    if not scores.is_file():
        (export / "shapes.json").write_text(json.dumps(sft["data_options"]))  # held-out questions match training
        started = time.perf_counter()
        evaluate(str(export), [BENCHMARK], export, folder / "eval", eval_size, eval_batch)
        (folder / "eval" / "seconds.json").write_text(json.dumps(time.perf_counter() - started))
    metrics = json.loads(scores.read_text())[Shapes.name]["metrics"]
    sft["eval_seconds"] = json.loads((folder / "eval" / "seconds.json").read_text())
    sft["accuracy"] = {"overall": metrics["Overall"], **metrics["by_question"]}
    return sft


def shared_stages(args) -> dict:
    """Stages 1-4, shared by every seed; returns their records (tower, align, pretrain, text_lesson)."""
    from .align import aligned_model
    from .tower import pretrained_tower

    tower_folder, tower = pretrained_tower(args.cache)  # its seconds are its training's, also when cached
    tower = {**tower, "folder": str(tower_folder)}

    align_folder = args.out / "align"
    if not (align_folder / "align.json").is_file():
        aligned_model(
            tower_folder, args.language_model, align_folder, **({"steps": args.align_steps} if args.align_steps else {})
        )
    align = json.loads((align_folder / "align.json").read_text())

    pretrain = timed_stage(
        PRETRAIN_CONFIG,
        args.out / "pretrain",
        sized({"model.pretrained": str(align_folder)}, args.pretrain_steps, args.batch),
    )
    drop_system_prompt(pretrain["export"])
    lesson = {"model.pretrained": str(pretrain["export"]), "model.attention_policy": "causal"}
    lesson["data.0.options.modality"] = "text"
    text_lesson = timed_stage(SFT_CONFIG, args.out / "text_lesson", sized(lesson, args.text_steps, args.batch))
    return {"tower": tower, "align": align, "pretrain": pretrain, "text_lesson": text_lesson}


def per_kind_summary(per_seed: dict[int, dict[str, dict]], kinds: list[str]) -> dict:
    """For each question kind (and overall): both policies, their paired gap with its 95% interval,
    the text-only baseline (on the seeds that ran it) and chance."""
    summary = {}
    for kind in ["overall", *kinds]:
        paired = {seed: {p: runs[p][kind] for p in POLICIES} for seed, runs in per_seed.items()}
        row = summarise(paired)
        text_only = [runs[TEXT_ONLY][kind] for runs in per_seed.values() if TEXT_ONLY in runs]
        if text_only:
            row[TEXT_ONLY] = mean_and_spread(text_only)
        row["chance"] = CHANCE.get(kind, statistics.mean(CHANCE[k] for k in kinds))
        summary[kind] = row
    return summary


def figures(summary: dict, minutes: float) -> dict:
    """The published figures (docs/demo/smollm2_ablation.json): per question type, percent, means over
    seeds; `gap` is MMA - causal with its paired 95% interval [gap_low, gap_high]."""
    types = {}
    for kind, row in summary.items():
        if kind == "overall":
            continue
        low, high = row["gap"]["ci95"] or (None, None)
        types[kind] = {
            "chance": row["chance"],
            "text_only": row[TEXT_ONLY]["mean"] if TEXT_ONLY in row else None,
            "causal": row["causal"]["mean"],
            "mma": row["mma"]["mean"],
            "gap": row["gap"]["mean"],
            "gap_low": low,
            "gap_high": high,
            "seeds": len(row["causal"]["seeds"]),
        }
    return {"question_types": types, "minutes": minutes}


def readme_table(published: dict) -> str:
    """The README's table, made from the published figures alone (a test checks the README holds it)."""
    lines = [
        "| question type | chance | text-only | causal | MMA | MMA - causal [95% interval] |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in published["question_types"].items():
        text_only = "-" if row["text_only"] is None else f"{row['text_only']:.1f}"
        interval = "" if row["gap_low"] is None else f" [{row['gap_low']:+.1f}, {row['gap_high']:+.1f}]"
        lines.append(
            f"| {kind.replace('_', ' ')} | {row['chance']:.1f} | {text_only} | {row['causal']:.1f} | "
            f"{row['mma']:.1f} | {row['gap']:+.1f}{interval} |"
        )
    return "\n".join(lines)


def table(summary: dict) -> str:
    """Markdown: a row per question kind, mean ± std over seeds, the gap's 95% interval."""
    lines = [
        "| question kind | chance | text-only | causal | MMA | MMA - causal [95% interval] |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in summary.items():
        interval = "[{:+.1f}, {:+.1f}]".format(*row["gap"]["ci95"]) if row["gap"]["ci95"] else "(one seed)"
        text_only = f"{row[TEXT_ONLY]['mean']:.1f}" if TEXT_ONLY in row else "-"
        policies = " | ".join(f"{row[p]['mean']:.1f} ± {row[p]['std']:.1f}" for p in POLICIES)
        lines.append(
            f"| {kind.replace('_', ' ')} | {row['chance']:.1f} | {text_only} | {policies} | "
            f"{row['gap']['mean']:+.1f} {interval} |"
        )
    return "\n".join(lines)


def accuracy_chart(summary: dict, path: Path, title: str) -> None:
    """Grouped bars per question kind: text-only, causal and MMA (mean, std over seeds), chance as a dash."""
    from aki.attention_maps import import_pyplot

    plt = import_pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    bars = [(TEXT_ONLY, "#c9c9c9"), ("causal", "#8c8c8c"), ("mma", "#2e8b57")]
    for group, row in enumerate(summary.values()):
        for offset, (name, colour) in enumerate(bars):
            if name in row:
                x, label = group + (offset - 1) * 0.27, name if group == 0 else None
                axis.bar(x, row[name]["mean"], 0.25, yerr=row[name]["std"], capsize=3, color=colour, label=label)
        axis.hlines(
            row["chance"],
            group - 0.42,
            group + 0.42,
            colors="black",
            linestyles="dashed",
            label="chance" if group == 0 else None,
        )
    axis.set_xticks(range(len(summary)), [kind.replace("_", " ") for kind in summary])
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8, loc="upper left", ncols=4)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def learning_curves(out: Path, seeds: list[int], path: Path) -> None:
    """SFT loss per step of both policies on one plot: a thin line per seed, a thick one for the mean."""
    from aki.attention_maps import import_pyplot
    from aki_training.train import read_metrics

    plt = import_pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for policy, colour in zip(POLICIES, ("#8c8c8c", "#2e8b57"), strict=True):
        curves = []
        for seed in seeds:
            rows = {row["step"]: row["loss"] for row in read_metrics(out / f"seed{seed}_{policy}" / "metrics.jsonl")}
            curves.append([rows[step] for step in sorted(rows)])
            axis.plot(sorted(rows), curves[-1], color=colour, linewidth=0.5, alpha=0.5)
        steps = min(len(curve) for curve in curves)
        mean = [statistics.mean(curve[i] for curve in curves) for i in range(steps)]
        axis.plot(range(1, steps + 1), mean, color=colour, linewidth=2, label=f"{policy} (mean of {len(seeds)})")
    axis.set_xlabel("SFT step")
    axis.set_ylabel("training loss")
    axis.set_yscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args) -> dict:
    started = time.perf_counter()
    stages = shared_stages(args)
    lesson_export = stages["text_lesson"]["export"]
    per_seed, runs = {}, {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        per_seed[seed] = {}
        names = [*POLICIES, TEXT_ONLY] if seed < args.first_seed + args.text_only_seeds else list(POLICIES)
        for name in names:
            policy, modality = RUNS[name]
            overrides = {
                "model.pretrained": str(lesson_export),
                "model.attention_policy": policy,
                "data.0.options.modality": modality,
                "seed": seed,
            }
            folder = args.out / f"seed{seed}_{name}"
            result = evaluated_run(
                folder, SFT_CONFIG, sized(overrides, args.sft_steps, args.batch), args.eval_size, args.eval_batch
            )
            per_seed[seed][name], runs[folder.name] = result["accuracy"], result
            logger.info("seed %d, %s: %s", seed, name, {k: round(v, 1) for k, v in result["accuracy"].items()})

    kinds = [kind for kind in PICK_KINDS if kind in per_seed[args.first_seed]["causal"]]
    summary = per_kind_summary(per_seed, kinds)
    seeds = list(per_seed)
    learning_curves(args.out, seeds, args.out / "learning_curves.png")
    accuracy_chart(summary, args.out / "accuracy.png", f"{args.language_model.name}, {len(seeds)} paired seed(s)")
    timing = {
        "tower_s": stages["tower"]["seconds"],
        "align_s": stages["align"]["seconds"],
        "pretrain_s": stages["pretrain"]["seconds"],
        "text_lesson_s": stages["text_lesson"]["seconds"],
        "sft_s_per_run": statistics.mean(r["seconds"] for r in runs.values()),
        "eval_s_per_run": statistics.mean(r["eval_seconds"] for r in runs.values()),
        "runs": len(runs),
        # Every stage one after another, as one process runs them (reused or parallel runs included).
        "total_s": sum(stages[name]["seconds"] for name in ("tower", "align", "pretrain", "text_lesson"))
        + sum(r["seconds"] + r["eval_seconds"] for r in runs.values()),
        "wall_s": time.perf_counter() - started,
    }
    report = table(summary) + "\n\n" + timing_line(stages, runs, timing, seeds)
    results = {
        "summary": summary,
        "per_seed": per_seed,
        "timing": timing,
        "stages": {
            "tower": {k: stages["tower"][k] for k in ("held_out_region_accuracy", "seconds", "config")},
            "align": {k: stages["align"][k] for k in ("nearest_word", "loss", "seconds", "config")},
            **{name: {k: v for k, v in stages[name].items() if k != "export"} for name in ("pretrain", "text_lesson")},
            **{name: {k: v for k, v in r.items() if k != "export"} for name, r in runs.items()},
        },
        "language_model": str(args.language_model),
        "eval_size": args.eval_size or Shapes.size,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    published = figures(summary, timing["total_s"] / 60)
    (args.out / "smollm2_ablation.json").write_text(json.dumps(published, indent=2) + "\n")
    (args.out / "results.md").write_text(report + "\n")
    print("\n" + report)
    return results


def timing_line(stages: dict, runs: dict, timing: dict, seeds: list[int]) -> str:
    sft = next(iter(runs.values()))
    return (
        f"{len(seeds)} seed(s) {seeds}; {timing['runs']} SFT runs of {sft['steps']} steps. Minutes on this machine: "
        f"tower {timing['tower_s'] / 60:.1f} (trained once, then cached), alignment {timing['align_s'] / 60:.1f}, "
        f"caption pre-training ({stages['pretrain']['steps']} steps) {timing['pretrain_s'] / 60:.1f}, "
        f"text lesson ({stages['text_lesson']['steps']} steps) {timing['text_lesson_s'] / 60:.1f}, "
        f"SFT {timing['sft_s_per_run'] / 60:.1f} and evaluation {timing['eval_s_per_run'] / 60:.1f} per run; "
        f"all stages {timing['total_s'] / 60:.1f}."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--language-model",
        type=Path,
        default=Path("checkpoints/SmolLM2-135M-Instruct"),
        help="a ChatML causal LM folder",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    parser.add_argument(
        "--text-only-seeds", type=int, default=2, help="how many of the seeds also run the text-only baseline"
    )
    parser.add_argument("--align-steps", type=int, help="overrides the alignment config's")
    parser.add_argument("--pretrain-steps", type=int, help="overrides the pre-training config's")
    parser.add_argument("--text-steps", type=int, help="overrides the text lesson's (the SFT config's)")
    parser.add_argument("--sft-steps", type=int, help="overrides the SFT config's")
    parser.add_argument("--batch", type=int, help="micro batch size of every trainer stage; overrides the configs'")
    parser.add_argument("--eval-size", type=int, help="held-out questions per run (default: all 300)")
    parser.add_argument("--eval-batch", type=int, default=8, help="questions per generate() call")
    parser.add_argument(
        "--cache", type=Path, default=Path(".cache/aki_demo"), help="where the pre-trained tower is kept"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/smollm2_ablation"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    main()
