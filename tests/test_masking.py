"""The MMA mask against a reference written directly from the rule of docs/mma.md, token by token."""

import random

import pytest
import torch
from transformers import Phi3Config
from transformers.masking_utils import create_causal_mask

from aki.masking import (
    IMAGE,
    IMAGE_CAUSAL,
    PADDING,
    QUESTION,
    dense_attention_mask,
    exact_chunk_end,
    find_marker_starts,
    mma_mask_function,
    mma_window_ids,
    token_roles,
    window_split_at,
)

IMG, PAD, TEXT_IDS = 3, 0, list(range(20, 40))
PHI_MARKER, LLAMA_MARKER = [7], [9, 25, 10]  # <|assistant|> / <|start_header_id|> assistant <|end_header_id|>


def reference_mask(ids: list[int], valid: list[bool], marker: list[int]) -> torch.Tensor:
    """allowed[q, k] = key_valid[k] and (k <= q or (is_image[q] and question_of(q)[k])), by hand."""
    s = len(ids)
    marker_starts = [ids[i : i + len(marker)] == marker for i in range(s)]
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        question = set()
        if ids[q] == IMG and valid[q]:
            end = q
            while end + 1 < s and ids[end + 1] == IMG:
                end += 1
            window = []
            for k in range(end + 1, s):
                if ids[k] != IMG:
                    window.append(k)
                if marker_starts[k]:
                    question = {k for k in window if valid[k]}
                    break
        for k in range(s):
            allowed[q, k] = valid[k] and (k <= q or k in question)
    return allowed


def random_sample(rng: random.Random, marker: list[int], num_images: int, num_turns: int, closed: bool):
    """A conversation: system text, then turns of [images and text] [marker] [answer]."""
    ids = [1] + rng.choices(TEXT_IDS, k=rng.randint(1, 4))
    images_per_turn = [0] * num_turns
    for _ in range(num_images):
        images_per_turn[rng.randrange(num_turns)] += 1
    for turn, count in enumerate(images_per_turn):
        ids += [6]
        for _ in range(count):
            ids += rng.choices(TEXT_IDS, k=rng.randint(0, 2)) + [IMG] * rng.randint(2, 4)
        ids += rng.choices(TEXT_IDS, k=rng.randint(1, 5)) + [8]
        if turn == num_turns - 1 and not closed:
            break
        ids += marker + rng.choices(TEXT_IDS, k=rng.randint(0, 4)) + [2]
    return ids


def random_batch(seed: int, marker: list[int], padding_side: str):
    rng = random.Random(seed)
    samples = [
        random_sample(
            rng, marker, num_images=rng.choice([0, 1, 3]), num_turns=rng.randint(1, 3), closed=rng.random() > 0.25
        )
        for _ in range(4)
    ]
    length = max(map(len, samples))
    ids, valid = [], []
    for sample in samples:
        pad = [PAD] * (length - len(sample))
        ids.append(pad + sample if padding_side == "left" else sample + pad)
        ones, zeros = [True] * len(sample), [False] * len(pad)
        valid.append(zeros + ones if padding_side == "left" else ones + zeros)
    return torch.tensor(ids), torch.tensor(valid)


def exact_ends_by_hand(window: list[int], start: int) -> list[int]:
    """Every end e of a chunk [start, e) whose image rows all have their window's keys before e."""
    ends = []
    for end in range(start, len(window) + 1):
        keys_before_end = all(
            all(k < end for k, other in enumerate(window) if other == -window[q])
            for q in range(start, end)
            if window[q] > 0
        )
        if keys_before_end:
            ends.append(end)
    return ends


