"""MMA on kernels that only know causal masks: the split path, attention implementation "aki_split".

MMA's mask is the causal mask plus one rectangle: image queries over the question keys after
them in their turn. The two key sets are disjoint, so attention over their union is exactly
the merge of two passes by log-sum-exp::

    l = log(exp(l_c) + exp(l_r)),    o = exp(l_c - l) * o_c + exp(l_r - l) * o_r

(o_c, l_c) from a causal pass over every query, (o_r, l_r) from a pass of image queries over
their question keys. Both run as variable-length ("varlen") kernels on unpadded tokens, so
padding and packed samples cost nothing. The backward gives each pass's kernel the *merged*
output and log-sum-exp, the global softmax statistics, and each returns exactly its share of
the gradients (ring attention merges blocks the same way).

Kernels: `FlashKernel` runs PyTorch's bundled FlashAttention-2 on CUDA (fp16/bf16); on other
devices `ReferenceKernel` does the same arithmetic densely, for CPU runs and for tests.

The layout (which tokens go where) is built once per forward by `split_layout` and reaches
every layer through the attention kwargs. The name has no "flash" in it on purpose:
transformers would then apply its own flash preprocessing, which knows nothing of MMA.

Shape legend: ``b`` batch, ``s`` query length, ``t`` key length, ``h`` heads, ``e`` head dim,
``T`` unpadded tokens (all queries or all keys of the batch), ``R`` tokens of the rectangle pass.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SPLIT_ATTENTION = "aki_split"


@dataclass(frozen=True)
class Segments:
    """Variable-length sequences packed end to end: sequence i owns rows cu[i]:cu[i + 1]."""

    cu_q: torch.Tensor  # (n + 1,) int32
    cu_k: torch.Tensor  # (n + 1,) int32
    max_q: int
    max_k: int


@dataclass(frozen=True)
class SplitLayout:
    """Where the two passes read and write, for one forward (every layer shares it).

    query_index (T_q,) and key_index (T_k,) pick the real tokens out of the flattened (b * s)
    queries and (b * t) keys; `causal` groups them per sample (a packed row holds several).
    rect_rows (R_q,) are the image queries among the T_q, rect_key_index (R_k,) their question
    keys in the flattened (b * t) keys, grouped per image block by `rectangle`.
    """

    batch: int
    query_length: int
    key_length: int
    query_index: torch.Tensor
    key_index: torch.Tensor
    causal: Segments
    rect_rows: torch.Tensor
    rect_key_index: torch.Tensor
    rectangle: Segments | None


def segments(counts_q: torch.Tensor, counts_k: torch.Tensor) -> Segments:
    """Segments from the number of queries and keys of each sequence, in packing order."""
    cu_q = F.pad(counts_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(counts_k.cumsum(0), (1, 0)).to(torch.int32)
    return Segments(cu_q, cu_k, int(counts_q.max()), int(counts_k.max()))


def split_layout(
    key_padding: torch.Tensor | None,
    batch: int,
    query_length: int,
    key_length: int,
    device: torch.device,
    window_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> SplitLayout:
    """The split path's layout; pure tensor work, no loop over tokens.

    key_padding (b, t): 1 for real keys (the 2D attention mask), or None. The queries are the
    last s of the t keys (a cache holds the t - s before them).
    window_ids (b, s): MMA window ids of the queries (`aki.masking`), or None for causal attention.
    document_ids (b, s): packed samples of a row (only without a cache: s == t).
    """
    past = key_length - query_length
    if key_padding is None:
        key_padding = torch.ones(batch, key_length, dtype=torch.bool, device=device)
    key_padding = key_padding[:, -key_length:].to(device=device, dtype=torch.bool)
    query_valid = key_padding[:, past:]
    rows = torch.arange(batch, device=device)

    # Causal pass: one sequence per (row, packed sample).
    if document_ids is not None:
        if past:
            raise ValueError("Packed samples (document_ids) cannot be combined with a cache.")
        documents = document_ids.long() - document_ids.min(dim=1, keepdim=True).values
        per_row = int(documents.max()) + 1
        query_group = rows[:, None] * per_row + documents
        key_group = query_group
    else:
        per_row = 1
        query_group = rows[:, None].expand(batch, query_length)
        key_group = rows[:, None].expand(batch, key_length)
    query_index = query_valid.flatten().nonzero().squeeze(1)
    key_index = key_padding.flatten().nonzero().squeeze(1)
    causal = segments(
        torch.bincount(query_group.flatten()[query_index], minlength=batch * per_row),
        torch.bincount(key_group.flatten()[key_index], minlength=batch * per_row),
    )
    rect_rows = rect_key_index = query_index.new_zeros(0)
    rectangle = None
    if window_ids is not None and (window_ids > 0).any():
        rect_rows, rect_key_index, rectangle = rectangle_layout(window_ids, query_valid, past, key_length)
    return SplitLayout(
        batch, query_length, key_length, query_index, key_index, causal, rect_rows, rect_key_index, rectangle
    )


def rectangle_layout(
    window_ids: torch.Tensor, query_valid: torch.Tensor, past: int, key_length: int
) -> tuple[torch.Tensor, torch.Tensor, Segments | None]:
    """The rectangle pass: (rect_rows, rect_key_index, segments), empty when no image has question keys.

    One sequence per image block (a run of image tokens of one window), whose keys are its
    window's question tokens after the block. Several images in one turn share the keys after the
    last of them, so those keys are gathered once per block. window_ids and query_valid are
    (b, s); rect_rows index the real queries in packing order, rect_key_index the flattened
    (b * t) keys.
    """
    query_length, device = window_ids.shape[1], window_ids.device
    flat = torch.where(query_valid, window_ids, 0).flatten()
    positions = torch.arange(flat.numel(), device=device)
    is_query = flat > 0
    previous = F.pad(flat[:-1], (1, 0))
    block_start = is_query & ((previous != flat) | (positions % query_length == 0))
    query_positions = is_query.nonzero().squeeze(1)
    blocks = (block_start.cumsum(0) - 1)[query_positions]
    num_blocks = int(block_start.sum())
    block_end = torch.zeros(num_blocks, dtype=torch.long, device=device).scatter_reduce_(
        0, blocks, query_positions, reduce="amax", include_self=False
    )

    # Question keys in position order: each (row, window) is one run of them.
    key_positions = (flat < 0).nonzero().squeeze(1)
    stride = int(flat.abs().max()) + 1
    window_of_key = (key_positions // query_length) * stride - flat[key_positions]
    window_of_block = (block_end // query_length) * stride + flat[block_end]
    run_end = torch.searchsorted(window_of_key, window_of_block, right=True)
    first_after = torch.searchsorted(key_positions, block_end, right=True)
    key_counts = (run_end - first_after).clamp(min=0)
    kept = key_counts > 0
    if not kept.any():
        return query_positions.new_zeros(0), query_positions.new_zeros(0), None
    keep_query = kept[blocks]
    rect_rows = (query_valid.flatten().long().cumsum(0) - 1)[query_positions[keep_query]]
    query_counts = torch.bincount(blocks[keep_query], minlength=num_blocks)[kept]
    key_counts, first_after = key_counts[kept], first_after[kept]
    starts = F.pad(key_counts.cumsum(0), (1, 0))[:-1]
    offsets = torch.arange(int(key_counts.sum()), device=device) - torch.repeat_interleave(starts, key_counts)
    chosen = key_positions[torch.repeat_interleave(first_after, key_counts) + offsets]
    rect_key_index = (chosen // query_length) * key_length + past + chosen % query_length
    return rect_rows, rect_key_index, segments(query_counts, key_counts)


class ReferenceKernel:
    """Varlen attention that returns the log-sum-exp, and its backward, in dense fp32 math.

    Same contract as `FlashKernel`: q (T_q, h, e), k and v (T_k, h, e); out (T_q, h, e) and
    lse (T_q, h) float32. `causal` aligns each sequence's last query with its last key.
    """

    @staticmethod
    def allowed(seg: Segments, total_q: int, total_k: int, causal: bool, window: int | None, device) -> torch.Tensor:
        """(T_q, T_k) bool: same sequence, and causal / sliding-window where asked."""
        cu_q, cu_k = seg.cu_q.long(), seg.cu_k.long()
        counts_q, counts_k = cu_q.diff(), cu_k.diff()
        sequence = torch.arange(len(counts_q), device=device)
        seq_q = torch.repeat_interleave(sequence, counts_q, output_size=total_q)
        seq_k = torch.repeat_interleave(sequence, counts_k, output_size=total_k)
        # Query positions counted in keys of their sequence (bottom-right alignment).
        pos_q = torch.arange(total_q, device=device) - cu_q[seq_q] + (counts_k - counts_q)[seq_q]
        pos_k = torch.arange(total_k, device=device) - cu_k[seq_k]
        allowed = seq_q[:, None] == seq_k[None, :]
        if causal:
            allowed &= pos_k[None, :] <= pos_q[:, None]
        if window is not None:
            allowed &= pos_q[:, None] - pos_k[None, :] < window
        return allowed

    @classmethod
    def forward(cls, q, k, v, seg: Segments, causal: bool, scale: float, window: int | None):
        allowed = cls.allowed(seg, q.shape[0], k.shape[0], causal, window, q.device)
        scores = torch.einsum("qhe,khe->hqk", q.float(), k.float()) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (h, T_q)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
        out = torch.einsum("hqk,khe->qhe", probs, v.float())
        return out.to(q.dtype), lse.transpose(0, 1).contiguous()

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, seg: Segments, causal: bool, scale: float, window: int | None):
        allowed = cls.allowed(seg, q.shape[0], k.shape[0], causal, window, q.device)
        q32, k32, v32, grad32 = q.float(), k.float(), v.float(), grad_out.float()
        scores = torch.einsum("qhe,khe->hqk", q32, k32) * scale
        probs = torch.exp(scores - lse.transpose(0, 1)[..., None]).masked_fill(~allowed, 0.0)
        grad_v = torch.einsum("hqk,qhe->khe", probs, grad32)
        grad_probs = torch.einsum("qhe,khe->hqk", grad32, v32)
        delta = (grad32 * out.float()).sum(-1).transpose(0, 1)  # (h, T_q)
        grad_scores = probs * (grad_probs - delta[..., None])
        grad_q = torch.einsum("hqk,khe->qhe", grad_scores, k32) * scale
        grad_k = torch.einsum("hqk,qhe->khe", grad_scores, q32) * scale
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class FlashKernel:
    """PyTorch's bundled FlashAttention-2, varlen, on CUDA; same contract as `ReferenceKernel`."""

    @staticmethod
    def _window(window: int | None) -> int:
        return window - 1 if window is not None else -1

    @classmethod
    def forward(cls, q, k, v, seg: Segments, causal: bool, scale: float, window: int | None):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, causal, False,
            scale=scale, window_size_left=cls._window(window), window_size_right=-1,
        )  # fmt: skip
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"Unexpected FlashAttention log-sum-exp layout {tuple(lse.shape)}; expected (h, T).")
        return out, lse.transpose(0, 1).contiguous()

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, seg: Segments, causal: bool, scale: float, window: int | None):
        unused = torch.empty(0, device=q.device)
        rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)  # dropout is 0: never read
        return torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse.transpose(0, 1).contiguous(), seg.cu_q, seg.cu_k,
            seg.max_q, seg.max_k, 0.0, causal, rng_state, unused,
            scale=scale, window_size_left=cls._window(window), window_size_right=-1,
        )  # fmt: skip


