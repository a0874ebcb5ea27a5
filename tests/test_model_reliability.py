"""The model refuses what it cannot do right: image blocks of the wrong size, and (on CPU)
flex_attention generating from a padded batch, which PyTorch's CPU kernel cannot compile."""

import pytest
import torch
from helpers import chat, encode


def test_each_image_block_must_hold_one_images_tokens(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat("What differs?", num_images=2), images)
    ids = inputs["input_ids"][0].tolist()
    image_id, per_image = processor.image_token_id, processor.num_image_tokens
    first = ids.index(image_id)
    second = ids.index(image_id, first + per_image)
    # One token moves from the first block to the second: the total still matches two images.
    shifted = ids[:first] + ids[first + 1 : second] + [image_id] + ids[second:]
    assert shifted.count(image_id) == 2 * per_image
    with pytest.raises(ValueError, match=rf"blocks of {per_image - 1} and {per_image + 1} image tokens"):
        model(input_ids=torch.tensor([shifted]), pixel_values=inputs["pixel_values"])
    model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])  # the processor's own layout


def test_adjacent_images_may_share_one_block(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat("What differs?", num_images=2), images)
    ids = [t for t in inputs["input_ids"][0].tolist()]
    per_image, image_id = processor.num_image_tokens, processor.image_token_id
    first = ids.index(image_id)
    between = ids[first + per_image : ids.index(image_id, first + per_image)]
    joined = ids[: first + per_image] + ids[first + per_image + len(between) :]  # `<image><image>` with nothing between
    model(input_ids=torch.tensor([joined]), pixel_values=inputs["pixel_values"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU")
def test_flex_generation_from_a_padded_batch_is_refused_up_front_on_cpu():
    from aki.presets import build_tiny

    model, processor = build_tiny("tiny", seed=0, attention_policy="causal")
    model.set_attn_implementation("flex_attention")
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["Hello there, how are you today?", "Hi"], padding=True, return_tensors="pt")
    assert not inputs["attention_mask"].all()
    with pytest.raises(ValueError, match="flex_attention.*padded batch.*CPU.*sdpa"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
