"""The plugin's start-up check: MMA through the real attention layer against a dense reference.

Nobody here can run the plugin on every backend and machine it may meet, so it checks itself where
it runs. At engine start the model calls `check_mma_attention` with one of its rebuilt attention
layers: a synthetic batch goes through that layer's own metadata builder, cache writer and
implementation, the planner included, in two steps (a text prefix, then the rest of that request
beside a whole second request, so the paged-cache read-back runs too). Every row of the second step
is compared with dense attention computed in torch from the same q/k/v under MMA's mask
(`aki.masking.dense_attention_mask`). Beyond the tolerance of the model's dtype the engine refuses
to start, in one line naming the backend and the error.

Shape legend: ``s`` tokens of a request, ``h`` query heads, ``g`` key/value heads, ``e`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.platforms import current_platform
from vllm.v1.attention.backend import CommonAttentionMetadata

from ..masking import dense_attention_mask, mma_window_ids
from .attention import MmaPlanner, SlotTokens, slots_of

# Largest difference from the dense reference accepted, per dtype (float32: the two sum in another order).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
TEXT_ID = 1  # any id that is neither an image nor part of the assistant header


class SelfCheckError(RuntimeError):
    """The attention backend does not give image rows what dense MMA gives them."""


def synthetic_prompts(image_token_id: int, marker_ids: list[int], block_size: int) -> list[list[int]]:
    """Two prompts: a block of text, an image, its question, the assistant header and an answer token;
    the second the same without the text block."""
    text = [TEXT_ID if TEXT_ID not in (image_token_id, *marker_ids) else max(image_token_id, *marker_ids) + 1]
    turn = [image_token_id] * 4 + text * 3 + list(marker_ids) + text
    return [text * block_size + turn, text * 2 + turn]


def check_mma_attention(layer, planner: MmaPlanner, vllm_config: VllmConfig) -> float:
    """The largest difference from dense MMA; raises `SelfCheckError` beyond `TOLERANCE`, or when the
    check cannot run on this backend (it fails closed)."""
    backend = layer.attn_backend.get_name()
    try:
        output, expected, dtype = run_check(layer, planner, vllm_config)
    except Exception as error:  # a backend this check cannot drive is not one MMA is known to be exact on
        raise SelfCheckError(
            f"AKI's MMA self-check could not run on vLLM's {backend} attention backend "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); refusing to start."
        ) from error
    error = (output.float().cpu() - expected).abs().max().item()
    if not error <= TOLERANCE[dtype]:
        raise SelfCheckError(
            f"AKI's MMA self-check failed on vLLM's {backend} attention backend: image rows differ from dense MMA "
            f"by {error:.3g} (tolerance {TOLERANCE[dtype]:g} in {dtype}); refusing to start."
        )
    return error


def run_check(layer, planner: MmaPlanner, vllm_config: VllmConfig) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The layer's output for the synthetic batch's last step, dense MMA's (float32, CPU), and the dtype."""
    dtype = vllm_config.model_config.dtype
    device = torch.device(current_platform.device_type)
    block_size = planner.block_size
    prompts = synthetic_prompts(planner.image_token_id, planner.assistant_marker_ids, block_size)
    blocks = [(len(prompt) + block_size - 1) // block_size for prompt in prompts]
    # Request r owns blocks [sum(blocks[:r]), ...), laid out back to front to catch an indexing slip.
    block_table = torch.zeros(2, max(blocks), dtype=torch.int32)
    block_table[0, : blocks[0]] = torch.arange(blocks[0]).flip(0) + blocks[1]
    block_table[1, : blocks[1]] = torch.arange(blocks[1])
    kv_cache = torch.zeros(sum(blocks), layer.num_kv_heads, block_size, 2 * layer.head_size, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(0)
    qkv = [
        [torch.randn(len(prompt), heads, layer.head_size, generator=generator).to(dtype) for prompt in prompts]
        for heads in (layer.num_heads, layer.num_kv_heads, layer.num_kv_heads)
    ]
    builder = layer.attn_backend.get_builder_cls()(
        layer.get_kv_cache_spec(vllm_config), [layer.layer_name], vllm_config, device
    )
    # Step 1: the first prompt's text block alone. Step 2: its rest, and the whole second prompt.
    steps = [[(0, 0, block_size)], [(0, block_size, len(prompts[0])), (1, 0, len(prompts[1]))]]
    saved_slot_tokens, planner.slot_tokens = planner.slot_tokens, SlotTokens()
    try:
        for step in steps:
            output = run_step(layer, builder, planner, vllm_config, prompts, qkv, kv_cache, block_table, step, device)
    finally:
        planner.slot_tokens = saved_slot_tokens
    expected = torch.cat([dense_mma(prompts[r], qkv, r, start, end, planner, layer) for r, start, end in steps[-1]])
    return output, expected, dtype


def run_step(layer, builder, planner, vllm_config, prompts, qkv, kv_cache, block_table, step, device) -> torch.Tensor:
    """One engine step over `step`'s (request, start, end) spans through the layer's backend: outputs (tokens, h, e)."""
    block_size = planner.block_size
    ids, slots, query, key, value = [], [], [], [], []
    for request, start, end in step:
        ids.append(torch.tensor(prompts[request][start:end]))
        slots.append(slots_of(block_table[request], end, block_size)[start:end])
        for part, tensors in zip((query, key, value), qkv, strict=True):
            part.append(tensors[request][start:end])
    ids, slots, query, key, value = (torch.cat(part).to(device) for part in (ids, slots, query, key, value))
    query_lens = torch.tensor([end - start for _, start, end in step], dtype=torch.int32)
    starts = F.pad(query_lens.cumsum(0), (1, 0)).to(torch.int32)
    seq_lens = torch.tensor([end for _, _, end in step], dtype=torch.int32)
    requests = [request for request, _, _ in step]
    common = CommonAttentionMetadata(
        query_start_loc=starts.to(device),
        query_start_loc_cpu=starts,
        seq_lens=seq_lens.to(device),
        num_reqs=len(step),
        num_actual_tokens=len(ids),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table[requests].to(device),
        slot_mapping=slots,
        is_prefilling=torch.ones(len(step), dtype=torch.bool, device=device),
    )
    metadata = builder.build(0, common)
    output = torch.empty_like(query)
    with set_forward_context({layer.layer_name: metadata}, vllm_config):
        planner.plan(ids)
        layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
        layer.impl.forward(layer, query, key, value, kv_cache, metadata, output)
    return output


def dense_mma(prompt: list[int], qkv, request: int, start: int, end: int, planner, layer) -> torch.Tensor:
    """Rows start..end-1 of one prompt under dense MMA attention, float32, (end - start, h, e)."""
    query, key, value = (tensors[request].float().transpose(0, 1) for tensors in qkv)  # (heads, s, e)
    window = mma_window_ids(torch.tensor([prompt]), planner.image_token_id, planner.assistant_marker_ids)
    allowed = dense_attention_mask(window)[0]
    rows = F.scaled_dot_product_attention(
        query[:, start:end], key, value, attn_mask=allowed[start:end], scale=layer.impl.scale, enable_gqa=True
    )
    return rows.transpose(0, 1)
