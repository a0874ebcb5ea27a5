"""The language model's attention under MMA, in the format its attention backend consumes.

`aki.masking` says which keys each query may see (window ids, pure tensor logic). This module
turns that into what the language model reads: transformers' own causal mask builders with MMA's
rectangle ORed on (sdpa, eager, flex_attention), or the layout of the `aki_split` attention.

Shape legend: ``b`` batch, ``s`` this forward's tokens, ``past`` cached tokens.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_masks_for_generate,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.utils.generic import is_flash_attention_requested

from .configuration_aki import AkiConfig
from .masking import absolute_window_ids, mma_mask_function, mma_window_ids
from .split_attention import SPLIT_ATTENTION, split_layout


def is_prepared_mask(attention_mask) -> bool:
    """True for a mask already in a backend's format (built by `generate` for static caches)."""
    if isinstance(attention_mask, (BlockMask, dict)):
        return True
    return isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4


def create_mma_mask(
    text_config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    window_ids: torch.Tensor,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | BlockMask | dict:
    """The causal mask(s) of the language model with the MMA rectangle opened.

    transformers' per-layer-type builder picks full, sliding-window or a mapping of both from the
    text config, exactly as the language model would for a causal mask.
    `window_ids` (b, past + s) are indexed by absolute position. They are padded with zeros up to
    the last key index the mask builder asks about (the whole buffer of a static cache).
    `document_ids` (b, s) keep the packed samples of a row apart.
    """
    query_length = inputs_embeds.shape[1]
    kv_length, kv_offset = cache.get_mask_sizes(query_length, 0) if cache is not None else (query_length, 0)
    missing = kv_offset + kv_length - window_ids.shape[-1]
    if missing > 0:
        window_ids = F.pad(window_ids, (0, missing))
    # position_ids=None: transformers would otherwise read packed positions and remap the indices
    # our overlay receives (packing is handled here, per sample, by `document_ids`).
    return create_masks_for_generate(
        config=text_config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=None,
        or_mask_function=mma_mask_function(window_ids),
        and_mask_function=packed_sequence_mask_function(document_ids) if document_ids is not None else None,
    )


def create_language_model_attention(
    config: AkiConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
    mma_window_ids_from_start: torch.Tensor | None = None,
) -> dict:
    """The keyword arguments that carry MMA into the language model's forward.

    Returns ``{"attention_mask": ...}``: the MMA mask when this forward holds an image with an
    open window, else the caller's mask unchanged (decode steps keep the backend's causal fast
    path). Under the `aki_split` attention it also holds ``"aki_split_layout"``, read by every layer.

    input_ids (b, s), or None when only `inputs_embeds` (b, s, d) are given.
    attention_mask (b, past + s) padding mask, or a prepared 4D mask (left as it is).
    mma_window_ids_from_start (b, >= past + s): window ids from the start of the sequence, as
    `generate` passes them; computed from this chunk's `input_ids` when None.
    """
    batch, query_length = inputs_embeds.shape[:2]
    past_length = cache.get_seq_length() if cache is not None else 0
    mma = config.attention_policy == "mma" and not is_prepared_mask(attention_mask)
    split = config.text_config._attn_implementation == SPLIT_ATTENTION
    # Packed samples (position ids restarting inside a row), as transformers detects them.
    document_ids = None
    if (mma or split) and position_ids is not None and attention_mask is None and past_length == 0:
        document_ids = find_packed_sequence_indices(position_ids.expand(batch, -1))

    window_ids = None
    if mma:
        if mma_window_ids_from_start is None:
            if input_ids is None:
                raise ValueError(
                    "attention_policy='mma' needs input_ids (or mma_window_ids) to find images and questions; "
                    "pass input_ids, or load the model with attention_policy='causal'."
                )
            chunk_mask = attention_mask[:, -query_length:] if attention_mask is not None else None
            mma_window_ids_from_start = mma_window_ids(
                input_ids, config.image_token_id, config.assistant_marker_ids, chunk_mask, document_ids
            )
        window_ids = absolute_window_ids(mma_window_ids_from_start, past_length, query_length)

    if split:
        if (cache is not None and cache.is_compileable) or is_prepared_mask(attention_mask):
            raise ValueError(
                f"The '{SPLIT_ATTENTION}' attention takes a 2D padding mask and a dynamic cache, "
                "not a prepared 4D mask or a static cache."
            )
        layout = split_layout(
            attention_mask,
            batch,
            query_length,
            past_length + query_length,
            inputs_embeds.device,
            window_ids[:, past_length:] if window_ids is not None else None,
            document_ids,
        )
        return {"attention_mask": attention_mask, "aki_split_layout": layout}

    if window_ids is not None and (window_ids[:, past_length:] > 0).any():
        if is_flash_attention_requested(config.text_config):
            raise ValueError(
                "The language model runs flash attention, whose mask builder ignores MMA's rectangle: "
                "use 'sdpa', 'eager' or 'flex_attention' for the text model, or attention_policy='causal'."
            )
        attention_mask = create_mma_mask(
            config.text_config, inputs_embeds, attention_mask, cache, window_ids, document_ids
        )
    return {"attention_mask": attention_mask}
