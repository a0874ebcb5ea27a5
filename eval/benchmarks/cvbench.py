"""CV-Bench 2D and 3D, scored as the AKI authors' script did (strict letter match) and source-macro.

Their script compared the raw outputs. Predictions are read back here as on every benchmark (a text pandas
reads as missing is "nan"): no such text is a letter, so the strict columns are the script's, and the
option-parsing score treats them as the other benchmarks do.
"""

from collections import defaultdict

from ..data import Record, options_of
from ..extract import can_infer, strict_letter
from .base import Benchmark, Score, mean

PROMPT = "Answer with the option's letter from the given choices directly. {question}\nOptions:\n{options}"


def cvbench_prompt(question: str, options: dict[str, str]) -> str:
    return PROMPT.format(question=question, options="".join(f"{letter}. {text}\n" for letter, text in options.items()))


class CVBench(Benchmark):
    name = "cvbench"
    columns = ("CVB-2D", "CVB-3D")
    tsv_names = ("CV-Bench.tsv",)
    hf_dirs = ("CV-Bench",)
    hf_split = "test"
    max_new_tokens = 256
    image_separator = "\n"  # the AKI script's template: `<image>\n{query}`
    prompt_prefix = " "  # the AKI script wrote "<s> <|system|>...": BOS, then a space

    def locate(self, data_root):
        # VLMEvalKit ships the two halves as separate TSVs.
        halves = [data_root / "CV-Bench-2D.tsv", data_root / "CV-Bench-3D.tsv"]
        if all(path.is_file() for path in halves):
            return "tsv-halves", data_root
        return super().locate(data_root)

    def read(self, kind, path, hf_config, skipped=None):
        if kind != "tsv-halves":
            return super().read(kind, path, hf_config, skipped)
        from ..data import read_tsv

        return [
            r
            for name in ("CV-Bench-2D.tsv", "CV-Bench-3D.tsv")
            for row in read_tsv(path / name, skipped)
            for r in self.from_tsv(row)
        ]

    def from_tsv(self, row: dict) -> list[Record]:
        options = options_of(row, "ABCDEF")
        split = row.get("split") or ("3D" if row.get("source") == "Omni3D" else "2D")
        return [
            Record(
                index=f"{split}-{row['index']}",
                question=cvbench_prompt(row["question"], options),
                answer=row["answer"].strip("()"),
                images=row["_images"],
                options=options,
                category=row.get("source", ""),
                extra={"type": split, "task": row.get("task", "")},
            )
        ]

    def from_hf(self, row: dict) -> list[Record]:
        options = {chr(65 + i): str(choice) for i, choice in enumerate(row["choices"])}
        return [
            Record(
                index=f"{row['type']}-{row['idx']}",  # idx restarts in each half, as in the TSVs
                question=cvbench_prompt(row["question"], options),
                answer=str(row["answer"]).strip("()"),
                images=[row["image"]],
                options=options,
                category=row["source"],
                extra={"type": row["type"], "task": row.get("task", "")},
            )
        ]

    def score_read_back(self, records, predictions, judge=None) -> Score:
        strict, parsed = defaultdict(list), defaultdict(list)
        for record in records:
            prediction = predictions[record.index]
            strict[record.category].append(float(strict_letter(prediction, record.answer)))
            parsed[record.category].append(float(can_infer(prediction, record.options) == record.answer))

        def summary(hits):
            by_source = {source: 100 * mean(values) for source, values in sorted(hits.items())}
            two_d = mean(by_source[s] for s in ("ADE20K", "COCO") if s in by_source)
            three_d = by_source.get("Omni3D", float("nan"))
            return {"2D": two_d, "3D": three_d, "Overall": (two_d + three_d) / 2, "by_source": by_source}

        authors, rules = summary(strict), summary(parsed)
        return Score(
            columns={"CVB-2D": authors["2D"], "CVB-3D": authors["3D"]},
            metrics={"strict_exact_match": authors, "option_extraction": rules},
            notes=["Columns use the AKI script's strict match (the output must be exactly the letter)."],
        )