def kernel_for(device: torch.device):
    return FlashKernel if device.type == "cuda" else ReferenceKernel


class SplitAttention(torch.autograd.Function):
    """Causal pass + rectangle pass, merged by log-sum-exp; (T_q, h, e) out."""

    @staticmethod
    def forward(ctx, q, k, v, rect_q, rect_k, rect_v, layout: SplitLayout, scale: float, window: int | None):
        kernel = kernel_for(q.device)
        out, lse = kernel.forward(q, k, v, layout.causal, True, scale, window)
        if layout.rectangle is not None:
            rows = layout.rect_rows
            rect_out, rect_lse = kernel.forward(rect_q, rect_k, rect_v, layout.rectangle, False, scale, None)
            causal_lse = lse[rows]
            merged_lse = torch.logaddexp(causal_lse, rect_lse)
            merged = torch.exp(causal_lse - merged_lse)[..., None] * out[rows].float()
            merged = merged + torch.exp(rect_lse - merged_lse)[..., None] * rect_out.float()
            out, lse = out.index_copy(0, rows, merged.to(out.dtype)), lse.index_copy(0, rows, merged_lse)
        ctx.save_for_backward(q, k, v, rect_q, rect_k, rect_v, out, lse)
        ctx.layout, ctx.scale, ctx.window, ctx.kernel = layout, scale, window, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rect_q, rect_k, rect_v, out, lse = ctx.saved_tensors
        layout, kernel = ctx.layout, ctx.kernel
        grads = kernel.backward(grad_out, q, k, v, out, lse, layout.causal, True, ctx.scale, ctx.window)
        rect_grads = (None, None, None)
        if layout.rectangle is not None:
            rows = layout.rect_rows
            rect_grads = kernel.backward(
                grad_out[rows], rect_q, rect_k, rect_v, out[rows], lse[rows], layout.rectangle, False, ctx.scale, None
            )
        return (*grads, *rect_grads, None, None, None)


