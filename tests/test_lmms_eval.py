"""The `aki` model in the real lmms-eval (0.7.3, as `make test` installs it): its model registry, its command
line and its own `pope` and `mme` task code, offline, on local files in the Hugging Face layout; one process
and two under `accelerate launch`."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from lmms_eval.api.instance import Instance

from aki_eval import lmms_eval_adapter
from aki_eval.lmms_eval_adapter import AkiLmms, cut_at
from aki_eval.run import Predictor

# (colour, asked about, truth) per question; lmms-eval's pope and mme code lowercase the truth.
POPE = [("red", "red", "yes"), ("green", "green", "yes"), ("blue", "yellow", "no"), ("white", "white", "yes")]
# MME asks two questions per image, one true and one false; categories decide perception or cognition.
MME = [("color", "red"), ("count", "blue"), ("code_reasoning", "green")]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A folder holding `lmms-lab-encoder/POPE` and `lmms-lab-encoder/MME`, the `dataset_path`s of lmms-eval's
    pope and mme tasks, in the hub's layout (data/test-*.parquet). lmms-eval run from this folder hands those
    paths to `datasets.load_dataset`, which reads an existing local folder before it would ask the hub.
    Returns the folder and each task's images by doc_id."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hub")
    pope = [
        {"question_id": str(i + 1), "question": f"Is there a {asked} square in the image?", "answer": truth,
         "image_source": f"COCO_val2014_{i:012d}", "image": Image.new("RGB", (48, 48), colour), "category": "adversarial"}
        for i, (colour, asked, truth) in enumerate(POPE)
    ]  # fmt: skip
    mme = [
        {"question_id": f"{category}/{i:04d}.png", "image": Image.new("RGB", (48, 48), colour),
         "question": f"Is the square {asked}? Please answer yes or no.", "answer": truth, "category": category}
        for i, (category, colour) in enumerate(MME)
        for asked, truth in ((colour, "Yes"), ("yellow", "No"))
    ]  # fmt: skip
    for repo, rows in (("POPE", pope), ("MME", mme)):
        features = datasets.Features(
            {key: datasets.Image() if key == "image" else datasets.Value("string") for key in rows[0]}
        )
        (root / "lmms-lab-encoder" / repo / "data").mkdir(parents=True)
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            root / "lmms-lab-encoder" / repo / "data" / "test-00000-of-00001.parquet"
        )
    return root, {"pope": [row["image"] for row in pope], "mme": [row["image"] for row in mme]}


@pytest.fixture(scope="module")
def yes_checkpoint(tiny_checkpoint, tmp_path_factory, tiny):
    """The tiny model with a generation config that makes it answer "Yes" to everything (a bias on each next
    token of "Yes" and then of EOS), so the scores lmms-eval computes are known."""
    folder = tmp_path_factory.mktemp("yes") / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = tiny[1].tokenizer
    answer = tokenizer("Yes", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    config = json.loads((folder / "generation_config.json").read_text())
    config["sequence_bias"] = [[answer[: k + 1], 100.0 * (k + 1)] for k in range(len(answer))]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def lmms_eval(hub, checkpoint, out, *args, launcher=(sys.executable,)):
    """lmms-eval's command line on pope and mme; returns its results.json, its logged samples by task and
    doc_id, and its output (stdout and stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["HF_DATASETS_CACHE"] = str(out / "datasets")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = ["-m", "lmms_eval", "--model", "aki", "--model_args", f"pretrained={checkpoint}", "--tasks", "pope,mme"]
    done = subprocess.run(
        [*launcher, *command, "--output_path", str(out), "--log_samples", *args],
        cwd=hub, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    # lmms-eval exits 0 when the evaluation fails; only the results file says it finished.
    results = list(out.glob("*/*_results.json"))
    assert done.returncode == 0 and len(results) == 1, done.stdout[-4000:]
    samples = {}
    for task in ("pope", "mme"):
        (path,) = out.glob(f"*/*_samples_{task}.jsonl")
        samples[task] = {sample["doc_id"]: sample for sample in map(json.loads, path.read_text().splitlines())}
    return json.loads(results[0].read_text()), samples, done.stdout


def answers(samples) -> dict:
    return {task: {doc_id: s["filtered_resps"] for doc_id, s in by_id.items()} for task, by_id in samples.items()}


def test_lmms_eval_finds_the_aki_model():
    from lmms_eval.models import get_model

    assert get_model("aki") is AkiLmms
    assert [lmms_eval_adapter.batch_size_of(v) for v in (2, "2", "auto", "auto:4")] == [2, 2, 8, 8]
    with pytest.raises(ValueError, match="batch_size must be an integer, 'auto' or 'auto:N'; got 'big'"):
        lmms_eval_adapter.batch_size_of("big")
    assert lmms_eval_adapter.sampling_of({"temperature": 0, "do_sample": False}) == {"do_sample": False}
    assert lmms_eval_adapter.sampling_of({"do_sample": True}) == {"do_sample": True, "temperature": 1.0}
    assert lmms_eval_adapter.sampling_of({"temperature": 0.5, "top_p": 0.9}) == {
        "do_sample": True, "temperature": 0.5, "top_p": 0.9,
    }  # fmt: skip


def test_pope_and_mme_scores_reach_lmms_eval_metrics(hub, yes_checkpoint, tmp_path):
    """A model that answers "Yes" to everything: lmms-eval's own pope and mme code score it."""
    results, samples, output = lmms_eval(hub[0], yes_checkpoint, tmp_path, "--batch_size", "auto")
    assert results["config"]["batch_size"] == "auto"
    assert answers(samples) == {"pope": dict.fromkeys(range(4), "Yes"), "mme": dict.fromkeys(range(6), "Yes")}
    pope, mme = results["results"]["pope"], results["results"]["mme"]
    # Three of four POPE truths are "yes": precision 3/4, recall 1, F1 6/7.
    assert {metric: pope[f"pope_{metric},none"] for metric in ("accuracy", "precision", "recall", "yes_ratio")} == {
        "accuracy": 0.75, "precision": 0.75, "recall": 1.0, "yes_ratio": 0.75,
    }  # fmt: skip
    assert pope["pope_f1_score,none"] == pytest.approx(6 / 7)
    # MME per image: accuracy 50 + accuracy+ 0; summed over categories (color and count, code_reasoning).
    assert (mme["mme_perception_score,none"], mme["mme_cognition_score,none"]) == (100.0, 50.0)
    # Both tasks set num_beams, which aki does not honour: one warning.
    assert output.count("aki ignores the generation settings ['num_beams']") == 1


@pytest.fixture(scope="module")
def greedy_run(hub, tiny_checkpoint, tmp_path_factory):
    """The tiny model, greedy, six new tokens, on one process."""
    out = tmp_path_factory.mktemp("greedy")
    return lmms_eval(hub[0], tiny_checkpoint, out, "--batch_size", "auto:2", "--gen_kwargs", "max_new_tokens=6")


def test_lmms_eval_answers_are_aki_answers(hub, tiny_checkpoint, greedy_run):
    """What lmms-eval logs is what aki answers to its prompt and the document's image."""
    _, samples, _ = greedy_run
    predictor = Predictor(str(tiny_checkpoint))
    for task, images in hub[1].items():
        ids = sorted(samples[task])
        assert ids == list(range(len(images)))
        contents = [[{"type": "image"}, {"type": "text", "text": samples[task][i]["input"]}] for i in ids]
        expected = [cut_at(text, ["\n\n"]) for text in predictor.generate(contents, images, max_new_tokens=6)]
        assert [samples[task][i]["filtered_resps"] for i in ids] == expected


def test_two_processes_under_accelerate_launch_equal_one(hub, tiny_checkpoint, greedy_run, tmp_path):
    """`accelerate launch` with two CPU processes (gloo): each answers its share, and lmms-eval's results
    equal the one-process run's (which batched its questions; these come one at a time)."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    results, samples, output = lmms_eval(
        hub[0], tiny_checkpoint, tmp_path, "--batch_size", "1", "--gen_kwargs", "max_new_tokens=6", launcher=launcher
    )
    assert "Running on rank 1 (local rank 1)" in output
    # The progress bar is rank 0's: 5 of the 10 questions.
    assert set(re.findall(r"aki: 100%\|[^|]*\| (\d+)/", output)) == {"5"}
    one_results, one_samples, _ = greedy_run
    assert answers(samples) == answers(one_samples)
    assert results["results"] == one_results["results"]


def test_gen_kwargs_temperature_and_do_sample_sample(hub, tiny_checkpoint, greedy_run, tmp_path):
    _, samples, _ = lmms_eval(
        hub[0], tiny_checkpoint, tmp_path, "--gen_kwargs", "temperature=1.0,do_sample=True,max_new_tokens=6"
    )
    greedy, sampled = answers(greedy_run[1]), answers(samples)
    assert sampled.keys() == greedy.keys() and sampled != greedy


def test_generate_until_in_process(tiny_checkpoint, images, caplog):
    """lmms-eval's requests built by hand: a document without an image, batching, seeded sampling, and one
    warning for the settings aki ignores."""
    model = AkiLmms(pretrained=str(tiny_checkpoint), batch_size="auto:2")
    assert (model.rank, model.world_size, model.batch_size) == (0, 1, 8)
    model.task_dict = {"pope": {"test": {0: {"image": images[0]}, 1: {"image": images[1]}, 2: {"image": None}}}}

    def visual(doc):
        return [doc["image"]]

    def requests(gen_kwargs, n):
        return [
            Instance("generate_until", (f"Question {i}?", gen_kwargs, visual, i, "pope", "test"), i,
                     {"task": "pope", "doc_id": i, "repeats": 1})
            for i in range(n)
        ]  # fmt: skip

    greedy = requests({"max_new_tokens": 4, "until": ["\n\n"]}, 3)
    batched = model.generate_until(greedy)
    assert len(batched) == 3 and all(isinstance(answer, str) for answer in batched)
    model.batch_size = 2
    assert model.generate_until(greedy[1:2]) == batched[1:2]  # batching does not change an answer

    # temperature > 0 samples (seeded runs repeat); unknown settings are ignored with one warning.
    sampled = requests({"max_new_tokens": 6, "temperature": 5.0, "top_p": 1.0, "num_beams": 3, "length_penalty": 2}, 2)
    with caplog.at_level("WARNING", logger="aki.eval.lmms"):
        torch.manual_seed(0)
        first = model.generate_until(sampled)
        torch.manual_seed(0)
        again = model.generate_until(sampled)
    assert first == again
    torch.manual_seed(1)
    assert model.generate_until(sampled) != first  # sampled, not greedy
    warnings = [r.message for r in caplog.records if "ignores" in r.message]
    assert warnings == ["aki ignores the generation settings ['length_penalty', 'num_beams'] (it honours "
                        "['do_sample', 'max_new_tokens', 'temperature', 'top_p', 'until'])."]  # fmt: skip
