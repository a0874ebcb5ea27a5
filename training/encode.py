"""Samples -> token ids and labels, with truncation that never loses a kept answer's header.

SFT labels: only assistant answers and their end-of-answer token are supervised; everything up to
and including each assistant header is -100, as are image tokens and padding. Pre-training
labels: the caption, `<|endofchunk|>` and EOS; never the image tokens or BOS.

Shape legend: `n` images of a sample, `s` tokens.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch

from aki.processing_aki import load_image

IGNORE_INDEX = -100


class SampleError(Exception):
    """A sample that cannot be trained on; `reason` names the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_text(value, field: str) -> str:
    """`value` if it is text that encodes to UTF-8 (JSON allows lone surrogates like "\\ud800"; tokenizers do not)."""
    if not isinstance(value, str):
        raise SampleError("malformed_record", f"{field} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SampleError("malformed_record", f"{field} is not valid UTF-8 text ({error.reason})") from error
    return value


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (n, 3, H, W)
    notes: Counter = field(default_factory=Counter)  # e.g. {"truncated_turns": 1}


def count_image_items(messages: list[dict]) -> int:
    return sum(
        1
        for message in messages
        if not isinstance(message["content"], str)
        for item in message["content"]
        if item.get("type") == "image"
    )


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, (answer start, answer end) in characters.

    The answer starts right after the assistant header (the generation prompt) and ends after the
    end-of-answer token the template appends.

    Found by rendering prefixes with the processor's own chat template, so any template works as
    long as a conversation's rendering starts with the rendering of its first turns.
    """
    full = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.apply_chat_template(messages[:index], tokenize=False) if index else ""
        prompt = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(prompt) and prompt.startswith(before)):
            raise ValueError("The chat template does not render conversations prefix by prefix.")
        spans.append((len(prompt), len(through)))
    return full, spans


def expand_images(ids: list[int], labels: list[int], image_token_id: int, num_image_tokens: int):
    """Each `<image>` id becomes `num_image_tokens` ids, all unsupervised."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels, strict=True):
        if token == image_token_id:
            out_ids += [token] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def pixel_values_of(processor, images: list) -> torch.Tensor | None:
    if not images:
        return None
    loaded = []
    for image in images:
        try:
            loaded.append(load_image(image))
        except ValueError as error:
            raise SampleError("bad_image", str(error)) from error
    try:
        return processor.image_processor(loaded, return_tensors="pt")["pixel_values"]
    except (OSError, ValueError) as error:
        raise SampleError("bad_image", str(error)) from error


def encode_conversation(processor, messages: list[dict], images: list, max_length: int) -> Encoded:
    """Tokenise a chat (HF message format, `{"type": "image"}` items) for SFT."""
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise SampleError("no_assistant_turn")
    if count_image_items(messages) != len(images):
        raise SampleError("image_count_mismatch", f"{count_image_items(messages)} placeholders, {len(images)} images")
    text, spans = assistant_spans(processor, messages)
    check_text(text, "the conversation")
    tokenizer = processor.tokenizer
    # A template that writes the BOS itself gets no second one from the tokenizer.
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not has_bos)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [
        token if end > begin and any(start <= begin and end <= stop for start, stop in spans) else IGNORE_INDEX
        for token, (begin, end) in zip(ids, offsets, strict=True)
    ]

    def first_token_at(char: int) -> int:  # before image expansion
        return next((i for i, (begin, end) in enumerate(offsets) if end > begin and begin >= char), len(ids))

    answer_start = [first_token_at(start) for start, _ in spans]
    answer_end = [first_token_at(stop) for _, stop in spans]

    image_id, per_image = processor.image_token_id, processor.num_image_tokens
    extra = per_image - 1

    unexpanded = ids

    def expanded(position: int) -> int:  # a token index after expansion
        return position + extra * sum(1 for token in unexpanded[:position] if token == image_id)

    notes = Counter()
    ids, labels = expand_images(ids, labels, image_id, per_image)
    if len(ids) > max_length:
        whole_turns = [turn for turn, end in enumerate(answer_end) if expanded(end) <= max_length]
        if whole_turns:
            cut = expanded(answer_end[whole_turns[-1]])
            notes["truncated_turns"] += 1
        elif expanded(answer_start[0]) < max_length:
            cut = max_length  # keep the first header and the start of its answer
            notes["truncated_answer"] += 1
        else:
            raise SampleError("too_long", f"the first answer starts after {max_length} tokens")
        ids, labels = ids[:cut], labels[:cut]
        images = images[: sum(1 for token in ids if token == image_id) // per_image]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError("no_supervised_tokens")
    return Encoded(ids, labels, pixel_values_of(processor, images), notes)


def encode_caption(processor, image, caption: str, max_length: int, end_of_chunk: str = "<|endofchunk|>") -> Encoded:
    """`<s><image>{caption}<|endofchunk|><|endoftext|>` for pre-training; loss on the text after the image."""
    caption = check_text(caption or "", "the caption").strip()
    if not caption:
        raise SampleError("empty_caption")
    tokenizer = processor.tokenizer
    # BOS first even where the tokenizer adds none: an image at position 0 sits on the attention sink.
    text = processor.with_one_bos(processor.image_token + caption + end_of_chunk + tokenizer.eos_token)
    ids = tokenizer(text)["input_ids"]
    labels = [token if i > 0 and token != processor.image_token_id else IGNORE_INDEX for i, token in enumerate(ids)]
    ids, labels = expand_images(ids, labels, processor.image_token_id, processor.num_image_tokens)
    notes = Counter()
    if len(ids) > max_length:
        if ids.index(processor.image_token_id) + processor.num_image_tokens >= max_length:
            raise SampleError("too_long", "the image alone fills max_length")
        ids, labels = ids[:max_length], labels[:max_length]
        notes["truncated_caption"] += 1
    return Encoded(ids, labels, pixel_values_of(processor, [image]), notes)


def bucket(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple: compiled kernels (flex_attention) then see few distinct shapes."""
    return -(-length // multiple) * multiple


def collate(samples: list[Encoded], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch: input_ids, labels, attention_mask (b, s), pixel_values."""
    length = bucket(max(len(sample.input_ids) for sample in samples), pad_to_multiple_of)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    pixel_values = [sample.pixel_values for sample in samples if sample.pixel_values is not None]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch["pixel_values"] = torch.cat(pixel_values) if pixel_values else None
    return batch


def pack(
    samples: list[Encoded], max_length: int, pad_token_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Pack samples into rows of at most `max_length` tokens (first fit, in order).

    Position ids restart at each sample, which is how the model (and transformers' masks) tell
    packed samples apart: no sample attends to another, and each keeps its own MMA windows. The
    first token of a sample is BOS with no label, so no loss crosses a boundary.
    """
    rows: list[list[Encoded]] = []
    for sample in samples:
        row = next((r for r in rows if sum(len(s.input_ids) for s in r) + len(sample.input_ids) <= max_length), None)
        if row is None:
            rows.append([sample])
        else:
            row.append(sample)
    length = bucket(max(sum(len(s.input_ids) for s in row) for row in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    pixel_values = []
    for index, row in enumerate(rows):
        start = 0
        for sample in row:
            end = start + len(sample.input_ids)
            input_ids[index, start:end] = torch.tensor(sample.input_ids)
            labels[index, start:end] = torch.tensor(sample.labels)
            position_ids[index, start:end] = torch.arange(end - start)
            if sample.pixel_values is not None:
                pixel_values.append(sample.pixel_values)
            start = end
        position_ids[index, start:] = torch.arange(length - start)  # the tail padding is one more "sample"
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "pixel_values": torch.cat(pixel_values) if pixel_values else None,
    }
