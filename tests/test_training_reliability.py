"""Training on bad data and bad folders: exact skip counts, malformed records counted, a run on
nothing refused, resume state that runs no pickled code, cut metrics lines, typed configs."""

import json
import pickle
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from aki_demo.shapes import write_llava_json
from aki_training.config import DataSource, load_config
from aki_training.data import TrainStream, build_source, sample_encoder
from aki_training.encode import Encoded, SampleError
from aki_training.train import train

ROOT = Path(__file__).resolve().parent.parent


class Numbers(list):
    pass


def every_third_is_bad(item, position):
    if item % 3 == 0:
        raise SampleError("bad_thing")
    return Encoded(input_ids=[item], labels=[item], pixel_values=None, notes={"seen": 1})


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_counts_through_the_dataloader_are_exact(workers):
    # A single source of 12 items read in 3 micro-batches of 4: every item exactly once.
    stream = TrainStream([Numbers(range(12))], [1.0], every_third_is_bad, 4, 0, seed=0)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    items = [next(loader) for _ in range(3)]
    assert sum(sum(item["skipped"].values()) for item in items) == 4  # 0, 3, 6, 9
    assert sum(item["notes"].get("seen", 0) for item in items) == 8


def write_bad_llava(folder: Path) -> tuple[Path, dict[str, int]]:
    """16 records: 8 good ones from `write_llava_json`, 8 broken in known ways; returns (path, expected skips)."""
    path = write_llava_json(folder, size=8)
    records = json.loads(path.read_text())
    good = records[0]

    def turns(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    broken = [
        {**good, "image": "missing_1.png"},
        {**good, "image": "missing_2.png"},
        {**good, "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {**good, "conversations": turns("<image>\nWhat?", 42)},
        {**good, "conversations": turns("<image>\nWhat?", "LATIN1")},  # a raw latin-1 byte, written below
        {**good, "conversations": turns("<image>\nWhat?", "SURROGATE")},  # "\ud800", escaped in the JSON
        {"image": good["image"], "conversation": good["conversations"]},  # misspelt field
        "not a record",
    ]
    text = json.dumps(records + broken).replace('"SURROGATE"', '"\\ud800"')
    path.write_bytes(text.encode().replace(b'"LATIN1"', b'"caf\xe9"'))
    expected = {"missing_image": 2, "no_assistant_turn": 1, "malformed_record": 5}
    return path, expected


def test_malformed_llava_records_are_counted_by_reason(tmp_path, tiny):
    _, processor = tiny
    path, expected = write_bad_llava(tmp_path / "llava")
    source = build_source(DataSource(kind="llava_json", path=str(path), image_root=str(tmp_path / "llava")), "sft", 0)
    stream = TrainStream([source], [1.0], sample_encoder("sft", processor, 512, 0), 4, 0, seed=0)
    items = [stream.build(step) for step in range(4)]  # 16 positions: every record once
    skipped = {}
    for item in items:
        for reason, count in item["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == expected
    assert sum(item["batch"]["input_ids"].shape[0] for item in items if item["batch"] is not None) == 8


def sft_run(tmp_path, name, data, **overrides):
    settings = {
        "output_dir": str(tmp_path / name), "model.pretrained": None, "model.preset": "tiny", "data": data,
        "micro_batch_size": 4, "save_every": 0, "max_length": 400, **overrides,
    }  # fmt: skip
    return train(load_config(ROOT / "configs" / "tiny_sft.yaml", settings)), tmp_path / name


def test_a_run_on_bad_records_reports_each_skip_once(tmp_path):
    path, expected = write_bad_llava(tmp_path / "llava")
    data = [{"kind": "llava_json", "path": str(path), "image_root": str(tmp_path / "llava")}]
    summary, folder = sft_run(tmp_path, "run", data, max_steps=4, num_workers=1)  # 16 positions
    assert summary.skipped == expected
    assert json.loads((folder / "data_report.json").read_text())["skipped"] == expected


def test_a_run_that_trains_on_nothing_fails_and_writes_its_report(tmp_path):
    path = write_llava_json(tmp_path / "llava", size=8)
    data = [{"kind": "llava_json", "path": str(path), "image_root": str(tmp_path / "elsewhere")}]
    with pytest.raises(RuntimeError, match="trained on no sample.*missing_image"):
        sft_run(tmp_path, "run", data, max_steps=2)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"] == {"missing_image": 8}
    assert not (tmp_path / "run" / "final").exists()


class Payload:
    """Unpickling this writes a file: code that a safe loader must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def pretrain_run(tmp_path, name, **overrides):
    settings = {"output_dir": str(tmp_path / name), "micro_batch_size": 2, "save_every": 1, **overrides}
    return train(load_config(ROOT / "configs" / "tiny_pretrain.yaml", settings)), tmp_path / name


def test_resuming_runs_no_pickled_code(tmp_path):
    _, folder = pretrain_run(tmp_path, "run", max_steps=3, stop_after=1)
    checkpoint = folder / "checkpoints" / "step_1"
    marker = tmp_path / "marker"
    for file in checkpoint.iterdir():
        if file.suffix in (".pt", ".bin", ".pkl"):
            file.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(Exception, match="step_1"):
        pretrain_run(tmp_path, "run", max_steps=3)
    assert not marker.exists()


def test_a_cut_metrics_line_does_not_break_later_runs(tmp_path):
    _, folder = pretrain_run(tmp_path, "run", max_steps=4, stop_after=2)
    with (folder / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "lo')  # killed mid-write
    summary, _ = pretrain_run(tmp_path, "run", max_steps=4)
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert summary.step == 4 and steps == [1, 2, 3, 4]
    assert (folder / "loss_curve.png").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_steps", "abc", "max_steps.*integer.*'abc'"),
        ("optim.lr", "fast", "optim.lr.*number.*'fast'"),
        ("optim.lr", "5e-3", r"optim.lr.*number.*'5e-3'.*write 5\.0e-03"),  # YAML 1.1 reads 5e-3 as text
        ("micro_batch_size", 2.5, "micro_batch_size.*integer.*2.5"),
        ("packing", "yes", "packing.*true or false"),
        ("model.pretrained", 3, "model.pretrained.*string"),
        ("data.0.weight", "heavy", r"data\[0\].weight.*number"),
        ("data.3.path", "x", r"data\.3.*1 item"),
        ("max_length", -5, "max_length.*positive"),
    ],
)
def test_config_values_are_type_checked_by_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "tiny_sft.yaml", {key: value})


def test_list_items_can_be_overridden_by_index():
    cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", {"data.0.path": "x", "data.0.size": 7})
    assert (cfg.data[0].path, cfg.data[0].size) == ("x", 7)
    cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", {"optim.lr": 1, "optim.betas": [0.9, 0.95]})
    assert cfg.optim.lr == 1.0 and cfg.optim.betas == (0.9, 0.95)


def test_a_missing_pretrained_folder_is_named(tmp_path):
    from aki_training.train import build_model

    cfg = load_config(
        ROOT / "configs" / "tiny_sft.yaml", {"output_dir": str(tmp_path), "model.pretrained": str(tmp_path / "nope")}
    )
    with pytest.raises(FileNotFoundError, match="model.pretrained.*nope"):
        build_model(cfg)


def test_resuming_a_deepspeed_run_runs_no_pickled_code(tmp_path):
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    def launch(*sets):
        command = [
            sys.executable,
            str(ROOT / "training" / "train.py"),
            "--config",
            str(ROOT / "configs" / "tiny_pretrain.yaml"),
        ]
        for item in (f"output_dir={tmp_path / 'ds'}", "max_steps=2", "save_every=1", "micro_batch_size=2",
                     f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}", *sets):  # fmt: skip
            command += ["--set", item]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)

    assert launch("stop_after=1").returncode == 0
    marker = tmp_path / "marker"
    optimiser_state = next((tmp_path / "ds" / "checkpoints" / "step_1").glob("*optim_states.pt"))
    optimiser_state.write_bytes(pickle.dumps({"state": Payload(marker)}))
    resumed = launch()
    assert resumed.returncode == 2 and "optim_states.pt holds more than tensors" in resumed.stderr, resumed.stderr[
        -2000:
    ]
    assert not marker.exists()
