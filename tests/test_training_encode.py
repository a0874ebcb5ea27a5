"""SFT and caption encoding: labels, MMA windows of collated batches, truncation."""

import pytest
import torch
from PIL import Image

from aki.masking import mma_window_ids
from aki_training.encode import IGNORE_INDEX, SampleError, collate, encode_caption, encode_conversation

RED = Image.new("RGB", (40, 40), "red")


def user(text, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": text}


def describe(model, processor, samples):
    """Per row: supervised text, and the text of each MMA window with its image-token count."""
    batch = collate(samples, processor.tokenizer.pad_token_id)
    config = model.config
    windows = mma_window_ids(
        batch["input_ids"], config.image_token_id, config.assistant_marker_ids, batch["attention_mask"]
    )
    rows = []
    for ids, labels, row_windows in zip(batch["input_ids"], batch["labels"], windows, strict=True):
        supervised = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
        per_window = {
            int(w): (int((row_windows == w).sum()), processor.tokenizer.decode(ids[row_windows == -w]))
            for w in row_windows.unique().tolist()
            if w > 0
        }
        rows.append((supervised, per_window))
    return batch, rows


def test_single_turn(tiny):
    model, processor = tiny
    sample = encode_conversation(processor, [user("What colour?"), assistant("Red.")], [RED], 512)
    _, [(supervised, windows)] = describe(model, processor, [sample])
    assert supervised == "Red.<|endoftext|>"
    assert windows == {1: (8, "\nWhat colour?<|end|>\n<|assistant|>")}
    assert sample.pixel_values.shape == (1, 3, 32, 32)


def test_multi_turn_keeps_every_answer_and_each_image_sees_its_own_turn(tiny):
    model, processor = tiny
    messages = [user("What colour?"), assistant("Red."), user("And now?"), assistant("Blue.")]
    sample = encode_conversation(processor, messages, [RED, RED], 512)
    _, [(supervised, windows)] = describe(model, processor, [sample])
    assert supervised == "Red.<|endoftext|>Blue.<|endoftext|>"
    assert windows == {
        1: (8, "\nWhat colour?<|end|>\n<|assistant|>"),
        2: (8, "\nAnd now?<|end|>\n<|assistant|>"),
    }


def test_two_images_in_one_turn_share_the_question(tiny):
    model, processor = tiny
    messages = [user("Same colour?", images=2), assistant("Yes.")]
    sample = encode_conversation(processor, messages, [RED, RED], 512)
    _, [(supervised, windows)] = describe(model, processor, [sample])
    assert supervised == "Yes.<|endoftext|>"
    assert windows == {1: (16, "\n\nSame colour?<|end|>\n<|assistant|>")}
    assert sample.pixel_values.shape[0] == 2


def test_a_text_only_turn_has_no_window(tiny):
    model, processor = tiny
    sample = encode_conversation(processor, [user("Hello?", images=0), assistant("Hi.")], [], 512)
    batch, [(supervised, windows)] = describe(model, processor, [sample])
    assert supervised == "Hi.<|endoftext|>" and windows == {} and batch["pixel_values"] is None


def test_truncation_drops_whole_turns_then_shortens_the_answer(tiny):
    model, processor = tiny
    messages = [user("What colour?"), assistant("Red."), user("And now?"), assistant("Blue.")]
    full = encode_conversation(processor, messages, [RED, RED], 512)
    first_turn = encode_conversation(processor, messages[:2], [RED], 512)
    dropped = encode_conversation(processor, messages, [RED, RED], len(full.input_ids) - 1)
    assert dropped.input_ids == first_turn.input_ids and dropped.labels == first_turn.labels
    assert dropped.pixel_values.shape[0] == 1 and dropped.notes == {"truncated_turns": 1}
    shortened = encode_conversation(processor, messages, [RED, RED], len(first_turn.input_ids) - 1)
    _, [(supervised, windows)] = describe(model, processor, [shortened])
    assert supervised == "Red."  # the answer without its end-of-answer token
    assert windows == {1: (8, "\nWhat colour?<|end|>\n<|assistant|>")}  # the header survives
    assert shortened.notes == {"truncated_answer": 1}
    with pytest.raises(SampleError, match="too_long"):
        encode_conversation(processor, messages, [RED, RED], 30)


def test_bad_samples_raise_named_reasons(tiny):
    _, processor = tiny
    with pytest.raises(SampleError) as error:
        encode_conversation(processor, [user("What colour?")], [RED], 512)
    assert error.value.reason == "no_assistant_turn"
    with pytest.raises(SampleError) as error:
        encode_conversation(processor, [user("What colour?"), assistant("Red.")], [RED, RED], 512)
    assert error.value.reason == "image_count_mismatch"
    with pytest.raises(SampleError) as error:
        encode_caption(processor, RED, "   ", 128)
    assert error.value.reason == "empty_caption"


def test_caption_labels_and_causal_windows(tiny):
    model, processor = tiny
    sample = encode_caption(processor, RED, "A red square.", 128)
    batch, [(supervised, windows)] = describe(model, processor, [sample])
    assert supervised == "A red square.<|endofchunk|><|endoftext|>"
    assert windows == {}  # no assistant header: causal
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert (batch["input_ids"][0, 1:9] == model.config.image_token_id).all()


def test_collate_pads_right(tiny):
    _, processor = tiny
    short = encode_caption(processor, RED, "A.", 128)
    long = encode_caption(processor, RED, "A red square in the top left.", 128)
    batch = collate([short, long], processor.tokenizer.pad_token_id)
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * (
        len(long.input_ids) - len(short.input_ids)
    )
    assert (batch["labels"][0, len(short.input_ids) :] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([short.pixel_values, long.pixel_values]))


def test_collate_and_pack_round_lengths_up_to_a_bucket(tiny):
    from aki_training.encode import pack

    _, processor = tiny
    samples = [encode_caption(processor, RED, text, 128) for text in ("A.", "A red square in the top left.")]
    batch = collate(samples, processor.tokenizer.pad_token_id, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] == 64 and (batch["labels"][:, len(samples[1].input_ids) :] == IGNORE_INDEX).all()
    packed = pack(samples, 128, processor.tokenizer.pad_token_id, pad_to_multiple_of=64)
    assert packed["input_ids"].shape == (1, 64)
