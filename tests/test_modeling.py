"""The model: backends agree, MMA changes exactly what it should, errors name the problem."""

import copy

import pytest
import torch
from helpers import chat, encode, packed_caption_and_chat
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import DynamicCache

from aki import AkiForConditionalGeneration, PromptSplitError
from aki.masking import mma_window_ids
from aki.presets import build_tiny

QUESTION, OTHER_QUESTION = "What colour is the shape?", "Where is the circle?"


def logits(model, inputs, policy="mma", implementation="sdpa"):
    model.config.attention_policy = policy
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        model.config.attention_policy = "mma"
        model.set_attn_implementation("sdpa")


def hidden_states(model, inputs, policy):
    model.config.attention_policy = policy
    try:
        with torch.no_grad():
            return model.model(**inputs).last_hidden_state
    finally:
        model.config.attention_policy = "mma"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_backends_agree(model_and_processor, images, implementation):
    model, processor = model_and_processor
    inputs = encode(processor, chat(QUESTION, "A red square.", num_images=2), images)
    reference = logits(model, inputs, implementation="eager")
    assert torch.allclose(logits(model, inputs, implementation=implementation), reference, atol=1e-5)
    # MMA is really on: the causal baseline gives other logits.
    assert not torch.allclose(logits(model, inputs, policy="causal"), reference, atol=1e-4)


def test_flex_attention_agrees_with_sdpa(tiny, images):
    model, processor = tiny
    torch._dynamo.config.automatic_dynamic_shapes = False  # one fixed shape: compile once
    inputs = encode(processor, chat(QUESTION, "A red square."), images[:1])
    reference = logits(model, inputs, implementation="eager")
    assert torch.allclose(logits(model, inputs, implementation="flex_attention"), reference, atol=1e-5)


def image_positions(model, inputs):
    return inputs["input_ids"][0] == model.config.image_token_id


def test_mma_image_tokens_read_the_question_not_the_answer(model_and_processor, images):
    model, processor = model_and_processor
    base = encode(processor, chat(QUESTION, "A red square."), images[:1])
    other_question = encode(processor, chat(OTHER_QUESTION, "A red square."), images[:1])
    other_answer = encode(processor, chat(QUESTION, "Blue, near the top."), images[:1])
    assert image_positions(model, base).sum() == model.config.num_image_tokens

    def image_states(inputs, policy):
        return hidden_states(model, inputs, policy)[0, image_positions(model, inputs)]

    mma = image_states(base, "mma")
    assert not torch.allclose(image_states(other_question, "mma"), mma, atol=1e-4)
    assert torch.allclose(image_states(other_answer, "mma"), mma, atol=1e-6)
    causal = image_states(base, "causal")
    assert torch.allclose(image_states(other_question, "causal"), causal, atol=1e-6)
    assert torch.allclose(image_states(other_answer, "causal"), causal, atol=1e-6)


def greedy_by_hand(model, inputs, steps):
    """Recompute the whole sequence at every step, without a cache."""
    input_ids, scores = inputs["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            step_logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
        scores.append(step_logits)
        input_ids = torch.cat([input_ids, step_logits.argmax(-1, keepdim=True)], dim=-1)
    return input_ids, torch.stack(scores, 1)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generation_equals_recomputation(model_and_processor, images, cache_implementation):
    model, processor = model_and_processor
    inputs = encode(processor, chat(QUESTION), images[:1])
    steps = 8
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        cache_implementation=cache_implementation, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    expected_ids, expected_scores = greedy_by_hand(model, inputs, steps)
    assert torch.equal(out.sequences, expected_ids)
    assert torch.allclose(torch.stack(out.logits, 1), expected_scores, atol=1e-5)
    # The prefill ran with MMA: the causal model scores the first step differently.
    causal_first = logits(model, inputs, policy="causal")[:, -1]
    assert not torch.allclose(out.logits[0], causal_first, atol=1e-4)


def test_generation_without_cache_equals_with_cache(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6}
    assert torch.equal(model.generate(**inputs, **kwargs), model.generate(**inputs, use_cache=False, **kwargs))
    beams = {"num_beams": 3, "do_sample": False, **kwargs}
    assert torch.equal(model.generate(**inputs, **beams), model.generate(**inputs, use_cache=False, **beams))
    torch.manual_seed(7)
    sampled = model.generate(**inputs, do_sample=True, top_k=20, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(sampled, model.generate(**inputs, do_sample=True, top_k=20, use_cache=False, **kwargs))


def test_left_padded_batch_equals_each_sample_alone(model_and_processor, images):
    model, processor = model_and_processor
    processor.tokenizer.padding_side = "left"
    questions = [QUESTION, "Is there a red square in the top left? Answer with a single word."]
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) for q in questions]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "output_logits": True, "return_dict_in_generate": True}
    together = model.generate(**batch, **kwargs)
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        alone = model.generate(**processor(images=[image], text=[text], return_tensors="pt"), **kwargs)
        assert torch.equal(together.sequences[row, -5:], alone.sequences[0, -5:])
        for step in range(5):
            assert torch.allclose(together.logits[step][row], alone.logits[step][0], atol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padded_rows_have_no_nan(tiny, images, implementation):
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False)
        for q in ["Hi?", "Is there a red square in the top left? Answer with a single word."]
    ]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert not torch.isnan(logits(model, batch, implementation=implementation)).any()


