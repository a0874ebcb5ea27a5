"""Exact modality-mutual attention inside vLLM's paged attention, on vLLM's CPU backend.

vLLM's CPU kernel (`CPU_ATTN`) computes causal attention and returns no log-sum-exp, so the MMA
rectangle cannot be merged into its output. Instead, per attention layer and step:

1. the normal causal kernel runs for every token of the batch (decodes, prefills, text rows);
2. the rows of image tokens whose turn is closed in this step are computed again, densely, over
   the keys they may see under MMA (everything causal plus their question, `aki.masking`), and
   overwrite the causal rows.

The keys and values of this step were written to the paged cache before attention runs, so
the cache is already right for later steps; only the image rows' outputs change.

Which rows to redo is worked out once per step, outside the compiled language model, by
`MmaPlanner.plan` (the model's forward calls it with the step's token ids). A request's history,
a cached prefix included, is read back from `SlotTokens`, the token id written at each KV-cache
slot, through the request's block table.

A prefill may start inside an image's window in two ways. A prefix-cache hit: the cached image
rows were computed with this very window (the image's cache identifier covers its window,
`aki.vllm_plugin.model.window_identifiers`), so they are exact and the rest of the window is
computed here. A chunk edge: the image rows were computed before their question arrived, which
cannot be repaired. `SlotTokens` records, per slot, whether an image row was computed with its
window, and the planner refuses the second case (`PromptSplitError`); AKI's scheduler
(`aki.vllm_plugin.scheduler`) never ends a chunk inside a window, so it is a safety net.

Shape legend: ``n`` image rows of one request, ``t`` keys they see, ``h`` query heads,
``g`` key/value heads, ``e`` head dim, ``s`` tokens in the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ..masking import PromptSplitError, mma_window_ids


@dataclasses.dataclass
class ImageRows:
    """The image queries of one request in this step and the keys they may see.

    `rows` index the step's flattened tokens; keys are the request's positions ``0..t-1``, of
    which those before `context` are read from the paged cache and the rest from this step.
    """

    rows: torch.Tensor  # (n,) token indices in the step
    allowed: torch.Tensor  # (n, t) bool: MMA's mask over positions 0..t-1
    block_table: torch.Tensor  # (blocks,) the request's row of the block table
    context: int  # positions already in the cache before this step
    step_start: int  # index of the request's first token of this step


class SlotTokens:
    """The token id written at each KV-cache slot, so a request's whole history can be read back
    through its block table (a cached prefix included), and whether an image token there was
    computed with its MMA window (False for anything else)."""

    def __init__(self) -> None:
        self.ids = torch.empty(0, dtype=torch.long)
        self.with_window = torch.empty(0, dtype=torch.bool)

    def write(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        valid = slots >= 0  # padding tokens have no slot
        slots, token_ids = slots[valid].long(), token_ids[valid]
        if slots.numel() and int(slots.max()) >= self.ids.numel():
            grow = int(slots.max()) + 1 - self.ids.numel()
            self.ids = torch.cat([self.ids, self.ids.new_full((grow,), -1)])
            self.with_window = torch.cat([self.with_window, self.with_window.new_zeros(grow)])
        self.ids[slots] = token_ids.to(self.ids.device, torch.long)
        self.with_window[slots] = False


def slots_of(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """KV-cache slots of positions 0..length-1 of one request, (length,)."""
    positions = torch.arange(length)
    return block_table[positions // block_size].long() * block_size + positions % block_size


class MmaPlanner:
    """Works out, once per step, which image rows each attention layer must recompute."""

    def __init__(self, image_token_id: int, assistant_marker_ids: Sequence[int], block_size: int) -> None:
        self.image_token_id = image_token_id
        self.assistant_marker_ids = list(assistant_marker_ids)
        self.block_size = block_size
        self.layer_name: str | None = None  # any language-model attention layer: they share metadata
        self.slot_tokens = SlotTokens()
        self.image_rows: list[ImageRows] = []
        self.derived: dict[str, object] = {}  # what a backend builds once per step from image_rows

    def once(self, name: str, build) -> object:
        """`build(image_rows)`, computed by the first layer of the step that asks and kept for the others."""
        if name not in self.derived:
            self.derived[name] = build(self.image_rows)
        return self.derived[name]

    def plan(self, input_ids: torch.Tensor | None) -> None:
        """Read this step's batch from vLLM's forward context and record the image rows to redo."""
        self.image_rows, self.derived = [], {}
        metadata = get_forward_context().attn_metadata
        if not metadata:  # a run without attention metadata (vLLM's warm-up) has nothing to fix
            return
        if not isinstance(metadata, dict):
            raise NotImplementedError("AKI's MMA does not support micro-batched steps (dual-batch overlap).")
        metadata = metadata[self.layer_name]
        if input_ids is None:
            raise ValueError("AKI's MMA needs the step's token ids (requires_raw_input_tokens).")
        # The plan is made on the CPU whatever the device (a GPU backend moves what it needs).
        num_tokens = metadata.num_actual_tokens
        self.slot_tokens.write(metadata.slot_mapping[:num_tokens].cpu(), input_ids[:num_tokens].cpu())
        prefilling = metadata.is_prefilling
        num_requests = metadata.seq_lens.shape[0]
        if prefilling is None:
            raise ValueError("vLLM gave no is_prefilling flags; AKI's MMA cannot tell prefills from decodes.")
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        for request in prefilling[:num_requests].cpu().nonzero().flatten().tolist():
            rows = self._request_rows(request, starts, seq_lens, metadata.block_table[request].cpu())
            if rows is not None:
                self.image_rows.append(rows)

    def _request_rows(self, request: int, starts: list[int], seq_lens: list[int], block_table) -> ImageRows | None:
        start, end, length = starts[request], starts[request + 1], seq_lens[request]
        context = length - (end - start)
        slots = slots_of(block_table, length, self.block_size)
        history = self.slot_tokens.ids[slots]
        if not (history == self.image_token_id).any():
            return None
        window = mma_window_ids(history[None], self.image_token_id, self.assistant_marker_ids)[0]
        # Image rows before this step whose question reaches into it must have been computed with it.
        reaching = torch.isin(-window[:context], window[context:]) & (window[:context] > 0)
        if not self.slot_tokens.with_window[slots[:context][reaching]].all():
            raise PromptSplitError(
                f"A prefill of {end - start} tokens starts at position {context}, inside an image's MMA window "
                "(its image was computed in an earlier step without its question): AKI needs each image, its "
                "question and the assistant header in one prefill. Serve it with AKI's scheduler (the plugin "
                "sets it unless --scheduler-cls names another) or --no-enable-chunked-prefill."
            )
        image = (window[context:] > 0).nonzero().flatten()
        if image.numel() == 0:
            return None
        positions = context + image
        self.slot_tokens.with_window[slots[positions]] = True
        own = window[positions]
        question = window[None, :] == -own[:, None]  # (n, length)
        last_key = int(question.nonzero()[:, 1].max()) + 1
        keys = torch.arange(last_key)
        allowed = (keys[None, :] <= positions[:, None]) | question[:, :last_key]
        return ImageRows(start + image, allowed, block_table, context, start)


@dataclasses.dataclass
class MmaCPUAttentionMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus which requests are still prefilling (not decoding)."""

    is_prefilling: torch.Tensor | None = None


