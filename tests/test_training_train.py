"""End-to-end training runs on CPU: loss goes down, launchers agree, a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from aki_demo.shapes import write_llava_json
from aki_training.config import load_config
from aki_training.train import free_port, loss_sum, predicting_positions, train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(config, tmp_path, name, **overrides):
    cfg = load_config(ROOT / "configs" / config, {"output_dir": str(tmp_path / name), **overrides})
    return train(cfg), tmp_path / name


def losses(folder: Path) -> dict[int, float]:
    rows = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[record["step"]] = record["loss"]
    return rows


def launch(command: list[str], tmp_path: Path, name: str, *sets: str) -> subprocess.Popen:
    overrides = [f"output_dir={tmp_path / name}", *sets]
    arguments = [
        *command,
        str(ROOT / "training" / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny_pretrain.yaml"),
    ]
    for item in overrides:
        arguments += ["--set", item]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        arguments, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def test_tiny_pretraining_lowers_the_loss_and_exports(tmp_path):
    summary, folder = run("tiny_pretrain.yaml", tmp_path, "pretrain", max_steps=30, save_every=0)
    curve = losses(folder)
    assert len(curve) == 30
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (28, 29, 30)) / 3
    assert last < 0.7 * first, (first, last)
    assert (folder / "loss_curve.png").stat().st_size > 0 and (folder / "tensorboard").is_dir()
    report = json.loads((folder / "data_report.json").read_text())
    assert report["skipped"] == {} and report["step"] == 30
    model = AutoModelForImageTextToText.from_pretrained(folder / "final")
    assert model.config.attention_policy == "causal"  # pre-training is causal


def test_sft_on_a_mixture_from_the_pretraining_export(tmp_path):
    _, pretrained = run("tiny_pretrain.yaml", tmp_path, "pretrain", max_steps=5, save_every=0)
    llava = write_llava_json(tmp_path / "llava", size=16)
    data = [
        {"kind": "python", "path": "aki_demo.shapes:ShapesSource", "size": 64, "weight": 0.7},
        {"kind": "llava_json", "path": str(llava), "image_root": str(tmp_path / "llava"), "weight": 0.3},
    ]
    overrides = {"model.pretrained": str(pretrained / "final"), "data": data, "max_steps": 8, "save_every": 0}
    summary, folder = run("tiny_sft.yaml", tmp_path, "sft", **overrides)
    assert summary.skipped == {} and len(losses(folder)) == 8
    model = AutoModelForImageTextToText.from_pretrained(folder / "final")
    assert model.config.attention_policy == "mma"
    vision = AutoModelForImageTextToText.from_pretrained(pretrained / "final").model.vision_tower
    for name, tensor in model.model.vision_tower.state_dict().items():  # frozen by default
        assert torch.equal(tensor, vision.state_dict()[name]), name


def test_deepspeed_zero2_on_two_processes_matches_one_process(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    del deepspeed
    process = launch(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
        tmp_path, "zero2", "max_steps=6", "micro_batch_size=4", "save_every=0",
        f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
    )  # fmt: skip
    finish(process)
    _, single = run("tiny_pretrain.yaml", tmp_path, "single", max_steps=6, micro_batch_size=8, save_every=0)
    two, one = losses(tmp_path / "zero2"), losses(single)
    assert two.keys() == one.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "zero2" / "final") is not None


def test_torchrun_two_processes_match_one_process(tmp_path):
    process = launch(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
        tmp_path, "ddp", "max_steps=4", "micro_batch_size=4", "gradient_accumulation_steps=2", "save_every=0",
    )  # fmt: skip
    finish(process)
    _, single = run("tiny_pretrain.yaml", tmp_path, "single", max_steps=4, micro_batch_size=16, save_every=0)
    two, one = losses(tmp_path / "ddp"), losses(single)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


def test_a_killed_run_resumes_on_the_same_loss_curve(tmp_path):
    schedule = ["max_steps=400", "save_every=5"]
    process = launch([sys.executable], tmp_path, "killed", *schedule)
    pointer = tmp_path / "killed" / "checkpoints" / "latest_step"
    deadline = time.time() + 300
    while not pointer.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    checkpoint_step = int(pointer.read_text().removeprefix("step_"))
    assert 5 <= checkpoint_step < 400, "the run ended before it could be killed"

    _, baseline = run(
        "tiny_pretrain.yaml", tmp_path, "baseline", max_steps=400, save_every=5, stop_after=checkpoint_step + 10
    )
    summary, resumed = run(
        "tiny_pretrain.yaml", tmp_path, "killed", max_steps=400, save_every=5, stop_after=checkpoint_step + 10
    )
    assert summary.export is None  # stopped at stop_after, before the export
    expected, actual = losses(baseline), losses(resumed)
    assert actual.keys() == expected.keys()
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_lora_with_gradient_checkpointing_exports_a_merged_model(tmp_path):
    pytest.importorskip("peft")
    overrides = {"max_steps": 3, "save_every": 0, "model.trainable": "lora", "model.lora_rank": 4}
    _, folder = run("tiny_pretrain.yaml", tmp_path, "lora", **overrides, **{"model.gradient_checkpointing": True})
    from aki.presets import build_tiny

    base, _ = build_tiny("tiny", seed=42)
    model = AutoModelForImageTextToText.from_pretrained(folder / "final")
    state, base_state = model.state_dict(), base.state_dict()
    assert state.keys() == base_state.keys()  # merged: no adapter weights left
    name = "model.language_model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(state[name], base_state[name])  # the LoRA update was merged in
    assert torch.equal(
        state["model.vision_tower.post_layernorm.weight"], base_state["model.vision_tower.post_layernorm.weight"]
    )


def test_the_new_parts_learn_at_their_own_rate(tmp_path):
    """optim.new_parts_lr: the connector and vision tower move at that rate, the language model at optim.lr."""
    from aki.presets import build_tiny

    base = build_tiny("tiny", seed=42)[0].state_dict()
    rates = {"optim.lr": 1e-9, "optim.min_lr": 1e-10, "optim.warmup_steps": 0, "optim.new_parts_lr": 1e-2}
    _, folder = run(
        "tiny_pretrain.yaml", tmp_path, "grouped", max_steps=2, save_every=0, **{"model.trainable": "all"}, **rates
    )
    state = AutoModelForImageTextToText.from_pretrained(folder / "final").state_dict()
    moved = {name: float((state[name] - base[name]).abs().max()) for name in base}
    connector = [name for name in moved if ".connector." in name and name.endswith("weight")]
    assert connector and min(moved[name] for name in connector) > 1e-3
    assert moved["model.vision_tower.embeddings.patch_embedding.weight"] > 1e-3
    language = [name for name in moved if ".language_model." in name]
    assert language and max(moved[name] for name in language) < 1e-6


def test_the_lm_head_on_the_answer_positions_gives_the_full_loss():
    """Training keeps only the logits that predict a supervised token; the loss and its gradient are
    those of the full logits."""
    from helpers import chat
    from PIL import Image

    from aki.presets import build_tiny
    from aki_training.encode import collate, encode_conversation

    model, processor = build_tiny()
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    samples = [
        encode_conversation(processor, chat("What colour is it?", "Red."), images[:1], 256),
        encode_conversation(processor, chat("And this one, which colour?", "It is blue."), images[1:], 256),
    ]
    batch = collate(samples, processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    positions = predicting_positions(labels)
    assert 0 < len(positions) < labels.shape[1] // 2  # the answers, not the prompts
    full = model(**batch).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(
        full.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    kept = loss_sum(model(**batch, logits_to_keep=positions), labels, positions)
    torch.testing.assert_close(kept, expected)
    expected_grad = torch.autograd.grad(expected, model.lm_head.weight)[0]
    torch.testing.assert_close(torch.autograd.grad(kept, model.lm_head.weight)[0], expected_grad)


def test_packed_batches_give_the_same_losses_as_padded_ones(tmp_path):
    common = {"model.pretrained": None, "model.preset": "tiny", "max_steps": 3, "save_every": 0, "max_length": 400}
    _, padded = run("tiny_sft.yaml", tmp_path, "padded", **common)
    _, packed = run("tiny_sft.yaml", tmp_path, "packed", packing=True, **common)
    expected, actual = losses(padded), losses(packed)
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.parametrize("packing", [False, True])
def test_the_split_attention_path_trains_on_the_same_losses(tmp_path, packing):
    common = {"model.pretrained": None, "model.preset": "tiny", "max_steps": 3, "save_every": 0, "packing": packing}
    _, sdpa = run("tiny_sft.yaml", tmp_path, "sdpa", **{"model.attn_implementation": "sdpa"}, **common)
    _, split = run("tiny_sft.yaml", tmp_path, "split", **{"model.attn_implementation": "aki_split"}, **common)
    expected, actual = losses(sdpa), losses(split)
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step
    with pytest.raises(ValueError, match="no_such_attention"):  # the setting is applied, not ignored
        run("tiny_sft.yaml", tmp_path, "bad", **{"model.attn_implementation": "no_such_attention"}, **common)


def test_deepspeed_checkpoint_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    zero2 = f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"
    finish(launch([sys.executable], tmp_path, "ds", "max_steps=6", "save_every=3", "stop_after=3", zero2))
    output = finish(launch([sys.executable], tmp_path, "ds", "max_steps=6", "save_every=3", zero2))
    assert "resumed from" in output
    _, single = run("tiny_pretrain.yaml", tmp_path, "single", max_steps=6, save_every=0)
    resumed, expected = losses(tmp_path / "ds"), losses(single)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_a_pretrained_language_model_gets_the_presets_vision_tower_and_connector(tmp_path):
    from helpers import save_tiny_qwen2

    from aki_training.train import build_model

    save_tiny_qwen2(tmp_path / "qwen2")
    language = {"output_dir": str(tmp_path / "out"), "model.language_model": str(tmp_path / "qwen2")}
    model, processor = build_model(load_config(ROOT / "demo" / "configs" / "demo_lm_pretrain.yaml", language))
    config = model.config
    assert config.text_config.model_type == "qwen2" and config.attention_policy == "causal"
    assert config.vision_config.image_size == 48 and config.connector_type == "mlp" and config.num_image_tokens == 9
    assert processor.num_image_tokens == 9 and processor.image_processor.size["height"] == 48

    model, _ = build_model(load_config(ROOT / "configs" / "tiny_pretrain.yaml", language))
    assert model.config.connector_type == "perceiver" and model.config.perceiver_num_latents == 8  # the tiny preset's
    with pytest.raises(ValueError, match="needs a `language_model`"):
        build_model(load_config(ROOT / "configs" / "tiny_pretrain.yaml", {"model.vision_model": str(tmp_path)}))
    with pytest.raises(ValueError, match="text_config"):
        build_model(
            load_config(ROOT / "configs" / "tiny_pretrain.yaml", {**language, "model.overrides": {"text_config": {}}})
        )
