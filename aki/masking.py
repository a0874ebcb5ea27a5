"""Modality-mutual attention (MMA) masks, as pure functions.

The rule (docs/mma.md), per sample, with ``True`` meaning "query q may attend key k"::

    allowed[q, k] = key_valid[k] and (k <= q or (is_image[q] and question_of(q)[k]))

``question_of(q)`` holds the text tokens of the user turn that contains q's image, from the
first token after the image block up to and including the first token of the assistant header
that closes the turn. A turn that is never closed by an assistant header (a caption) opens
nothing, so it stays causal.

A one-image prompt with two image tokens (``1`` allowed, ``.`` blocked; rows are queries,
columns keys; ``w`` the window ids below). MMA opens the ``#`` cells: the image sees its question,
``<|assistant|>`` included, but not the answer; images stay causal among themselves::

                       w   0 1 2 3 4 5 6 7 8 9 10
     0 <s>             0   1 . . . . . . . . . .
     1 <|user|>        0   1 1 . . . . . . . . .
     2 <image>        +1   1 1 1 . # # # # # . .
     3 <image>        +1   1 1 1 1 # # # # # . .
     4 What           -1   1 1 1 1 1 . . . . . .
     5 colour         -1   1 1 1 1 1 1 . . . . .
     6 ?              -1   1 1 1 1 1 1 1 . . . .
     7 <|end|>        -1   1 1 1 1 1 1 1 1 . . .
     8 <|assistant|>  -1   1 1 1 1 1 1 1 1 1 . .
     9 Red             0   1 1 1 1 1 1 1 1 1 1 .
    10 <|endoftext|>   0   1 1 1 1 1 1 1 1 1 1 1

Everything here is described by one integer tensor, the *window ids* ``w`` of shape (b, s):

* ``w > 0``  an image token whose turn is closed: it may see the question keys of window ``w``;
* ``w < 0``  a question token of window ``-w``;
* ``w == 0`` anything else (text outside a window, padding, images of unclosed turns).

Window ids are unique per row (the turn index plus one), so several images and several turns
need no Python loop: image query q sees key k iff ``w[q] > 0 and w[k] == -w[q]``. Everything
before q is visible anyway, so the rectangle only matters for keys after q.

Shape legend: ``b`` batch, ``s`` sequence (query) length, ``t`` key length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

AttentionPolicy = Literal["mma", "causal"]  # the one definition; configs and command lines read it from here
ATTENTION_POLICIES: tuple[str, ...] = get_args(AttentionPolicy)

# Token roles, as returned by `token_roles` (`aki.attention_maps.render_mask` draws them).
OTHER, IMAGE, QUESTION, IMAGE_CAUSAL, PADDING = 0, 1, 2, 3, 4
ROLE_NAMES = {
    OTHER: "text",
    IMAGE: "image (sees its question)",
    QUESTION: "question (visible to its image)",
    IMAGE_CAUSAL: "image (causal: no assistant header)",
    PADDING: "padding",
}


class PromptSplitError(ValueError):
    """A forward holds only part of an image's MMA window: the rest is cached or still to come."""


def check_policy(policy: str) -> None:
    if policy not in ATTENTION_POLICIES:
        raise ValueError(f"Unknown attention_policy {policy!r}; expected one of {ATTENTION_POLICIES}.")


def find_marker_starts(input_ids: torch.Tensor, marker_ids: Sequence[int]) -> torch.Tensor:
    """Where the token sequence `marker_ids` starts, as a bool (b, s) tensor.

    Loops over the marker's length (one token for Phi-3's ``<|assistant|>``, three for Llama-3's
    ``<|start_header_id|>assistant<|end_header_id|>``), never over the sequence.
    """
    if len(marker_ids) == 0:
        raise ValueError("The assistant marker needs at least one token id.")
    hits = input_ids == marker_ids[0]
    for offset, token_id in enumerate(marker_ids[1:], start=1):
        shifted = F.pad(input_ids, (0, offset), value=-1)[..., offset:]
        hits &= shifted == token_id
    return hits