def with_prefill_flags(metadata_cls: type, metadata, common_attn_metadata):
    """`metadata` as `metadata_cls` (its subclass with `is_prefilling`), flags taken from the step's common metadata."""
    fields = {field.name: getattr(metadata, field.name) for field in dataclasses.fields(metadata)}
    return metadata_cls(**fields, is_prefilling=common_attn_metadata.is_prefilling)


class MmaCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> MmaCPUAttentionMetadata:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_prefill_flags(MmaCPUAttentionMetadata, metadata, common_attn_metadata)


def cpu_attn_halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's cache (blocks, g, block, 2e) as keys and values, each indexed (blocks, g, block, e).

    The halves are sliced as CPU_ATTN's own forward slices them; its vec kernels store each block's
    keys transposed, (e, block), and its values as they are (read off `cpu_attn_reshape_and_cache`,
    vLLM 0.32.0). `image_keys_and_values` checks this on every read, so another layout is refused.
    """
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    blocks, heads = key_cache.stride()[:2]
    keys = key_cache.as_strided(key_cache.shape, (blocks, heads, 1, block_size), key_cache.storage_offset())
    return keys, value_cache


def gather_cached(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0..length-1 of one request from one half of the cache (`cpu_attn_halves`), (length, g, e)."""
    block_size = cache.shape[2]
    positions = torch.arange(length)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, :, positions % block_size]


class MmaCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's causal kernel, then the planned image rows overwritten with MMA (module docstring)."""

    def __init__(self, *args, mma_planner: MmaPlanner, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mma_planner = mma_planner

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if attn_metadata is None:
            return output
        block_size = kv_cache.shape[2]
        if block_size != self.mma_planner.block_size:
            raise ValueError(f"KV cache blocks of {block_size}; AKI's MMA planned {self.mma_planner.block_size}.")
        key_cache, value_cache = cpu_attn_halves(kv_cache)
        for image in self.mma_planner.image_rows:
            keys, values = image_keys_and_values(image, key, value, key_cache, value_cache)
            output[image.rows] = mma_rows(query[image.rows], keys, values, image.allowed, self.scale).to(output.dtype)
        return output


def image_keys_and_values(image: ImageRows, key, value, key_cache, value_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (t, g, e) of positions 0..t-1 for `image`'s rows: this step's from `key`/`value`,
    earlier ones (a causal prefix cached before the image) read back from the paged cache.

    Reading back is checked on this step's own positions, which the cache holds too: a cache layout
    other than the one `gather_cached` reads is refused rather than read wrong."""
    length = image.allowed.shape[1]
    fresh = slice(image.step_start, image.step_start + length - image.context)
    if image.context == 0:
        return key[fresh], value[fresh]
    keys = gather_cached(key_cache, image.block_table, length)
    if not torch.equal(keys[image.context :], key[fresh].to(keys.dtype)):
        raise NotImplementedError(
            "AKI's MMA cannot read keys back from this CPU_ATTN cache layout (not its vec kernels'), so it "
            "cannot serve an image after a cached prefix here."
        )
    values = gather_cached(value_cache, image.block_table, length)
    return torch.cat([keys[: image.context], key[fresh]]), torch.cat([values[: image.context], value[fresh]])


def mma_rows(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense attention of image rows: query (n, h, e), keys and values (t, g, e), allowed (n, t) -> (n, h, e)."""
    output = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        keys.transpose(0, 1)[None].to(query.dtype),
        values.transpose(0, 1)[None].to(query.dtype),
        attn_mask=allowed[None, None],
        scale=scale,
        enable_gqa=True,
    )
    return output[0].transpose(0, 1)


class MmaCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with AKI's image rows: the same cache, kernel and name, another implementation."""

    @staticmethod
    def get_impl_cls() -> type[MmaCPUAttentionImpl]:
        return MmaCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MmaCPUAttentionMetadataBuilder]:
        return MmaCPUAttentionMetadataBuilder
