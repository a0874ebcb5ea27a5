"""Predictions that pandas reads as missing ("None", "NA", "N/A", "null", "nan" and ""), on every column of the paper's
table, scored by aki_eval and by the reference on the same files: VLMEvalKit 6c85ef78's own evaluate() (after its
.xlsx round trip, where each of them becomes the text "nan"), and for CV-Bench the AKI authors' script.

`tests/reference/vlmevalkit_goldens.py` made the files in tests/reference/vlmevalkit/missing and ran both. Its
stand-in judge answers from the length of the answer it is shown (`by_length`), so a prediction shown to it as "None"
and one shown as "nan" get different verdicts; option texts such as "an" (in "nan") and "No" (in "none") do the same
for the rules.
"""

import json
import shutil
from pathlib import Path

import pytest
from reference.vlmevalkit_goldens import StandInJudge as StandIn

from aki_eval.benchmarks import get_benchmark
from aki_eval.benchmarks.mathvista import check
from aki_eval.benchmarks.yorn import read_yes_no
from aki_eval.data import is_missing
from aki_eval.extract import strict_letter

FOLDER = Path(__file__).parent / "reference" / "vlmevalkit" / "missing"
GOLDENS = json.loads((FOLDER / "goldens.json").read_text())
PREDICTIONS = json.loads((FOLDER / "predictions.json").read_text())
CVBENCH_ROWS = json.loads((FOLDER / "CV-Bench.json").read_text())
MISSING = ("None", "NA", "N/A", "null", "nan", "")
STEMS = {
    "mme": "MME", "mmbench": "MMBench_DEV_EN", "seedbench": "SEEDBench_IMG", "llavabench": "LLaVABench",
    "mmmu": "MMMU_DEV_VAL", "mathvista": "MathVista_MINI", "pope": "POPE", "mmvet": "MMVet",
    "realworldqa": "RealWorldQA", "cvbench": "CV-Bench",
}  # fmt: skip


def reference_columns(name: str) -> dict[str, float]:
    """The paper's columns as the reference computed them."""
    golden = GOLDENS[STEMS[name]]
    if name == "cvbench":  # the authors' script writes 4 decimals of a fraction
        return {"CVB-2D": 100 * golden["written"]["2D"], "CVB-3D": 100 * golden["written"]["3D"]}
    rows = {row.get("split", row.get("Category", row.get("Task&Skill"))): row for row in golden["score"]}
    if name == "mme":
        return {"MME-P": golden["score"][0]["perception"], "MME-C": golden["score"][0]["reasoning"]}
    if name == "llavabench":  # rounded to one decimal by VLMEvalKit
        return {"LLaVA-W": rows["overall"]["Relative Score (main)"]}
    if name == "mathvista":
        return {"MathV": rows["Overall"]["acc"]}
    if name == "pope":
        return {"POPE": rows["Overall"]["Overall"]}
    if name == "mmvet":
        return {"MM-Vet": rows["Overall"]["acc"]}
    split = "validation" if name == "mmmu" else "none"
    column = get_benchmark(name).columns[0]
    return {column: 100 * rows[split]["Overall"]}


def load_records(name: str):
    benchmark = get_benchmark(name)
    if name == "cvbench":  # the Hugging Face rows the authors' script read (no images: nothing here looks at them)
        return benchmark, [record for row in CVBENCH_ROWS for record in benchmark.from_hf({**row, "image": None})]
    return benchmark, benchmark.load(FOLDER)


def test_the_fixtures_answer_each_benchmark_with_every_missing_text():
    for name, stem in STEMS.items():
        assert set(MISSING) <= set(PREDICTIONS[stem].values()), name


def test_the_texts_read_as_missing_are_those_pandas_reads_as_missing():
    """`is_missing` against what VLMEvalKit's .xlsx round trip made of each text (including near misses)."""
    probe = GOLDENS["pandas_missing"]
    assert [text for text in probe["read_as_missing"] if not is_missing(text)] == []
    assert [text for text in probe["read_as_text"] if is_missing(text)] == []


