"""The processor, the chat template, and the Auto-class round trips."""

import numpy as np
import pytest
import torch
from helpers import chat, encode
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from aki import AkiConfig, AkiForConditionalGeneration, AkiImageProcessor, AkiModel, AkiProcessor
from aki.processing_aki import AKI_SYSTEM_PROMPT

OFFICIAL_PROMPT = (
    "<|system|>\n" + AKI_SYSTEM_PROMPT + "<|end|>\n<|user|>\n<image>\nWhat is this?<|end|>\n<|assistant|>\n"
)


def test_chat_template_is_the_official_prompt(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(chat("What is this?"), add_generation_prompt=True, tokenize=False)
    # The official code left the BOS to its tokenizer; our template writes it (the processor then adds none).
    assert text == "<s>" + OFFICIAL_PROMPT
    with_answer = processor.apply_chat_template(chat("What is this?", "A cat."), tokenize=False)
    assert with_answer == "<s>" + OFFICIAL_PROMPT + "A cat.<|endoftext|>"


def test_processor_expands_images_and_prepends_bos(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat("What is this?", num_images=2), images)
    ids = inputs["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert (ids == model.config.image_token_id).sum() == 2 * model.config.num_image_tokens
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    # docs/checkpoint.md: mean 0.5, std 0.5 -> values in [-1, 1].
    assert inputs["pixel_values"].min() >= -1 and inputs["pixel_values"].max() <= 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_a_prompt_that_starts_with_an_image_gets_one_bos_first(preset, images):
    """The image never takes position 0 (the attention sink): a tokenizer that adds its BOS keeps one
    BOS, and `add_special_tokens=False` still means no special tokens at all."""
    from aki.presets import processor_from_preset

    processor = processor_from_preset(preset)
    bos, image = processor.tokenizer.bos_token_id, processor.image_token_id
    ids = processor(images=images[0], text="<image>A cat.")["input_ids"][0]
    assert ids[0] == bos and ids[1] == image and ids.count(bos) == 1
    assert processor(images=images[0], text="<image>A cat.", add_special_tokens=False)["input_ids"][0][0] == image
    assert processor.with_one_bos("A cat.<image>") == "A cat.<image>"


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_the_template_writes_the_bos_and_the_processor_adds_no_second_one(preset, images):
    """A server that renders the chat template and tokenizes it without special tokens (vLLM's chat
    endpoint) gets the ids `AkiProcessor` gives: one BOS, first."""
    from aki.presets import processor_from_preset

    processor = processor_from_preset(preset)
    tokenizer, bos = processor.tokenizer, processor.tokenizer.bos_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith(tokenizer.bos_token)
    ids = processor(images=images[0], text=prompt)["input_ids"][0]
    assert ids[0] == bos and ids.count(bos) == 1
    served = processor(images=images[0], text=prompt, add_special_tokens=False)["input_ids"][0]
    assert served == ids
    messages[0]["content"][0]["image"] = images[0]
    tokenized = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tokenized["input_ids"][0] == ids


def test_placeholder_count_for_serving_engines_matches_the_processor(tiny, images):
    # `_get_num_multimodal_tokens` is how vLLM sizes an image's placeholders without running the processor.
    model, processor = tiny
    sizes = [image.size[::-1] for image in images]
    counted = processor._get_num_multimodal_tokens(image_sizes=sizes)
    inputs = encode(processor, chat("What is this?", num_images=2), images)
    placeholders = (inputs["input_ids"][0] == model.config.image_token_id).sum().item()
    assert counted.num_image_tokens == [model.config.num_image_tokens] * 2
    assert sum(counted.num_image_tokens) == placeholders
    assert counted.num_image_patches == [1, 1]


def test_default_image_processor_is_the_aki_4b_one():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixel_values = AkiImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
    resized = np.asarray(image.resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    assert torch.allclose(pixel_values, torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1), atol=1e-6)


def test_image_preprocessing_is_bicubic_resize_and_half_normalisation(tiny):
    _, processor = tiny
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixel_values = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"][0]
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(pixel_values, expected, atol=1e-6)


def test_bad_processor_inputs_name_the_problem(tiny, images, tmp_path):
    _, processor = tiny
    text = processor.apply_chat_template(
        chat("What is this?", num_images=2), add_generation_prompt=True, tokenize=False
    )
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(images=images[:1], text=text)
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=text)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="Cannot read image .*corrupt.jpg"):
        processor(images=[str(corrupt)], text="<image>")
    with pytest.raises(ValueError, match=r"got shape \(5, 5, 7\)"):
        processor(images=[np.zeros((5, 5, 7), dtype=np.uint8)], text="<image>")


def test_images_from_paths(tiny, images, tmp_path):
    _, processor = tiny
    path = tmp_path / "astronaut.png"
    images[0].save(path)
    from_path = processor(images=[str(path)], text="<image>", return_tensors="pt")["pixel_values"]
    from_memory = processor(images=[images[0]], text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(from_path, from_memory)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_llama"])
def test_save_and_load_with_auto_classes(fixture, images, tmp_path, request):
    model, processor = request.getfixturevalue(fixture)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), AkiConfig)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, AkiProcessor)
    assert isinstance(loaded_processor.image_processor, AkiImageProcessor)  # PIL resize, as the official code
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    assert loaded_processor.chat_template == processor.chat_template

    inputs = encode(processor, chat("What is this?", "A cat."), images[:1])
    reloaded_inputs = encode(loaded_processor, chat("What is this?", "A cat."), images[:1])
    for key in inputs:
        assert torch.equal(inputs[key], reloaded_inputs[key]), key

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AkiForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert isinstance(base, AkiModel)
        assert torch.equal(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
