"""aki_eval against VLMEvalKit's own evaluate() (commit 6c85ef78), on the real-layout files in tests/reference/vlmevalkit.

`tests/reference/vlmevalkit_goldens.py` made those files and ran VLMEvalKit on them; this test scores the same
predictions with aki_eval, asking the same stand-in judge, and compares scores, per-question hits and the
answers each side sent to the judge.
"""

import json
from pathlib import Path

import pytest
from reference.vlmevalkit_goldens import StandInJudge as StandIn

from aki_eval.benchmarks import get_benchmark

FOLDER = Path(__file__).parent / "reference" / "vlmevalkit"
GOLDENS = json.loads((FOLDER / "goldens.json").read_text())
PREDICTIONS = json.loads((FOLDER / "predictions.json").read_text())


def setup(benchmark_name, file_stem):
    benchmark = get_benchmark(benchmark_name)
    records = benchmark.load(FOLDER)
    return benchmark, records, benchmark.read_back(PREDICTIONS[file_stem]), StandIn()


def overall_by_split(golden):
    return {row["split"]: row for row in golden["score"]}


@pytest.mark.parametrize("benchmark_name, file_stem", [("seedbench", "SEEDBench_IMG"), ("mmbench", "MMBench_DEV_EN")])
def test_multiple_choice_matches_vlmevalkit(benchmark_name, file_stem):
    """SEED: option cells pandas reads as missing, predictions read back as "nan". MMBench: circular groups,
    judged only where a rotation is unreadable and no earlier one is lost."""
    golden = GOLDENS[file_stem]
    benchmark, records, predictions, judge = setup(benchmark_name, file_stem)
    hits, _ = benchmark.evaluate(records, predictions, judge)
    assert hits == {index: float(hit) for index, hit in golden["per_row"].items()}
    assert sorted(judge.judged) == golden["judged"]
    score = benchmark.score(records, predictions, StandIn())
    row = golden["score"][0]
    assert score.metrics["Overall"] == pytest.approx(100 * row["Overall"])
    for category, value in score.metrics["by_category"].items():
        assert category in row or category == ""  # SEED's fixture has no category column
        if category:
            assert value == pytest.approx(100 * row[category])


def test_realworldqa_matches_vlmevalkit():
    """A prediction "None" is "nan" there (no "no" in it); rows without options are always wrong. VLMEvalKit asks
    the judge about those rows in vain; aki_eval does not."""
    golden = GOLDENS["RealWorldQA"]
    rwqa, records, predictions, judge = setup("realworldqa", "RealWorldQA")
    score = rwqa.score(records, predictions, judge)
    assert score.columns["RWQA"] == pytest.approx(100 * golden["score"][0]["Overall"])
    without_options = {predictions[r.index] for r in records if not r.options}
    assert sorted(judge.judged) == [answer for answer in golden["judged"] if answer not in without_options]


def test_mmmu_matches_vlmevalkit():
    """A truth letter without an option stays the truth; a truth that is no letter becomes 'A'."""
    golden = GOLDENS["MMMU_DEV_VAL"]
    mmmu, records, predictions, judge = setup("mmmu", "MMMU_DEV_VAL")
    score = mmmu.score(records, predictions, judge)
    expected = {split: 100 * row["Overall"] for split, row in overall_by_split(golden).items()}
    assert score.metrics["by_split"] == pytest.approx(expected)
    assert score.columns["MMMU"] == pytest.approx(expected["validation"])
    assert sorted(judge.judged) == golden["judged"]


def test_mathvista_matches_vlmevalkit():
    """Any rule letter is final (even a wrong one, or 'Z'); an answer 0 goes to the judge; an empty reply is kept
    (and read back from VLMEvalKit's .xlsx file as "nan")."""
    golden = GOLDENS["MathVista_MINI"]
    mathvista, records, predictions, judge = setup("mathvista", "MathVista_MINI")
    for record in records:
        response, by_rule = mathvista.extract(record, predictions[record.index], StandIn())
        theirs = golden["per_row"][record.index]
        assert (response, by_rule) == (theirs["res"], theirs["log"] == "Prefetch succeed"), record.index
    score = mathvista.score(records, predictions, judge)
    for row in golden["score"]:
        ours = score.metrics[row["Task&Skill"]]
        assert ours == pytest.approx({"acc": row["acc"], "prefetch_rate": row["prefetch_rate"]}), row["Task&Skill"]
    assert sorted(judge.judged) == golden["judged"]


def test_mmvet_overall_matches_vlmevalkit_and_capabilities_count_each_question_once():
    """VLMEvalKit adds a single-capability question to its capability twice (once as the capability, once as
    the combination of that one capability); aki_eval counts it once. The overall score is the same."""
    golden = GOLDENS["MMVet"]
    mmvet, records, predictions, judge = setup("mmvet", "MMVet")
    score = mmvet.score(records, predictions, judge)
    theirs = {row["Category"]: row["acc"] for row in golden["score"]}
    assert score.columns["MM-Vet"] == pytest.approx(theirs["Overall"])
    assert sorted(judge.judged) == golden["judged"]
    grades = golden["per_row"]
    for capability, ours in score.metrics["by_capability"].items():
        rows = [r.index for r in records if capability in r.category]
        assert ours == pytest.approx(100 * sum(grades[i] for i in rows) / len(rows))
    assert score.metrics["by_capability"]["rec"] == pytest.approx(50.0) and theirs["rec"] == pytest.approx(60.0)


class Replaying:
    """A predictor that answers with the fixture's predictions (no model)."""

    def __init__(self, file_stems: dict[str, str]):
        self.file_stems = file_stems

    def __call__(self, benchmark, records):
        return [PREDICTIONS[self.file_stems[benchmark.name]][record.index] for record in records]


def test_the_judge_is_paid_once_per_question_vlmevalkit_judges_even_across_reruns(tmp_path):
    from aki_eval.run import evaluate

    stems = {"mmbench": "MMBench_DEV_EN", "mathvista": "MathVista_MINI", "seedbench": "SEEDBench_IMG"}
    judge = StandIn()
    first = evaluate("replay", list(stems), FOLDER, tmp_path, judge=judge, predictor=Replaying(stems))
    assert len(judge.judged) == sum(len(GOLDENS[stem]["judged"]) for stem in stems.values())  # 4 + 6 + 5
    assert (tmp_path / "judge_replies.jsonl").exists()
    rerun = StandIn()
    again = evaluate("replay", list(stems), FOLDER, tmp_path, judge=rerun, predictor=Replaying(stems))
    assert rerun.judged == []  # every reply came from OUTPUT/judge_replies.jsonl
    assert {k: s.columns for k, s in again.items()} == {k: s.columns for k, s in first.items()}
