"""What every benchmark module provides: where its files are, its records, its prompt, its score."""

from dataclasses import dataclass, field
from pathlib import Path

from ..data import BenchmarkDataError, Record, as_read_back, read_hf, read_tsv, refuse_duplicates

NEEDS_JUDGE = "needs judge"


@dataclass
class Score:
    """`columns` fills the paper's table (a number, or a reason such as NEEDS_JUDGE); `metrics`
    holds everything else (per category, per split). `judge` names the LLM behind judged numbers."""

    columns: dict[str, float | str]
    metrics: dict = field(default_factory=dict)
    judge: str | None = None
    notes: list[str] = field(default_factory=list)


class Benchmark:
    """A benchmark: files, records, prompts, scoring. Subclasses set the class attributes."""

    name: str = ""
    columns: tuple[str, ...] = ()
    tsv_names: tuple[str, ...] = ()  # VLMEvalKit TSV file names under --data-root
    hf_dirs: tuple[str, ...] = ()  # Hugging Face dataset folders under --data-root
    hf_split: str | None = None
    hf_config: str | None = None  # the config of a multi-config Hugging Face folder
    reads_back_predictions = True  # scored after VLMEvalKit's .xlsx round trip (see `data.as_read_back`)
    max_new_tokens: int = 512  # VLMEvalKit's AKI wrapper
    image_separator: str = ""  # VLMEvalKit gave AKI `<image>{text}`, with no newline
    prompt_prefix: str = ""  # text before the chat template (after the tokenizer's BOS)

    def locate(self, data_root: Path) -> tuple[str, Path]:
        for name in self.tsv_names:
            if (data_root / name).is_file():
                return "tsv", data_root / name
        for name in self.hf_dirs:
            if (data_root / name).is_dir():
                return "hf", data_root / name
        tried = [str(data_root / name) for name in (*self.tsv_names, *self.hf_dirs)]
        raise BenchmarkDataError(f"No data for {self.name}: looked for {', '.join(tried)}.")

    def load(self, data_root: Path, hf_config: str | None = None, skipped: list[str] | None = None) -> list[Record]:
        """The records, each with an id unique in the benchmark (predictions are keyed by it); rows that
        cannot be asked are left out and described in `skipped`."""
        kind, path = self.locate(Path(data_root))
        try:
            records = self.read(kind, path, hf_config or self.hf_config, skipped)
        except KeyError as error:
            raise BenchmarkDataError(f"{path} lacks the column {error} that {self.name} needs.") from error
        # A TSV's indices were checked as its rows were read; a hub folder's ids (with split or source) are here.
        refuse_duplicates([record.index for record in records], str(path), key="record id", place="record")
        return records

    def read(self, kind: str, path: Path, hf_config: str | None, skipped: list[str] | None = None) -> list[Record]:
        if kind == "tsv":
            return [record for row in read_tsv(path, skipped) for record in self.from_tsv(row)]
        rows = read_hf(path, self.hf_split, hf_config)
        return [record for position, row in enumerate(rows) for record in self.from_hf({"_position": position, **row})]

    def from_tsv(self, row: dict) -> list[Record]:
        raise NotImplementedError

    def from_hf(self, row: dict) -> list[Record]:
        raise NotImplementedError

    def message(self, record: Record) -> list[dict]:
        """The prompt as VLMEvalKit builds it: image items, then text items."""
        return [
            *({"type": "image", "value": image} for image in record.images),
            {"type": "text", "value": record.question},
        ]

    def score(self, records: list[Record], predictions: dict[str, str], judge=None) -> Score:
        """The score of `predictions` (the model's texts by record index, as it wrote them), read as the
        reference scoring code read them (`read_back`); each benchmark scores in `score_read_back`."""
        return self.score_read_back(records, self.read_back(predictions), judge)

    def score_read_back(self, records: list[Record], predictions: dict[str, str], judge=None) -> Score:
        raise NotImplementedError

    def read_back(self, predictions: dict[str, str]) -> dict[str, str]:
        """The predictions as the scoring code reads them (VLMEvalKit: from its .xlsx file)."""
        if not self.reads_back_predictions:
            return predictions
        return {index: as_read_back(prediction) for index, prediction in predictions.items()}


def judge_label(judge, how: dict[str, int]) -> str | None:
    """The judge's name for `Score.judge` when it decided at least one answer (`how` counts answers by method)."""
    return judge.name if judge is not None and how.get("judge") else None


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