def mma_window_ids(
    input_ids: torch.Tensor,
    image_token_id: int,
    assistant_marker_ids: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed window ids (b, s) of the MMA rule; see the module docstring.

    Args:
        input_ids: (b, s) token ids with every image already expanded to its placeholder tokens.
        image_token_id: the placeholder id.
        assistant_marker_ids: the token ids of the assistant header; its first token closes a turn
            and is the last key of the window (inclusive, as the official checkpoint was trained).
        attention_mask: optional (b, s) padding mask; padded tokens never join a window.
        document_ids: optional (b, s) ids of packed samples; a sample's end also ends its turn,
            so an image is never closed by the next sample's assistant header.
    """
    is_image = input_ids == image_token_id
    is_marker = find_marker_starts(input_ids, assistant_marker_ids).long()
    # A token's turn counts the assistant markers before it (a marker closes its own turn) and the
    # packed samples that started at or before it.
    turn = is_marker.cumsum(-1) - is_marker
    if document_ids is not None:
        starts = F.pad(document_ids[..., 1:] != document_ids[..., :-1], (1, 0), value=False).long()
        turn = turn + starts.cumsum(-1)
    # A turn is closed when it holds a marker.
    closed_turns = torch.zeros(turn.shape[0], int(turn.max()) + 2, dtype=torch.bool, device=turn.device)
    closed_turns.scatter_(1, torch.where(is_marker.bool(), turn, turn.new_full((), closed_turns.shape[1] - 1)), True)
    closed_turns[:, -1] = False
    closed = closed_turns.gather(1, turn)
    # The turn of the latest image at or before each position: equals `turn` once the turn has shown an image.
    latest_image_turn = torch.where(is_image, turn, torch.full_like(turn, -1)).cummax(-1).values
    after_image = latest_image_turn == turn
    window = turn + 1
    image_queries = is_image & closed
    question_keys = ~is_image & after_image & closed
    if attention_mask is not None:
        question_keys &= attention_mask.bool()
    zeros = torch.zeros_like(window)
    return torch.where(image_queries, window, torch.where(question_keys, -window, zeros))


def token_roles(
    input_ids: torch.Tensor,
    image_token_id: int,
    window_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token roles (b, s): OTHER, IMAGE, QUESTION, IMAGE_CAUSAL or PADDING."""
    roles = torch.full_like(input_ids, OTHER)
    roles[window_ids < 0] = QUESTION
    roles[input_ids == image_token_id] = IMAGE_CAUSAL
    roles[window_ids > 0] = IMAGE
    if attention_mask is not None:
        roles[~attention_mask.bool()] = PADDING
    return roles


def mma_mask_function(window_ids: torch.Tensor) -> Callable:
    """The rectangle of MMA as a transformers mask function, to OR onto a causal mask.

    `window_ids` must be indexed by absolute position and cover every key index the mask asks
    about (pad it with zeros up to the cache length for static caches).
    """

    def image_sees_its_question(batch_idx, head_idx, q_idx, kv_idx):
        query_window = window_ids[batch_idx, q_idx]
        return (query_window > 0) & (window_ids[batch_idx, kv_idx] == -query_window)

    return image_sees_its_question


def dense_attention_mask(
    window_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    policy: AttentionPolicy = "mma",
) -> torch.Tensor:
    """The full boolean mask (b, s, s), True where attention is allowed.

    Padded query rows keep nothing but what their row allows; callers that feed this to a kernel
    must handle rows without any valid key (transformers' mask builders do).
    """
    check_policy(policy)
    b, s = window_ids.shape
    positions = torch.arange(s, device=window_ids.device)
    causal = positions[None, :] <= positions[:, None]
    if attention_mask is None:
        allowed = causal.expand(b, s, s).clone()
    else:
        allowed = causal[None] & attention_mask.bool()[:, None, :]
    if policy == "mma":
        # Only image rows change: open each one's question columns, (rows, s) instead of (b, s, s).
        batch_index, query_index = (window_ids > 0).nonzero(as_tuple=True)
        rows = window_ids[batch_index] == -window_ids[batch_index, query_index][:, None]
        if attention_mask is not None:
            rows &= attention_mask.bool()[batch_index]
        allowed[batch_index, query_index] |= rows
    return allowed


def window_split_at(window_ids: torch.Tensor, boundary: int) -> bool:
    """True if an image before `boundary` has question keys at or after it.

    When a forward ends at `boundary` (a cache or chunk edge), such an image's keys and values
    are computed without its whole question, which MMA cannot repair later.
    """
    if boundary <= 0 or boundary >= window_ids.shape[-1]:
        return False
    num_windows = int(window_ids.abs().max())
    if num_windows == 0:
        return False
    b = window_ids.shape[0]
    cached, new = window_ids[:, :boundary], window_ids[:, boundary:]
    cached_images = torch.zeros(b, num_windows + 1, dtype=torch.bool, device=window_ids.device)
    new_questions = torch.zeros_like(cached_images)
    cached_images.scatter_(1, cached.clamp(min=0), True)
    new_questions.scatter_(1, (-new).clamp(min=0), True)
    return bool((cached_images[:, 1:] & new_questions[:, 1:]).any())


def exact_chunk_end(window_ids: torch.Tensor, start: int, end: int) -> int:
    """The furthest end, at most `end`, at which a forward over positions [start, end) of one sequence
    computes every image row in it with its whole question: no image row before the end whose window
    has keys at or after it. `start` when even the first image of the chunk cannot be finished within
    `end` (the chunk must then wait or grow).

    `window_ids` (s,) are the whole sequence's as far as it is known (a chunk scheduler's prompt).
    Windows are turns, in order, so only the last window with an image row in the chunk can reach
    past its end; the chunk is cut back to that window's first image row in it.
    """
    images = (window_ids[start:end] > 0).nonzero().flatten()
    if images.numel() == 0:
        return end
    last = int(window_ids[start + int(images[-1])])
    keys = (window_ids == -last).nonzero().flatten()
    if keys.numel() == 0 or int(keys[-1]) < end:
        return end
    return start + int((window_ids[start:end] == last).nonzero()[0])


def absolute_window_ids(window_ids: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor:
    """Window ids indexed by absolute position, (b, past + s), checked for a split prompt.

    `window_ids` hold either the whole sequence from its start (length >= past + s, as `generate`
    passes them) or this chunk alone (length s). From the start, they reveal an image whose
    question lies on the other side of the cache boundary or of the chunk's end. For a chunk
    alone, the cached tokens are unknown and count as text.
    """
    end = past_length + query_length
    if window_ids.shape[-1] < end:
        if window_ids.shape[-1] != query_length:
            raise ValueError(
                f"mma_window_ids has length {window_ids.shape[-1]}; expected the whole sequence "
                f"(>= {end}) or this chunk ({query_length})."
            )
        return F.pad(window_ids, (past_length, 0))
    for boundary in (past_length, end):
        if window_split_at(window_ids, boundary):
            raise PromptSplitError(
                f"An image and its question are split at position {boundary} (cache holds {past_length} "
                f"tokens, this forward {query_length}). MMA lets image tokens see their question, so the "
                "image, its question and the assistant header must be encoded in one forward: prefill them "
                "together (no prefill chunking, no cache ending between an image and its question)."
            )
    return window_ids[:, :end]