@pytest.mark.parametrize("name", list(STEMS))
def test_missing_predictions_score_as_the_reference_scores_them(name):
    """`Benchmark.score` takes the model's texts as written and reads them as the reference did."""
    benchmark, records = load_records(name)
    judge = StandIn()
    score = benchmark.score(records, PREDICTIONS[STEMS[name]], judge)
    expected = reference_columns(name)
    tolerance = {"llavabench": 0.05, "cvbench": 0.005}.get(name, 1e-6)
    assert score.columns == pytest.approx(expected, abs=tolerance)
    golden = GOLDENS[STEMS[name]]
    assert sorted(judge.judged) == golden.get("judged", [])


@pytest.mark.parametrize("name", ["seedbench", "realworldqa"])
def test_multiple_choice_hits_per_question(name):
    benchmark, records = load_records(name)
    predictions = benchmark.read_back(PREDICTIONS[STEMS[name]])
    hits, _ = benchmark.evaluate(records, predictions, StandIn())
    assert hits == {index: float(hit) for index, hit in GOLDENS[STEMS[name]]["per_row"].items()}


@pytest.mark.parametrize("name", ["mme", "pope"])
def test_yes_no_answers_per_question(name):
    benchmark, records = load_records(name)
    predictions = benchmark.read_back(PREDICTIONS[STEMS[name]])
    ours = {r.index: read_yes_no(r.question, predictions[r.index], StandIn())[0] for r in records}
    assert ours == GOLDENS[STEMS[name]]["per_row"]


def test_mathvista_prefetch_and_the_judges_extraction_per_question():
    """A missing prediction is "nan", which names option 'an' by the rules; a judge's extracted answer that pandas
    reads as missing ("None", "", ...) is "nan" too, since VLMEvalKit reads it back from its .xlsx file."""
    mathvista, records = load_records("mathvista")
    predictions = mathvista.read_back(PREDICTIONS["MathVista_MINI"])
    for record in records:
        response, by_rule = mathvista.extract(record, predictions[record.index], StandIn())
        theirs = GOLDENS["MathVista_MINI"]["per_row"][record.index]
        assert (response, by_rule) == (theirs["res"], theirs["log"] == "Prefetch succeed"), record.index
        assert check(record, response), record.index  # every row is right in VLMEvalKit's score


def test_cvbench_strict_match_per_question_and_source():
    cvbench, records = load_records("cvbench")
    predictions = cvbench.read_back(PREDICTIONS["CV-Bench"])
    golden = GOLDENS["CV-Bench"]
    assert {r.index: int(strict_letter(predictions[r.index], r.answer)) for r in records} == golden["per_row"]
    score = cvbench.score(records, PREDICTIONS["CV-Bench"])
    by_source = {source: 100 * value for source, value in golden["by_source"].items()}
    assert score.metrics["strict_exact_match"]["by_source"] == pytest.approx(by_source)


class Replaying:
    """A predictor that answers with the fixture's predictions (no model)."""

    def __call__(self, benchmark, records):
        return [PREDICTIONS[STEMS[benchmark.name]][record.index] for record in records]


def test_aki_eval_scores_missing_predictions_as_the_reference(tmp_path):
    """The command's path: predictions written to and read from predictions.jsonl, then scored."""
    import datasets

    from aki_eval.run import evaluate

    data = tmp_path / "data"
    shutil.copytree(FOLDER, data)
    datasets.Dataset.from_list([{**row, "image": None} for row in CVBENCH_ROWS]).save_to_disk(str(data / "CV-Bench"))
    scores = evaluate("replay", list(STEMS), data, tmp_path / "out", judge=StandIn(), predictor=Replaying())
    for name in STEMS:
        tolerance = {"llavabench": 0.05, "cvbench": 0.005}.get(name, 1e-6)
        assert scores[name].columns == pytest.approx(reference_columns(name), abs=tolerance), name
