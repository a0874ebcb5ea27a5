"""A checkpoint written by the official AKI code converts and gives that code's logits and greedy tokens.

`tests/reference/official_golden/` was made by `tests/reference/make_official_golden.py`, which runs
the official `AKI` class (github.com/sony/aki, transformers 4.41.2): the checkpoint folder is what
that class saves, and `outputs.safetensors` holds what it computed from the folder. Shape legend:
b batch, s sequence (images expanded), c kept logit columns.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import aki
from aki.convert_official import ConversionError, convert

GOLDEN = Path(__file__).parent / "reference" / "official_golden"
IMAGE_ID = 32012
CASES = ("sft", "caption", "generate")


def convert_golden(checkpoint: Path, out: Path, **kwargs) -> aki.AkiConfig:
    vision, text = GOLDEN / "siglip_vision_config.json", GOLDEN / "phi3_config.json"
    return convert(checkpoint, out, vision_config=vision, text_config=text, **kwargs)


@pytest.fixture(scope="module")
def golden():
    """The official code's outputs (tensors) and what produced them (texts, versions)."""
    return load_file(str(GOLDEN / "outputs.safetensors")), json.loads((GOLDEN / "outputs.json").read_text())


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native")
    convert_golden(GOLDEN / "checkpoint", out)
    return out


def load(folder: Path, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(folder, **kwargs).eval()


@pytest.fixture(scope="module")
def eager(native):
    """The converted model with the official run's attention arithmetic."""
    return load(native, attn_implementation="eager")


@pytest.fixture(scope="module")
def default(native):
    """The converted model as a user loads it (SDPA)."""
    return load(native)


def official_inputs(tensors, name: str, num_image_tokens: int) -> dict[str, torch.Tensor]:
    """The official run's ids with each <image> repeated `num_image_tokens` times, its mask and pixels."""
    ids, mask = tensors[f"{name}.input_ids"], tensors.get(f"{name}.attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    repeats = torch.where(ids == IMAGE_ID, num_image_tokens, 1)
    rows = [(i.repeat_interleave(r), m.repeat_interleave(r)) for i, m, r in zip(ids, mask, repeats, strict=True)]
    return {
        "input_ids": torch.stack([row for row, _ in rows]),
        "attention_mask": torch.stack([row for _, row in rows]),
        "pixel_values": tensors["pixel_values"][: ids.shape[0]],
    }


def assert_logits_match(logits: torch.Tensor, tensors, name: str, valid: torch.Tensor, atol: float) -> None:
    """Compare (b, s, 32014) logits on the valid positions with the official summaries: the kept
    columns, and over the full vocabulary the logsumexp, the max and our score of the official argmax."""
    best_official = logits.gather(-1, tensors[f"{name}.argmax"][..., None])[..., 0]
    ours = {
        "logits": logits[..., tensors["logit_columns"]],
        "logsumexp": logits.logsumexp(-1),
        "max": logits.amax(-1),
        "argmax score": best_official,
    }
    for key, value in ours.items():
        expected = tensors[f"{name}.max" if key == "argmax score" else f"{name}.{key}"]
        error = (value[valid] - expected[valid]).abs().max().item()
        assert error <= atol, f"{name} {key}: max abs error {error:.2e} > {atol:.0e}"


def test_golden_checkpoint_is_the_official_layout(golden):
    _, record = golden
    assert record["official_class"].endswith("modeling_aki.py:AKI") and record["versions"]["transformers"] == "4.41.2"
    config = json.loads((GOLDEN / "checkpoint" / "config.json").read_text())
    assert config["initial_tokenizer_len"] == 32012 and config["pad_token_id"] == 32011
    shapes = {key: tensor.shape for key, tensor in load_file(str(GOLDEN / "checkpoint" / "model.safetensors")).items()}
    # The keys that broke the conversion of the published AKI-4B: the decoupled head's two biases.
    assert shapes["lang_model.lm_head.bias"] == (32064,) and shapes["lang_model.lm_head.additional_fc.bias"] == (2,)
    assert shapes["lang_model.lm_head.weight"][0] == 32064


def test_converted_folder_is_a_native_checkpoint(native, default, golden):
    _, record = golden
    model, processor = default, AutoProcessor.from_pretrained(native)
    assert isinstance(model, aki.AkiForConditionalGeneration) and isinstance(processor, aki.AkiProcessor)
    config = model.config
    assert config.text_config.vocab_size == 32014 and config.lm_head_bias
    assert config.image_token_id == IMAGE_ID and config.assistant_marker_ids == [32001]
    assert config.num_image_tokens == record["num_vision_tokens"]
    official = load_file(str(GOLDEN / "checkpoint" / "model.safetensors"))
    merged = torch.cat([official["lang_model.lm_head.bias"][:32012], official["lang_model.lm_head.additional_fc.bias"]])
    assert torch.equal(model.lm_head.bias, merged)
    assert processor.image_processor.size == {"height": 32, "width": 32}  # config.json's n_px
    assert list(processor.image_processor.image_mean) == list(processor.image_processor.image_std) == [0.5] * 3
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<image>", "<|endofchunk|>"]) == [32011, 32012, 32013]
    generation = json.loads((native / "generation_config.json").read_text())
    # The official generate stops where Phi-3.5's generation config says: <|end|>, <|assistant|>, <|endoftext|>.
    assert generation["eos_token_id"] == record["eos_token_id"] == [32007, 32001, 32000]
    assert generation["pad_token_id"] == 32011


@pytest.mark.parametrize("name", CASES)
def test_processor_writes_the_official_ids(native, golden, name):
    tensors, record = golden
    processor = AutoProcessor.from_pretrained(native)
    processor.tokenizer.padding_side = "right"
    texts = record["texts"][name]
    blank = [np.zeros((32, 32, 3), dtype=np.uint8)] * len(texts)
    ours = processor(text=texts, images=blank, padding=True, return_tensors="pt")
    expected = official_inputs(tensors, name, record["num_vision_tokens"])
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])


