"""Converting a checkpoint in the official layout gives the official model's logits."""

import json

import pytest
import torch
from helpers import chat
from reference.official_aki import IMAGE_ID, OfficialAKI
from reference.phi_tokenizer import phi_like_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import aki
from aki.convert_official import ConversionError, convert

OFFICIAL_CONFIG = {
    "vision_encoder_path": "google/siglip-so400m-patch14-384",
    "lang_model_path": "microsoft/Phi-3.5-mini-instruct",
    "pad_token_id": 32011,
    "initial_tokenizer_len": 32012,
    "num_vision_tokens": 4,
    "n_px": 32,
    "norm_mean": 0.5,
    "norm_std": 0.5,
}
VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
TEXT = {
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "original_max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "tie_word_embeddings": False,
}
PERCEIVER = {"depth": 2, "heads": 2, "ff_mult": 2}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A random checkpoint in the official layout, and the reference model that made it."""
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    reference = OfficialAKI(OFFICIAL_CONFIG, VISION, TEXT, PERCEIVER).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    (folder / "vision_config.json").write_text(json.dumps(VISION))
    (folder / "text_config.json").write_text(json.dumps(TEXT))
    phi_like_tokenizer().save_pretrained(folder)
    return folder, reference


def convert_folder(folder, out):
    return convert(folder, out, vision_config=folder / "vision_config.json", text_config=folder / "text_config.json")


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    folder, _ = official
    out = tmp_path_factory.mktemp("native")
    convert_folder(folder, out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    return model, AutoProcessor.from_pretrained(out), out


def official_ids(processor, texts):
    """The official tokenisation: one <image> token per image, BOS added, right padding."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_converted_folder_is_a_native_checkpoint(converted):
    model, processor, out = converted
    assert isinstance(model, aki.AkiForConditionalGeneration) and isinstance(processor, aki.AkiProcessor)
    assert model.config.text_config.vocab_size == 32014 and model.lm_head.weight.shape[0] == 32014
    assert model.config.image_token_id == 32012 and model.config.assistant_marker_ids == [32001]
    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<image>", "<|endofchunk|>")] == [32011, 32012, 32013]
    assert tokenizer.pad_token_id == 32011
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 32000 and generation["pad_token_id"] == 32011


def test_single_image_question_answer_matches_the_reference(official, converted, images):
    _, reference = official
    model, processor, _ = converted
    text = processor.apply_chat_template(chat("What is in the image?", "An astronaut."), tokenize=False)
    ours = processor(images=images[:1], text=text, return_tensors="pt")
    theirs = official_ids(processor, [text])
    # The processor's ids are the official ones with <image> expanded to the resampler's tokens.
    expanded = [[t] * 4 if t == IMAGE_ID else [t] for t in theirs["input_ids"][0].tolist()]
    assert ours["input_ids"][0].tolist() == [t for group in expanded for t in group]
    assert (model.model.window_ids(ours["input_ids"]) > 0).any()  # MMA is active
    with torch.no_grad():
        expected = reference(theirs["input_ids"], ours["pixel_values"])
        actual = model(**ours).logits
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def test_caption_is_causal_and_matches_the_reference(official, converted, images):
    _, reference = official
    model, processor, _ = converted
    text = "<image>An astronaut in a white suit.<|endofchunk|><|endoftext|>"
    ours = processor(images=images[:1], text=text, return_tensors="pt")
    assert not (model.model.window_ids(ours["input_ids"]) != 0).any()
    with torch.no_grad():
        expected = reference(official_ids(processor, [text])["input_ids"], ours["pixel_values"])
        assert torch.allclose(model(**ours).logits, expected, atol=1e-5)


def test_padded_batch_matches_the_reference(official, converted, images):
    _, reference = official
    model, processor, _ = converted
    texts = [
        processor.apply_chat_template(chat("What is in the image?", "An astronaut."), tokenize=False),
        processor.apply_chat_template(chat("Is this a cat? Answer yes or no.", "Yes."), tokenize=False),
    ]
    processor.tokenizer.padding_side = "right"
    ours = processor(images=images, text=texts, padding=True, return_tensors="pt")
    theirs = official_ids(processor, texts)
    assert (theirs["attention_mask"] == 0).any()
    with torch.no_grad():
        expected = reference(theirs["input_ids"], ours["pixel_values"], theirs["attention_mask"])
        actual = model(**ours).logits
    valid = ours["attention_mask"].bool()
    assert torch.allclose(actual[valid], expected[valid], atol=1e-5)


def test_greedy_generation_matches_the_reference_token_for_token(official, converted, images):
    _, reference = official
    model, processor, _ = converted
    prompt = processor.apply_chat_template(chat("Describe the image."), add_generation_prompt=True, tokenize=False)
    ours = processor(images=images[:1], text=prompt, return_tensors="pt")
    expected = reference.greedy(official_ids(processor, [prompt])["input_ids"], ours["pixel_values"], 20)
    generated = model.generate(**ours, max_new_tokens=20, do_sample=False)[:, ours["input_ids"].shape[1] :]
    assert generated.shape[1] == expected.shape[1] > 0
    assert torch.equal(generated, expected)


def test_bfloat16_conversion(official, tmp_path):
    folder, _ = official
    config = convert(folder, tmp_path, folder / "vision_config.json", folder / "text_config.json", dtype="bfloat16")
    assert config.dtype in ("bfloat16", torch.bfloat16)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())


def test_sharded_output_loads(official, tmp_path, converted, images):
    folder, _ = official
    convert(folder, tmp_path, folder / "vision_config.json", folder / "text_config.json", max_shard_size_gb=0.002)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, processor, _ = converted
    inputs = processor(images=images[:1], text="<image>A cat.", return_tensors="pt")
    with torch.no_grad():
        sharded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
        assert torch.equal(sharded(**inputs).logits, model(**inputs).logits)


def rewrite_official(folder, tmp_path, edit):
    """A copy of the official folder whose tensors went through `edit(dict)`."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            (copy / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("vision_tokenizer.layers.1.0.to_kv.weight"),
            "missing: vision_tokenizer.layers.1.0.to_kv.weight",
        ),
        (
            lambda t: t.update({"lang_model.model.extra.weight": torch.zeros(2)}),
            "unexpected: lang_model.model.extra.weight",
        ),
        (
            lambda t: t.update({"lang_model.model.norm.weight": torch.zeros(31)}),
            r"lang_model.model.norm.weight: \[\(31,\)\] cannot give model.language_model.norm.weight",
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_mismatched_checkpoints_are_refused_with_the_key(official, tmp_path, edit, message):
    folder, _ = official
    edited = rewrite_official(folder, tmp_path, edit)
    with pytest.raises(ConversionError, match=message):
        convert_folder(edited, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