def test_prefill_split_between_image_and_question_raises(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    input_ids = inputs["input_ids"]
    after_image = int((input_ids[0] == model.config.image_token_id).nonzero().max()) + 1
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=input_ids[:, :after_image], pixel_values=inputs["pixel_values"], cache=cache, use_cache=True)
    with pytest.raises(PromptSplitError, match="split"):
        model.generate(input_ids=input_ids, attention_mask=inputs["attention_mask"], cache=cache, max_new_tokens=2)
    # A forward given the whole sequence's windows detects it too, on either side of the chunk.
    windows = mma_window_ids(input_ids, model.config.image_token_id, model.config.assistant_marker_ids)
    with pytest.raises(PromptSplitError):
        model(input_ids=input_ids[:, after_image:], cache=cache, mma_window_ids=windows)
    with pytest.raises(PromptSplitError):
        model(input_ids=input_ids[:, :after_image], pixel_values=inputs["pixel_values"], mma_window_ids=windows)


def test_cache_continuation_after_a_whole_turn_is_allowed(tiny, images):
    """A new text turn after a cached image turn is fine: the image never sees later turns."""
    model, processor = tiny
    first = encode(processor, chat(QUESTION, "Red."), images[:1])
    follow_up = chat(QUESTION, "Red.") + [{"role": "user", "content": OTHER_QUESTION}]
    full = encode(processor, follow_up, images[:1])
    cached = first["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][:, :cached], first["input_ids"])
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**first, cache=cache, use_cache=True)
        continued = model(input_ids=full["input_ids"][:, cached:], cache=cache).logits
    assert torch.allclose(continued, logits(model, full)[:, cached:], atol=1e-5)


def test_loss_and_gradients(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION, "A red square."), images[:1])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    model.train()
    try:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    assert model.model.connector.latents.grad is not None and model.model.connector.latents.grad.abs().sum() > 0
    model.zero_grad()


def test_flash_attention_is_refused(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForImageTextToText

    with pytest.raises(ValueError, match="Flash Attention"):
        AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_bad_inputs_name_the_problem(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 20, 20))
    with pytest.raises(StrictDataclassFieldValidationError, match="attention_policy.*expected one of"):
        build_tiny("tiny", attention_policy="bidirectional")