def test_chat_template_renders_the_official_prompts(native, golden):
    _, record = golden
    processor = AutoProcessor.from_pretrained(native)

    def user(question):
        return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}

    def ids(text):
        return processor(text=text, images=np.zeros((32, 32, 3), dtype=np.uint8))["input_ids"]

    # The official code left the BOS to its tokenizer; our template writes it and the processor adds none:
    # the same text after the BOS, the same ids.
    bos = processor.tokenizer.bos_token
    sft = [user("What is in the image?"), {"role": "assistant", "content": "A red square."}]
    rendered = processor.apply_chat_template(sft, tokenize=False)
    assert rendered == bos + record["texts"]["sft"][0]
    assert ids(rendered) == ids(record["texts"]["sft"][0])
    prompt = processor.apply_chat_template([user("Describe the image.")], add_generation_prompt=True, tokenize=False)
    assert prompt == bos + record["texts"]["generate"][0]
    assert ids(prompt) == ids(record["texts"]["generate"][0])


@pytest.mark.parametrize("name", CASES)
def test_logits_match_the_official_code(eager, golden, name):
    """Same attention arithmetic as the official run (eager): equal to float32 rounding."""
    tensors, record = golden
    model = eager
    inputs = official_inputs(tensors, name, record["num_vision_tokens"])
    if name != "caption":
        assert (model.model.window_ids(inputs["input_ids"]) > 0).any()  # MMA opens a window
    with torch.no_grad():
        logits = model(**inputs).logits
    assert_logits_match(logits, tensors, name, inputs["attention_mask"].bool(), atol=1e-5)


def test_sft_loss_matches_the_official_code(eager, golden):
    """The official labels (nothing through the first <|assistant|>), image tokens ignored as the
    official forward ignores them: the same loss, which takes the head's bias in."""
    tensors, record = golden
    inputs = official_inputs(tensors, "sft", record["num_vision_tokens"])
    repeats = torch.where(tensors["sft.input_ids"] == IMAGE_ID, record["num_vision_tokens"], 1)
    labels = torch.stack([row.repeat_interleave(r) for row, r in zip(tensors["sft.labels"], repeats, strict=True)])
    assert (labels[inputs["input_ids"] == IMAGE_ID] == -100).all()
    with torch.no_grad():
        loss = eager(**inputs, labels=labels).loss
    assert abs(loss.item() - tensors["sft.loss"].item()) <= 1e-5