def split_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    aki_split_layout: SplitLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (b, h, s, e), key and value (b, h_kv, t, e) -> (b, s, h, e); the AttentionInterface entry."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layout = aki_split_layout
    if layout is None:
        # Unmasked bidirectional attention (the vision tower, the Perceiver) needs no layout.
        if getattr(module, "is_causal", False) or attention_mask is not None:
            raise ValueError(
                f"The '{SPLIT_ATTENTION}' attention needs the layout AkiModel builds (aki_split_layout); "
                "it cannot run a masked or causal module on its own."
            )
        return sdpa_attention_forward(module, query, key, value, None, scaling=scale, is_causal=False)
    if dropout:
        raise ValueError(f"The '{SPLIT_ATTENTION}' attention does not support attention dropout ({dropout}).")
    b, h, s, e = query.shape
    t = key.shape[2]
    if (b, s, t) != (layout.batch, layout.query_length, layout.key_length):
        raise ValueError(
            f"aki_split_layout was built for batch {layout.batch}, {layout.query_length} queries and "
            f"{layout.key_length} keys, but this layer sees {b}, {s} and {t}."
        )
    # Grouped key/value heads are repeated, so both kernels see plain multi-head attention.
    groups = h // key.shape[1]
    queries = query.transpose(1, 2).reshape(b * s, h, e)
    keys = key.repeat_interleave(groups, dim=1).transpose(1, 2).reshape(b * t, h, e)
    values = value.repeat_interleave(groups, dim=1).transpose(1, 2).reshape(b * t, h, e)
    q = queries[layout.query_index]
    k, v = keys[layout.key_index], values[layout.key_index]
    rect_q = q[layout.rect_rows]
    rect_k, rect_v = keys[layout.rect_key_index], values[layout.rect_key_index]
    window = sliding_window if sliding_window is not None and sliding_window < t else None
    out = SplitAttention.apply(q, k, v, rect_q, rect_k, rect_v, layout, scale, window)
    output = out.new_zeros(b * s, h, e).index_copy(0, layout.query_index, out)
    return output.view(b, s, h, e), None


AttentionInterface.register(SPLIT_ATTENTION, split_attention_forward)