BACKBONES = {
    "phi3-sliding-window": {"model_type": "phi3", "sliding_window": 4096, "original_max_position_embeddings": 1024},
    "llama": {"model_type": "llama"},
    "qwen2-sliding-layers": {
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 4096,
        "layer_types": ["full_attention", "sliding_attention"],
    },
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_backbones_apply_the_dense_reference_mask(backbone, implementation, images):
    """Any causal LM: the mask built inside the model equals feeding the dense rule as a 4D mask."""
    from aki.masking import dense_attention_mask
    from aki.presets import TINY_IDS, TINY_TEXT, config_from_preset

    special = {
        "bos_token_id": TINY_IDS["<s>"],
        "eos_token_id": TINY_IDS["<|endoftext|>"],
        "pad_token_id": TINY_IDS["<pad>"],
    }
    config = config_from_preset("tiny", text_config={**TINY_TEXT, **special, **BACKBONES[backbone]})
    torch.manual_seed(0)
    model = AkiForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    _, processor = build_tiny("tiny")
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(chat(q, "Red."), tokenize=False) for q in [QUESTION, "Is it round? Yes or no."]
    ]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    windows = model.model.window_ids(batch["input_ids"], batch["attention_mask"])
    allowed = dense_attention_mask(windows, batch["attention_mask"])[:, None]
    if implementation == "eager":
        dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        dense = allowed
    with torch.no_grad():
        built = model(**batch).logits
        reference = model(**{**batch, "attention_mask": dense}).logits
    valid = batch["attention_mask"].bool()
    assert torch.allclose(built[valid], reference[valid], atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_samples_equal_each_sample_alone(tiny, images, implementation):
    """Two samples in one row (position ids restart) keep their own causal and MMA masks."""
    model, processor = tiny
    packed, parts = packed_caption_and_chat(processor, images, QUESTION, "A red square.")
    caption = parts[0]
    windows = model.model.window_ids(packed["input_ids"], document_ids=torch.cat(
        [torch.full((p["input_ids"].shape[1],), i) for i, p in enumerate(parts)])[None])  # fmt: skip
    assert windows[0, : caption["input_ids"].shape[1]].abs().sum() == 0
    together = logits(model, packed, implementation=implementation)[0]
    start = 0
    for part in parts:
        length = part["input_ids"].shape[1]
        alone = logits(model, part, implementation=implementation)[0]
        assert torch.allclose(together[start : start + length], alone, atol=1e-5)
        start += length


def test_flex_does_not_recompile_for_new_lengths_within_a_bucket(tiny):
    """Batches padded to a multiple of 128 (training's pad_to_multiple_of) reuse flex's compiled graphs."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from aki_training.encode import collate, encode_conversation

    model, processor = tiny
    torch._dynamo.config.automatic_dynamic_shapes = False
    model.set_attn_implementation("flex_attention")
    image = Image.new("RGB", (32, 32), "red")
    try:
        graphs = []
        for question in ("What colour?", "What colour is the square in the corner?", "Is it red?"):
            sample = encode_conversation(processor, chat(question, "Red."), [image], 256)
            batch = collate([sample], processor.tokenizer.pad_token_id, pad_to_multiple_of=128)
            batch.pop("labels")
            assert batch["input_ids"].shape[1] == 128
            with torch.no_grad():
                model(**batch)
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[1] == graphs[0] and graphs[2] == graphs[0]
    finally:
        model.set_attn_implementation("sdpa")


def test_the_resampler_starts_as_flamingo_builds_it(tiny):
    """Latents ~ N(0, 1) and PyTorch's default Linear init (uniform within 1 / sqrt(fan_in)), not N(0, 0.02)."""
    resampler = tiny[0].model.connector
    assert 0.8 < resampler.latents.std().item() < 1.2
    for linear in (module for module in resampler.modules() if isinstance(module, torch.nn.Linear)):
        bound = 1 / linear.in_features**0.5
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 2, linear


# transformers conformance (the peer suite is tests/test_transformers_common.py).


def test_the_old_past_key_values_name_still_feeds_the_cache(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    with torch.no_grad():
        prefix = model(**inputs, use_cache=True)
        step = {"input_ids": torch.tensor([[30]]), "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1)}
        by_new_name = model(**step, cache=copy.deepcopy(prefix.cache)).logits
        old_cache = copy.deepcopy(prefix.cache)
        with pytest.warns(FutureWarning, match="past_key_values"):
            by_old_name = model(**step, past_key_values=old_cache).logits
    assert torch.equal(by_old_name, by_new_name)
    assert old_cache.get_seq_length() == inputs["input_ids"].shape[1] + 1


@pytest.mark.parametrize("decoding", [{"assistant_model": "self"}, {"prompt_lookup_num_tokens": 2}])
def test_assisted_and_prompt_lookup_decoding_match_greedy_with_mma(model_and_processor, images, decoding):
    model, processor = model_and_processor
    inputs = encode(processor, chat(QUESTION), images[:1])
    if "assistant_model" in decoding:
        decoding = {"assistant_model": model}  # the same weights: every candidate must be accepted
    greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False, **decoding), greedy)


def test_an_assistant_model_prefills_with_the_image(tiny, images):
    """`generate` gives an assistant no pixel_values; AKI hands them to every forward on an empty cache."""
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    empty = DynamicCache(config=model.config.text_config)
    prepared = model.prepare_inputs_for_generation(
        inputs["input_ids"],
        cache=empty,
        is_first_iteration=False,
        use_cache=True,
        **{"pixel_values": inputs["pixel_values"], "attention_mask": inputs["attention_mask"]},
    )
    assert prepared["pixel_values"] is inputs["pixel_values"]
    assert (prepared["mma_window_ids"] > 0).any()


def test_image_tokens_without_pixels_are_refused_only_at_prefill(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with torch.no_grad():
        prefix = model(**inputs, use_cache=True)
        # Continuing from the cache with pixel_values again (as `generate` does after a cache) encodes nothing new.
        step = torch.tensor([[30]])
        again = model(input_ids=step, pixel_values=inputs["pixel_values"], cache=copy.deepcopy(prefix.cache))
        plain = model(input_ids=step, cache=copy.deepcopy(prefix.cache))
    assert again.image_outputs is None
    assert torch.equal(again.logits, plain.logits)


def test_generate_from_inputs_embeds_finds_images_and_questions(model_and_processor, images):
    model, processor = model_and_processor
    inputs = encode(processor, chat(QUESTION), images[:1])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    windows = model.model.special_ids_from_embeddings(embeds)
    assert torch.equal(model.model.window_ids(windows), model.model.window_ids(inputs["input_ids"]))
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    from_embeds = model.generate(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(from_embeds, greedy)
    text_only = encode(processor, [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}], None)
    text_embeds = model.get_input_embeddings()(text_only["input_ids"])
    assert model.generate(inputs_embeds=text_embeds, max_new_tokens=2, do_sample=False).shape == (1, 2)


def test_get_image_features_passes_output_flags_to_the_vision_tower(tiny, images):
    model, processor = tiny
    pixel_values = processor(images=images[:1], text="<image>", return_tensors="pt")["pixel_values"]
    model.set_attn_implementation("eager")  # the backend that returns attention weights
    try:
        with torch.no_grad():
            outputs = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.vision_config.num_hidden_layers
    assert len(outputs.hidden_states) == layers + 1 and len(outputs.attentions) == layers
    assert outputs.pooler_output.shape == (1, model.config.num_image_tokens, model.config.text_config.hidden_size)


def test_tensor_parallel_plan_shards_the_head_with_the_tied_embedding():
    from aki.presets import config_from_preset

    with torch.device("meta"):
        model = AkiForConditionalGeneration(config_from_preset("aki-llama3.2-3b"))
    assert model.config.tie_word_embeddings
    assert model.tp_plan["model.language_model.embed_tokens"] == "embedding_rowwise"
    assert model.tp_plan["lm_head"] == "colwise_gather_output"


def test_forward_kwargs_are_typed_as_transformers_kwargs():
    import inspect
    from typing import get_args

    from transformers.utils import TransformersKwargs

    for function in (AkiForConditionalGeneration.forward, AkiForConditionalGeneration.get_image_features):
        annotation = inspect.signature(function).parameters["kwargs"].annotation
        assert get_args(annotation) == (TransformersKwargs,), function.__qualname__


def test_a_vision_tower_missing_from_a_checkpoint_gets_siglips_own_init(tiny, tmp_path):
    """SigLIP's initialiser: xavier-uniform attention and MLP weights, MLP biases ~ N(0, 1e-6)."""
    import safetensors.torch

    model, _ = tiny
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    kept = {key: value for key, value in weights.items() if "vision_tower" not in key}
    safetensors.torch.save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AkiForConditionalGeneration.from_pretrained(tmp_path)
    width = model.config.vision_config.hidden_size
    for layer in loaded.model.vision_tower.encoder.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.fc1):
            fan_in, fan_out = linear.in_features, linear.out_features
            assert linear.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform's bound
        assert 0 < layer.mlp.fc1.bias.std() < 1e-5
    embeddings = loaded.model.vision_tower.embeddings.position_embedding.weight
    assert abs(embeddings.std() - width**-0.5) < 0.05
    # Loaded weights are left alone.
    for key, value in kept.items():
        assert torch.equal(loaded.state_dict()[key], value), key
