"""Data-parallel evaluation: `torchrun --nproc_per_node 2 -m aki_eval.run` on CPU (gloo) equals a one-process run."""

import json
import os
import subprocess
import sys

from eval_fixtures import image_b64, write_tsv
from test_eval_benchmarks import mme_rows

from aki_eval.run import evaluate


def run(arguments: list[str], output) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    completed = subprocess.run(arguments, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((output / "results.json").read_text())


def test_two_gloo_processes_score_like_one(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    write_tsv(data / "MME.tsv", mme_rows()[0])
    pope = [
        {"index": i, "image": image_b64(i), "question": f"Is there a thing {i}?", "answer": "Yes" if i % 2 else "No",
         "category": "random"}
        for i in range(5)
    ]  # fmt: skip
    write_tsv(data / "POPE.tsv", pope)
    command = ["-m", "aki_eval.run", "--model", str(tiny_checkpoint), "--benchmarks", "mme,pope"]
    command += ["--data-root", str(data), "--max-new-tokens", "6"]
    command += ["--batch-size", "1"]  # padding cannot differ between the runs
    evaluate(str(tiny_checkpoint), ["mme", "pope"], data, tmp_path / "one", batch_size=1, max_new_tokens=6)
    alone = json.loads((tmp_path / "one" / "results.json").read_text())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    together = run([*torchrun, *command, "--output", str(tmp_path / "two")], tmp_path / "two")
    assert together == alone
    for name, count in (("mme", 6), ("pope", 5)):
        folder = tmp_path / "two" / name
        assert sorted(path.name for path in folder.iterdir()) == ["predictions.jsonl"]  # rank files merged
        lines = (folder / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == count
        one = {json.loads(line)["index"]: json.loads(line)["prediction"] for line in lines}
        two = (tmp_path / "one" / name / "predictions.jsonl").read_text().splitlines()
        assert one == {json.loads(line)["index"]: json.loads(line)["prediction"] for line in two}


class Echo:
    """A predictor that answers with the question id, and remembers what it was asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, benchmark, records):
        self.asked += [record.index for record in records]
        return [f"answer {record.index}" for record in records]


def test_ranks_shard_resume_from_their_own_files_and_merge(tmp_path):
    from aki_eval.benchmarks import get_benchmark
    from aki_eval.data import Record
    from aki_eval.run import Ranks, merge_predictions, predict

    benchmark = get_benchmark("pope")
    records = [Record(str(i), "Is there a cat?") for i in range(5)]
    folder = tmp_path / "pope"
    folder.mkdir()
    (folder / "predictions.rank1.jsonl").write_text('{"index": "1", "prediction": "answer 1"}\n{"index": "3", "pre')
    rank1 = Echo()
    predict(benchmark, records, rank1, folder, 2, Ranks(rank=1, world_size=2, local_rank=1))
    assert rank1.asked == ["3"]  # its shard is 1 and 3; 1 was on disk, the cut line is asked again
    rank0 = Echo()
    predict(benchmark, records, rank0, folder, 2, Ranks(rank=0, world_size=2))
    assert rank0.asked == ["0", "2", "4"]
    merged = merge_predictions(folder)
    assert merged == {str(i): f"answer {i}" for i in range(5)}
    assert sorted(path.name for path in folder.iterdir()) == ["predictions.jsonl"]
    # A rank file a stopped run left behind counts as done for a later single-process run.
    (folder / "predictions.rank0.jsonl").write_text('{"index": "9", "prediction": "answer 9"}\n')
    alone = Echo()
    predictions = predict(benchmark, [*records, Record("9", "?"), Record("10", "?")], alone, folder, 2)
    assert alone.asked == ["10"] and len(predictions) == 7
