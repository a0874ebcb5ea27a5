"""Evaluation keeps what it has: bad image rows are skipped and counted, a failing judge costs only
the judged columns, duplicate indices are refused at load, malformed prediction lines are re-asked."""

import base64
import json
import socket

import pytest
from eval_fixtures import image_b64, write_tsv

from aki_eval.benchmarks import get_benchmark
from aki_eval.data import BenchmarkDataError
from aki_eval.judge import Judge
from aki_eval.run import evaluate, read_predictions


class Answers:
    """A stand-in predictor: decodes each record's images as the real one does, then answers from a table."""

    def __init__(self, answers: dict[str, str], default: str = "Yes"):
        self.answers, self.default, self.asked = answers, default, []

    def __call__(self, benchmark, records):
        for record in records:
            assert all(image.size for image in record.load_images())
        self.asked += [record.index for record in records]
        return [self.answers.get(record.index, self.default) for record in records]


def pope_rows(count: int) -> list[dict]:
    return [
        {"index": i, "image": image_b64(i), "question": f"Is there a thing {i}?", "answer": "Yes" if i % 2 else "No",
         "category": "random"}
        for i in range(count)
    ]  # fmt: skip


def test_bad_image_rows_are_skipped_and_counted_with_file_and_row(tmp_path):
    rows = pope_rows(5)
    rows[2]["image"] = "!" * 100  # not base64
    rows[4]["image"] = base64.b64encode(b"this is no image at all, only text" * 3).decode()
    write_tsv(tmp_path / "data" / "POPE.tsv", rows)
    for attempt in range(2):  # a rerun skips the same rows, it does not stop
        predictor = Answers({})
        scores = evaluate("model", ["pope"], tmp_path / "data", tmp_path / "out", predictor=predictor)
        assert predictor.asked == (["0", "1", "3"] if attempt == 0 else [])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    skipped = results["pope"]["metrics"]["skipped_rows"]
    assert len(skipped) == 2
    assert "POPE.tsv row 3 (index 2)" in skipped[0] and "POPE.tsv row 5 (index 4)" in skipped[1]
    assert scores["pope"].metrics["rows"] == 3


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_an_unreachable_judge_costs_only_the_judged_columns(tmp_path):
    write_tsv(tmp_path / "data" / "POPE.tsv", pope_rows(4))
    write_tsv(
        tmp_path / "data" / "MMVet.tsv",
        [{"index": 0, "image": image_b64(0), "question": "q", "answer": "x", "category": "rec"}],
    )
    judge = Judge(closed_port_url(), "gone", retries=1, backoff=0, timeout=2)
    answers = Answers({"0": "No", "1": "Perhaps", "2": "No", "3": "Yes"})  # "Perhaps" needs the judge
    scores = evaluate("model", ["pope", "mmvet"], tmp_path / "data", tmp_path / "out", judge=judge, predictor=answers)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["mmvet"]["columns"] == {"MM-Vet": "judge failed"}
    assert isinstance(results["pope"]["columns"]["POPE"], float)  # scored by the rules alone
    assert scores["pope"].columns["POPE"] == pytest.approx(100 * 2 / 3)  # "Perhaps" read as Unknown
    assert any("judge" in note for note in results["pope"]["notes"])
    assert "judge failed" in (tmp_path / "out" / "table.md").read_text()


def test_duplicate_indices_are_refused_at_load_naming_the_rows(tmp_path):
    rows = pope_rows(5)
    rows[3]["index"] = 1
    write_tsv(tmp_path / "POPE.tsv", rows)
    with pytest.raises(BenchmarkDataError, match=r"POPE.tsv: index '1' is on rows 2 and 4"):
        get_benchmark("pope").load(tmp_path)


def test_prediction_lines_without_the_keys_are_asked_again(tmp_path):
    path = tmp_path / "predictions.jsonl"
    lines = ['{"index": "0", "prediction": "Yes"}', '{"foo": 1}', "[1, 2]", '"text"', '{"index": "1"}']
    path.write_text("\n".join(lines) + "\n")
    assert read_predictions(path) == {"0": "Yes"}
    assert path.read_text() == lines[0] + "\n"