def test_logits_match_with_the_default_attention(default, golden):
    """SDPA sums in another order than the official eager attention: equal to 1e-4 (measured 1.0e-5)."""
    tensors, record = golden
    model = default
    inputs = official_inputs(tensors, "sft", record["num_vision_tokens"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert_logits_match(logits, tensors, "sft", inputs["attention_mask"].bool(), atol=1e-4)


def test_greedy_generation_matches_the_official_generate(default, golden):
    tensors, record = golden
    model = default
    inputs = official_inputs(tensors, "generate", record["num_vision_tokens"])
    generated = model.generate(**inputs, max_new_tokens=record["max_new_tokens"], do_sample=False)
    expected = tensors["generate.tokens"]
    assert expected.shape[1] > 0
    assert generated[:, inputs["input_ids"].shape[1] :].tolist() == expected.tolist()


def test_the_golden_outputs_see_the_head_bias_and_the_window(native, golden):
    """Without the head's bias, or without MMA's window, the logits leave the official ones: the
    comparison above would catch either mistake."""
    tensors, record = golden
    inputs = official_inputs(tensors, "sft", record["num_vision_tokens"])
    valid = inputs["attention_mask"].bool()
    no_bias = load(native, attn_implementation="eager")
    no_bias.lm_head.bias.data.zero_()
    causal = load(native, attn_implementation="eager", attention_policy="causal")
    for model, least in ((no_bias, 0.1), (causal, 0.05)):  # measured 0.33 and 0.27
        with torch.no_grad():
            logits = model(**inputs).logits[..., tensors["logit_columns"]]
        assert (logits[valid] - tensors["sft.logits"][valid]).abs().max() > least


def test_head_bias_is_saved_loaded_and_trained(default, tmp_path, golden):
    tensors, record = golden
    model = default
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert reloaded.config.lm_head_bias and torch.equal(reloaded.lm_head.bias, model.lm_head.bias)
    inputs = official_inputs(tensors, "caption", record["num_vision_tokens"])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_ID, -100)
    reloaded.train()
    reloaded(**inputs, labels=labels).loss.backward()
    assert reloaded.lm_head.bias.grad is not None and reloaded.lm_head.bias.grad.abs().sum() > 0


def test_bfloat16_conversion(tmp_path):
    config = convert_golden(GOLDEN / "checkpoint", tmp_path, dtype="bfloat16")
    assert config.dtype in ("bfloat16", torch.bfloat16)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.bias" in weights
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())


def test_sharded_output_loads(tmp_path, default, golden):
    tensors, record = golden
    convert_golden(GOLDEN / "checkpoint", tmp_path, max_shard_size_gb=0.001)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    inputs = official_inputs(tensors, "caption", record["num_vision_tokens"])
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(**inputs).logits, default(**inputs).logits)


def rewrite_official(tmp_path: Path, edit) -> Path:
    """A copy of the official checkpoint whose tensors went through `edit(dict)`."""
    copy = tmp_path / "edited"
    shutil.copytree(GOLDEN / "checkpoint", copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


def test_a_head_without_bias_converts_to_a_head_without_bias(tmp_path):
    def drop_biases(tensors):
        del tensors["lang_model.lm_head.bias"], tensors["lang_model.lm_head.additional_fc.bias"]

    config = convert_golden(rewrite_official(tmp_path, drop_biases), tmp_path / "out")
    assert not config.lm_head_bias
    assert load(tmp_path / "out").lm_head.bias is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("vision_tokenizer.layers.1.0.to_kv.weight"),
            "missing: vision_tokenizer.layers.1.0.to_kv.weight",
        ),
        (
            lambda t: t.pop("lang_model.lm_head.additional_fc.bias"),
            "missing: lang_model.lm_head.additional_fc.bias",
        ),
        (
            lambda t: t.pop("lang_model.lm_head.bias"),
            "unexpected: lang_model.lm_head.additional_fc.bias",
        ),
        (
            lambda t: t.update({"lang_model.model.extra.weight": torch.zeros(2)}),
            "unexpected: lang_model.model.extra.weight",
        ),
        (
            lambda t: t.update({"lang_model.model.norm.weight": torch.zeros(31)}),
            r"lang_model.model.norm.weight: \[\(31,\)\] cannot give model.language_model.norm.weight of shape \(8,\)",
        ),
        (
            lambda t: t.update({"lang_model.lm_head.additional_fc.bias": torch.zeros(3)}),
            r"lang_model.lm_head.bias \+ lang_model.lm_head.additional_fc.bias: \[\(32064,\), \(3,\)\] "
            r"cannot give lm_head.bias of shape \(32014,\)",
        ),
    ],
    ids=["missing", "missing-added-bias", "added-bias-alone", "unexpected", "wrong-shape", "wrong-bias-shape"],
)
def test_mismatched_checkpoints_are_refused_with_the_key(tmp_path, edit, message):
    with pytest.raises(ConversionError, match=message):
        convert_golden(rewrite_official(tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