def test_exact_chunk_end_is_the_furthest_end_the_rule_allows():
    """A chunk scheduler's cut (aki.vllm_plugin.scheduler), against every end checked by hand, on random
    conversations of several turns, images and unclosed turns."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [TEXT_IDS[0]]
        for _turn in range(rng.randint(1, 3)):
            ids += rng.choices(TEXT_IDS, k=rng.randint(0, 3))
            for _image in range(rng.randint(0, 2)):
                ids += [IMG] * rng.randint(1, 3) + rng.choices(TEXT_IDS, k=rng.randint(0, 2))
            if rng.random() < 0.8:
                ids += PHI_MARKER + rng.choices(TEXT_IDS, k=rng.randint(0, 2))
        window = mma_window_ids(torch.tensor([ids]), IMG, PHI_MARKER)[0]
        start = rng.randint(0, len(ids))
        end = rng.randint(start, len(ids))
        allowed = [e for e in exact_ends_by_hand(window.tolist(), start) if e <= end]
        assert exact_chunk_end(window, start, end) == max(allowed), (ids, start, end)


@pytest.mark.parametrize("marker", [PHI_MARKER, LLAMA_MARKER], ids=["one-token-marker", "three-token-marker"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("seed", range(25))
def test_dense_mask_matches_the_rule(seed, padding_side, marker):
    input_ids, valid = random_batch(seed, marker, padding_side)
    windows = mma_window_ids(input_ids, IMG, marker, valid.long())
    ours = dense_attention_mask(windows, valid.long())
    for row in range(input_ids.shape[0]):
        expected = reference_mask(input_ids[row].tolist(), valid[row].tolist(), marker)
        assert torch.equal(ours[row], expected), f"sample {row}: {input_ids[row].tolist()}"


def test_layouts_cover_the_cases_the_rule_names():
    """The random layouts above hold 0, 1 and 3 images, several turns and unclosed samples."""
    seen = set()
    for seed in range(25):
        rng = random.Random(seed)
        for _ in range(4):
            num_images, num_turns, closed = rng.choice([0, 1, 3]), rng.randint(1, 3), rng.random() > 0.25
            seen.add(("images", num_images))
            seen.add(("multi-turn", num_turns > 1))
            seen.add(("closed", closed))
            random_sample(rng, PHI_MARKER, num_images, num_turns, closed)
    assert {("images", 0), ("images", 1), ("images", 3), ("multi-turn", True), ("closed", False)} <= seen


def test_window_of_a_single_turn_by_hand():
    #        0  1  2  3    4    5    6   7   8  9  10 11
    ids = [[1, 6, 3, 3, 20, 21, 8, 7, 22, 2, 6, 23]]
    windows = mma_window_ids(torch.tensor(ids), IMG, PHI_MARKER)
    # Image tokens see "20 21 8" and the marker 7, never the answer 22, the eos or the next turn.
    assert windows[0].tolist() == [0, 0, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0]
    allowed = dense_attention_mask(windows)[0]
    assert allowed[2].tolist() == [True, True, True, False, True, True, True, True, False, False, False, False]
    assert allowed[3].tolist() == [True, True, True, True, True, True, True, True, False, False, False, False]
    assert torch.equal(allowed[4:], torch.ones(12, 12, dtype=torch.bool).tril()[4:])
    causal = dense_attention_mask(windows, policy="causal")[0]
    assert torch.equal(causal, torch.ones(12, 12, dtype=torch.bool).tril())


def test_each_image_sees_only_its_own_turn():
    #       img turn 1     q1  marker ans  img turn 2   q2  marker
    ids = [[3, 3, 20, 7, 21, 2, 6, 3, 3, 22, 7, 23]]
    windows = mma_window_ids(torch.tensor(ids), IMG, PHI_MARKER)
    assert windows[0].tolist() == [1, 1, -1, -1, 0, 0, 0, 2, 2, -2, -2, 0]


def test_two_images_in_one_turn_see_the_text_between_and_after_them():
    ids = [[3, 3, 20, 3, 3, 21, 7, 22]]
    allowed = dense_attention_mask(mma_window_ids(torch.tensor(ids), IMG, PHI_MARKER))[0]
    assert allowed[0].tolist() == [True, False, True, False, False, True, True, False]
    assert allowed[3].tolist() == [True, True, True, True, False, True, True, False]


def test_a_caption_without_assistant_header_is_causal():
    ids = torch.tensor([[1, 3, 3, 20, 21, 4, 2]])
    windows = mma_window_ids(ids, IMG, PHI_MARKER)
    assert windows.abs().sum() == 0
    assert token_roles(ids, IMG, windows)[0, 1:3].tolist() == [IMAGE_CAUSAL, IMAGE_CAUSAL]


def test_marker_detection_needs_the_whole_sequence():
    ids = torch.tensor([[9, 25, 10, 9, 24, 10, 9, 25]])
    assert find_marker_starts(ids, LLAMA_MARKER)[0].tolist() == [True] + [False] * 7


def test_roles():
    ids = torch.tensor([[0, 1, 3, 3, 20, 7, 21]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    windows = mma_window_ids(ids, IMG, PHI_MARKER, mask)
    roles = token_roles(ids, IMG, windows, mask)
    assert roles[0].tolist() == [PADDING, 0, IMAGE, IMAGE, QUESTION, QUESTION, 0]


def test_split_detection():
    windows = torch.tensor([[0, 1, 1, -1, -1, 0, 2, -2]])
    assert not window_split_at(windows, 1)  # before the image
    assert window_split_at(windows, 2)  # inside the image block
    assert window_split_at(windows, 3)  # between the image and its question
    assert window_split_at(windows, 4)  # inside the question
    assert not window_split_at(windows, 5)  # after the question
    assert window_split_at(windows, 7)
    assert not window_split_at(windows, 0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_transformers_mask_function_equals_dense(padding_side):
    """The or_mask_function through transformers' sdpa mask builder gives the dense mask."""
    input_ids, valid = random_batch(3, PHI_MARKER, padding_side)
    windows = mma_window_ids(input_ids, IMG, PHI_MARKER, valid.long())
    config = Phi3Config(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = "sdpa"
    embeds = torch.empty(*input_ids.shape, 0)
    mask = create_causal_mask(config, embeds, valid.long(), cache=None, or_mask_function=mma_mask_function(windows))
    expected = dense_attention_mask(windows, valid.long())
    rows_with_keys = expected.any(-1)
    assert torch.equal(mask[:, 0][rows_with_keys], expected[rows_with_keys])


def test_the_benchmarks_official_baseline_is_the_same_mask():
    """benchmarks/common.py re-states the official per-sample mask; with one image per row it equals ours."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from common import layout, official_mask, our_mask

    ids, valid = layout(3, 300)
    official = official_mask(ids, valid) == 0
    ours = our_mask(ids, valid)
    rows = valid.bool()
    assert torch.equal(official[:, 0][rows], ours[rows])


def test_the_worked_example_of_the_docstring_is_the_mask():
    """The matrix written out in aki.masking's docstring (and docs/mma.md) is what the code builds."""
    import aki.masking

    rows = [line.split() for line in aki.masking.__doc__.splitlines() if line.strip()[:2].strip().isdigit()]
    tokens = [row[1] for row in rows]
    vocabulary = {"<image>": IMG, "<|assistant|>": PHI_MARKER[0]}
    ids = torch.tensor([[vocabulary.get(token, TEXT_IDS[i]) for i, token in enumerate(tokens)]])
    windows = mma_window_ids(ids, IMG, PHI_MARKER)
    assert windows[0].tolist() == [int(row[2]) for row in rows]
    written = torch.tensor([[cell != "." for cell in row[3:]] for row in rows])
    opened = torch.tensor([[cell == "#" for cell in row[3:]] for row in rows])
    assert written.shape == (11, 11) and opened.sum() == 10
    assert torch.equal(dense_attention_mask(windows)[0], written)
    assert torch.equal(dense_attention_mask(windows, policy="causal")[0], written & ~opened)
