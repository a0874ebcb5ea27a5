"""`python -m aki_eval.run` end to end with a tiny model; resume; the judge client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from eval_fixtures import image_b64, write_tsv
from test_eval_benchmarks import circular_rows, mme_rows

from aki_eval.benchmarks import NEEDS_JUDGE, get_benchmark
from aki_eval.judge import Judge, JudgeError
from aki_eval.run import Predictor, evaluate, main, read_predictions


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    write_tsv(root / "MME.tsv", mme_rows()[0])
    write_tsv(root / "MMBench_DEV_EN.tsv", circular_rows())
    write_tsv(
        root / "LLaVABench.tsv",
        [
            {
                "index": 0,
                "image": image_b64(0),
                "question": "Describe it.",
                "caption": "A red square.",
                "gpt4_ans": "A red square.",
                "category": "detail",
            }
        ],
    )
    pope = [
        {
            "index": i,
            "image": image_b64(i),
            "question": f"Is there a thing {i}?",
            "answer": "Yes" if i % 2 else "No",
            "category": "random",
        }
        for i in range(7)
    ]
    write_tsv(root / "POPE.tsv", pope)
    return root


def test_evaluate_end_to_end_writes_predictions_results_and_the_table(tiny_checkpoint, data_root, tmp_path):
    scores = evaluate(str(tiny_checkpoint), ["mme", "pope", "mmbench", "llavabench"], data_root, tmp_path, batch_size=3)
    for name, count in (("mme", 6), ("pope", 7), ("mmbench", 4), ("llavabench", 1)):
        predictions = read_predictions(tmp_path / name / "predictions.jsonl")
        assert len(predictions) == count
        assert all(isinstance(text, str) for text in predictions.values())
    assert scores["llavabench"].columns == {"LLaVA-W": NEEDS_JUDGE}
    assert 0.0 <= scores["pope"].columns["POPE"] <= 100.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"mme", "pope", "mmbench", "llavabench"}
    table = (tmp_path / "table.md").read_text()
    header = table.splitlines()[0]
    assert header.index("MME-P") < header.index("MMB") < header.index("POPE") < header.index("CVB-3D")
    assert "| AKI-4B (paper, Table 2) | 1491.9 | 362.9 |" in table and NEEDS_JUDGE in table


class FailingPredictor:
    """Answers `fail_after` batches, then dies like a killed process would."""

    def __init__(self, inner, fail_after):
        self.inner, self.fail_after, self.calls, self.asked = inner, fail_after, 0, []

    def __call__(self, benchmark, records):
        if self.calls == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.asked += [record.index for record in records]
        return self.inner(benchmark, records)


def test_a_stopped_run_resumes_without_duplicates_or_losses(tiny_checkpoint, data_root, tmp_path):
    predictor = Predictor(str(tiny_checkpoint))
    stopping = FailingPredictor(predictor, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(tiny_checkpoint), ["pope"], data_root, tmp_path, batch_size=3, predictor=stopping)
    path = tmp_path / "pope" / "predictions.jsonl"
    assert len(read_predictions(path)) == 3
    with path.open("a") as handle:
        handle.write('{"index": "3", "predic')  # a line cut short by the kill
    resuming = FailingPredictor(predictor, fail_after=99)
    evaluate(str(tiny_checkpoint), ["pope"], data_root, tmp_path, batch_size=3, predictor=resuming)
    assert resuming.asked == ["3", "4", "5", "6"]  # only what was missing
    lines = path.read_text().splitlines()
    indices = [json.loads(line)["index"] for line in lines]
    assert sorted(indices) == [str(i) for i in range(7)] and len(indices) == len(set(indices))
    fresh = evaluate(str(tiny_checkpoint), ["pope"], data_root, tmp_path / "fresh", batch_size=7, predictor=predictor)
    assert read_predictions(tmp_path / "fresh" / "pope" / "predictions.jsonl") == read_predictions(path)
    assert fresh["pope"].columns == json.loads((tmp_path / "results.json").read_text())["pope"]["columns"]


def test_command_line_with_policy_and_limit(tiny_checkpoint, data_root, tmp_path, capsys):
    main(
        [
            "--model",
            str(tiny_checkpoint),
            "--benchmarks",
            "pope",
            "--data-root",
            str(data_root),
            "--output",
            str(tmp_path),
            "--limit",
            "2",
            "--policy",
            "causal",
        ]
    )
    assert len(read_predictions(tmp_path / "causal" / "pope" / "predictions.jsonl")) == 2
    printed = capsys.readouterr().out
    assert "AKI-4B (paper, Table 2)" in printed and " POPE " in printed
    with pytest.raises(SystemExit, match="2"):  # one line, exit code 2
        main(
            [
                "--model",
                str(tiny_checkpoint),
                "--benchmarks",
                "pope,mmlu",
                "--data-root",
                str(data_root),
                "--output",
                str(tmp_path),
            ]
        )
    assert "Unknown benchmark 'mmlu'" in capsys.readouterr().err


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible server on localhost: fails, then answers by the prompt's kind."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        StubJudge.seen.append(body)
        step = StubJudge.script.pop(0) if StubJudge.script else "answer"
        if step == "500":
            self.send_response(500)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if step == "malformed":
            self.wfile.write(b'{"choices": []}')
            return
        if "[Context]" in prompt:
            reply = "8 6\nAssistant 2 is less detailed."
        elif "Correctness" in prompt:
            reply = "0.5"
        elif "Extracted answer" in prompt:
            reply = "14"
        else:
            reply = "A"
        self.wfile.write(json.dumps({"choices": [{"message": {"content": reply}}]}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubJudge.script, StubJudge.seen = [], []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_retries_through_errors_and_malformed_replies(judge_server):
    judge = Judge(judge_server, "stub-judge", "key", retries=3, backoff=0)
    StubJudge.script = ["500", "malformed"]
    assert judge.ask("Correctness?") == "0.5"
    assert len(StubJudge.seen) == 3  # a 500, a reply without choices, then an answer
    assert StubJudge.seen[-1]["model"] == "stub-judge"
    StubJudge.script = ["malformed"] * 3
    with pytest.raises(JudgeError, match="failed 3 times"):
        judge.ask("Correctness?")


def test_judged_benchmarks_with_the_stub(judge_server, tmp_path):
    judge = Judge(judge_server, "stub-judge", retries=2, backoff=0)
    rows = [
        {
            "index": i,
            "image": image_b64(i),
            "question": "Describe it.",
            "caption": "c",
            "gpt4_ans": "ref",
            "category": c,
        }
        for i, c in enumerate(["conv", "detail"])
    ]
    write_tsv(tmp_path / "LLaVABench.tsv", rows)
    llava = get_benchmark("llavabench")
    records = llava.load(tmp_path)
    score = llava.score(records, {"0": "a", "1": "b"}, judge)
    assert score.columns == {"LLaVA-W": 75.0} and score.judge == "stub-judge"  # 6 / 8

    write_tsv(
        tmp_path / "MMVet.tsv",
        [{"index": 0, "image": image_b64(0), "question": "q", "answer": "x<AND>y", "category": "rec,ocr"}],
    )
    mmvet = get_benchmark("mmvet")
    score = mmvet.score(mmvet.load(tmp_path), {"0": "x"}, judge)
    assert score.columns == {"MM-Vet": 50.0} and score.metrics["by_capability"] == {"rec": 50.0, "ocr": 50.0}
    assert "x <AND> y | x | " in StubJudge.seen[-1]["messages"][-1]["content"]

    mathvista_rows = [
        {"index": 0, "image": image_b64(0), "question": "How many?", "answer": "14", "question_type": "free_form", "answer_type": "integer", "choices": "", "task": "math word problem", "skills": "['arithmetic reasoning']"},
        {"index": 1, "image": image_b64(1), "question": "How many more?", "answer": "14", "question_type": "free_form", "answer_type": "integer", "choices": "", "task": "math word problem", "skills": "['arithmetic reasoning']"},
        {"index": 2, "image": image_b64(2), "question": "Which?", "answer": "8/11", "answer_option": "B", "question_type": "multi_choice", "answer_type": "text", "choices": "['3/11', '8/11']", "task": "figure question answering", "skills": "['algebraic reasoning']"},
        {"index": 3, "image": image_b64(3), "question": "Spell it.", "answer": "cat", "question_type": "free_form", "answer_type": "text", "choices": "", "task": "textbook question answering", "skills": "[]"},
    ]  # fmt: skip
    write_tsv(tmp_path / "MathVista_MINI.tsv", mathvista_rows)
    mathvista = get_benchmark("mathvista")
    asked_before = len(StubJudge.seen)
    score = mathvista.score(
        mathvista.load(tmp_path), {"0": "14", "1": "The answer is 14.", "2": "(B) 8/11", "3": "cat"}, judge
    )
    # 0 and 2 prefetch; 1 is extracted by the judge ("14"); 3 is a text answer, never right in the toolkit.
    assert len(StubJudge.seen) - asked_before == 2
    assert score.columns == {"MathV": 75.0} and score.metrics["Overall"]["prefetch_rate"] == 50.0
