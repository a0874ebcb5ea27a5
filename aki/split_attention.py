"""MMA on kernels that only know causal masks: the split path, attention implementation "aki_split".

MMA's mask is the causal mask plus one rectangle: image queries over the question keys after
them in their turn. The two key sets are disjoint, so attention over their union is exactly
the merge of two passes by log-sum-exp::

    l = log(exp(l_c) + exp(l_r)),    o = exp(l_c - l) * o_c + exp(l_r - l) * o_r

(o_c, l_c) from a causal pass over every query, (o_r, l_r) from a pass of image queries over
their question keys. The backward gives each pass's kernel the *merged* output and log-sum-exp,
the global softmax statistics, and each returns exactly its share of the gradients (ring
attention merges blocks the same way). The merge and the backward are written once
(`SplitAttention`); the kernels differ only in how they lay out sequences:

- `FlashKernel`, CUDA: PyTorch's bundled FlashAttention-2, variable-length ("varlen"): the real
  tokens packed end to end (`Segments`), so padding and packed samples cost nothing.
- `CpuFlashKernel`, CPU: PyTorch's CPU flash kernel (the one sdpa runs), on padded sequences
  (`PaddedSegments`): each sequence's real tokens first, then padding rows that no real query
  reads. With right padding and no packing the sequences are the rows themselves (no copy).
- `ReferenceKernel`, other devices and tests: the varlen layout in dense fp32 math.

Every kernel returns its rows as out (N, h, e) and lse (N, h) float32, N its query rows (real
tokens for varlen, sequences x slots when padded), and checks the log-sum-exp layout its kernel
hands back ((h, T) varlen, (n, h, L) padded), so a layout change raises instead of mis-merging.

The layout (which tokens go where) is built once per forward by `split_layout` and reaches
every layer through the attention kwargs. The name has no "flash" in it on purpose:
transformers would then apply its own flash preprocessing, which knows nothing of MMA. It has
no mask function either, so transformers builds no (b, s, t) mask for it.

Shape legend: ``b`` batch, ``s`` query length, ``t`` key length, ``h`` heads, ``e`` head dim,
``T`` real tokens, ``n`` sequences, ``L`` slots per padded sequence, ``N`` a kernel's query rows,
``R`` rows of the rectangle pass.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SPLIT_ATTENTION = "aki_split"


@dataclass(frozen=True)
class Segments:
    """Varlen: sequences packed end to end, sequence i owns rows cu[i]:cu[i + 1]."""

    cu_q: torch.Tensor  # (n + 1,) int32
    cu_k: torch.Tensor  # (n + 1,) int32
    max_q: int
    max_k: int


@dataclass(frozen=True)
class PaddedSegments:
    """Padded: sequence i owns query rows i * max_q ... and key rows i * max_k ..., its real tokens first.

    Rows past a sequence's counts are padding: they hold some finite token, no real query reads
    them, and their outputs are dropped.
    """

    counts_q: torch.Tensor  # (n,) long
    counts_k: torch.Tensor  # (n,) long
    max_q: int
    max_k: int
    aligned: bool  # counts_q == counts_k everywhere (no cache): top-left causal is the causal rule
    full_keys: bool  # counts_k == max_k everywhere: no padded keys
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # the kernel's, built once per forward


def segments(counts_q: torch.Tensor, counts_k: torch.Tensor) -> Segments:
    """Segments from the number of queries and keys of each sequence, in packing order."""
    cu_q = F.pad(counts_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(counts_k.cumsum(0), (1, 0)).to(torch.int32)
    return Segments(cu_q, cu_k, int(counts_q.max()), int(counts_k.max()))


def padded_segments(counts_q: torch.Tensor, counts_k: torch.Tensor) -> PaddedSegments:
    max_q, max_k = int(counts_q.max()), int(counts_k.max())
    return PaddedSegments(
        counts_q, counts_k, max_q, max_k, bool(torch.equal(counts_q, counts_k)), bool((counts_k == max_k).all())
    )


def pad_rows(positions: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """(n * width,) padded rows of sequences given end to end by positions (T,) and counts (n,), all >= 1:
    each sequence's positions, then its last one repeated."""
    starts = F.pad(counts.cumsum(0), (1, 0))[:-1]
    slots = torch.arange(width, device=positions.device)
    return positions[(starts[:, None] + torch.minimum(slots, counts[:, None] - 1)).flatten()]


@dataclass(frozen=True)
class SplitLayout:
    """Where the two passes read and write, for one forward (every layer shares it).

    Positions are flat indices into the (b * s) queries or the (b * t) keys; rows are a kernel's rows.
    query_index (N_q,) and key_index (N_k,): the position each row of the causal pass reads, or
    None when the rows are the positions (padded layout of right-padded rows: no copy).
    output_index (T_q,): the positions of the real queries, and output_rows (T_q,) their causal rows;
    None when the rows are the positions (output_index) or the real queries in order (output_rows).
    padding_rows (P,): causal rows that are padding *and* outputs; they come out as zeros.
    rect_rows (R_q,) and rect_key_rows (R_k,): the causal pass's query and key rows the rectangle
    pass reads (its results merge into rect_rows), and rect_query_at, rect_key_at the same as indices
    into the causal pass's q and k. rect_padding: the rectangle pass's padding rows (they repeat a
    real row of their block), or None.
    """

    batch: int
    query_length: int
    key_length: int
    kernel: type
    causal: Segments | PaddedSegments
    query_index: torch.Tensor | None
    key_index: torch.Tensor | None
    output_index: torch.Tensor | None
    output_rows: torch.Tensor | None
    padding_rows: torch.Tensor | None
    rectangle: Segments | PaddedSegments | None = None
    rect_rows: torch.Tensor | None = None
    rect_key_rows: torch.Tensor | None = None
    rect_query_at: tuple[torch.Tensor, ...] | None = None
    rect_key_at: tuple[torch.Tensor, ...] | None = None
    rect_padding: torch.Tensor | None = None


def split_layout(
    key_padding: torch.Tensor | None,
    batch: int,
    query_length: int,
    key_length: int,
    device: torch.device,
    window_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    kernel: type | None = None,
) -> SplitLayout:
    """The split path's layout for `kernel` (by default the device's); pure tensor work, no loop over tokens.

    key_padding (b, t): 1 for real keys (the 2D attention mask), or None. The queries are the
    last s of the t keys (a cache holds the t - s before them).
    window_ids (b, s): MMA window ids of the queries (`aki.masking`), or None for causal attention.
    document_ids (b, s): packed samples of a row (only without a cache: s == t).
    """
    kernel = kernel or kernel_for(device)
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
    query_positions = query_valid.flatten().nonzero().squeeze(1)
    key_positions = key_padding.flatten().nonzero().squeeze(1)
    query_groups, key_groups = query_group.flatten()[query_positions], key_group.flatten()[key_positions]
    counts_q = torch.bincount(query_groups, minlength=batch * per_row)
    counts_k = torch.bincount(key_groups, minlength=batch * per_row)

    output_index, output_rows, padding_rows = query_positions, None, None
    if not kernel.padded:
        causal = segments(counts_q, counts_k)
        query_index, key_index = query_positions, key_positions
        query_row = torch.arange(len(query_positions), device=device)
        key_row = torch.arange(len(key_positions), device=device)
    elif document_ids is None and is_prefix(query_valid, counts_q) and is_prefix(key_padding, counts_k):
        # Right padding: the batch rows are the padded sequences as they are, trailing padding included
        # (no copy in or out; the padding rows cost what they cost causal attention).
        causal = PaddedSegments(
            counts_q, counts_k, query_length, key_length, bool(torch.equal(counts_q, counts_k)), False
        )
        query_index = key_index = output_index = None
        padding_rows = (~query_valid).flatten().nonzero().squeeze(1)
        padding_rows = padding_rows if len(padding_rows) else None
        query_row, key_row = query_positions, key_positions
    else:
        kept = counts_q > 0  # a sequence without queries costs a padded block and gives nothing
        causal = padded_segments(counts_q[kept], counts_k[kept])
        key_kept = kept[key_groups]
        key_positions, key_groups = key_positions[key_kept], key_groups[key_kept]
        query_index = pad_rows(query_positions, causal.counts_q, causal.max_q)
        key_index = pad_rows(key_positions, causal.counts_k, causal.max_k)
        sequence = kept.cumsum(0) - 1
        query_row = padded_row(sequence[query_groups], causal.counts_q, causal.max_q)
        key_row = padded_row(sequence[key_groups], causal.counts_k, causal.max_k)
        output_rows = query_row
    layout = SplitLayout(
        batch, query_length, key_length, kernel, causal, query_index, key_index, output_index, output_rows,
        padding_rows,
    )  # fmt: skip
    if window_ids is None or not (window_ids > 0).any():
        return layout
    blocks = rectangle_blocks(window_ids, query_valid, past, key_length)
    if blocks is None:
        return layout
    block_queries, query_counts, block_keys, key_counts = blocks
    # The rectangle reads the causal pass's rows: map positions to them (only real positions are read).
    causal_query_row = torch.zeros(batch * query_length, dtype=torch.long, device=device)
    causal_query_row[query_positions] = query_row
    causal_key_row = torch.zeros(batch * key_length, dtype=torch.long, device=device)
    causal_key_row[key_positions] = key_row
    rect_padding = None
    if kernel.padded:
        rectangle = padded_segments(query_counts, key_counts)
        block_queries = pad_rows(block_queries, query_counts, rectangle.max_q)
        block_keys = pad_rows(block_keys, key_counts, rectangle.max_k)
        rect_padding = (torch.arange(rectangle.max_q, device=device) >= query_counts[:, None]).flatten().nonzero()
        rect_padding = rect_padding.squeeze(1) if len(rect_padding) else None
    else:
        rectangle = segments(query_counts, key_counts)
    rect_rows, rect_key_rows = causal_query_row[block_queries], causal_key_row[block_keys]
    return replace(
        layout,
        rectangle=rectangle,
        rect_rows=rect_rows,
        rect_key_rows=rect_key_rows,
        rect_query_at=rows_index(rect_rows, causal.max_q if kernel.padded else None),
        rect_key_at=rows_index(rect_key_rows, causal.max_k if kernel.padded else None),
        rect_padding=rect_padding,
    )


def rows_index(rows: torch.Tensor, width: int | None) -> tuple[torch.Tensor, ...]:
    """Index of a kernel's rows (R,) into its q or k: (T, h, e) varlen (width None) or (n, width, h, e) padded."""
    return (rows,) if width is None else (rows // width, rows % width)


def padded_row(sequence: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """Padded row of tokens (T,) given end to end with their sequence, sequence i holding counts[i]."""
    starts = F.pad(counts.cumsum(0), (1, 0))[sequence]
    return sequence * width + torch.arange(len(sequence), device=sequence.device) - starts


def is_prefix(valid: torch.Tensor, counts: torch.Tensor) -> bool:
    """valid (b, s): every row's real tokens are its first counts[row] (no padding on the left or inside)."""
    return bool(torch.equal(valid, torch.arange(valid.shape[1], device=valid.device) < counts[:, None]))


def rectangle_blocks(
    window_ids: torch.Tensor, query_valid: torch.Tensor, past: int, key_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The rectangle pass's sequences: one per image block (a run of image tokens of one window), whose
    keys are its window's question tokens after the block; None when no image has question keys.

    Several images in one turn share the keys after the last of them, so those keys are gathered
    once per block. window_ids and query_valid are (b, s). Returns the blocks' query positions
    (R,) in the flat (b * s) queries, their counts per block, the key positions (K,) in the flat
    (b * t) keys, and their counts per block.
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
        return None
    keep_query = kept[blocks]
    query_counts = torch.bincount(blocks[keep_query], minlength=num_blocks)[kept]
    key_counts, first_after = key_counts[kept], first_after[kept]
    starts = F.pad(key_counts.cumsum(0), (1, 0))[:-1]
    offsets = torch.arange(int(key_counts.sum()), device=device) - torch.repeat_interleave(starts, key_counts)
    chosen = key_positions[torch.repeat_interleave(first_after, key_counts) + offsets]
    keys = (chosen // query_length) * key_length + past + chosen % query_length
    return query_positions[keep_query], query_counts, keys, key_counts


class ReferenceKernel:
    """Varlen attention that returns the log-sum-exp, and its backward, in dense fp32 math.

    Same contract as `FlashKernel`: q (T_q, h, e), k and v (T_k, h, e); out (T_q, h, e) and
    lse (T_q, h) float32. `causal` aligns each sequence's last query with its last key.
    """

    padded = False
    grouped_heads = False

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

    padded = False
    grouped_heads = False

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


class CpuFlashKernel:
    """PyTorch's CPU flash kernel on padded sequences, with its backward.

    q (n, L_q, h, e), k and v (n, L_k, h_kv, e), any strides with a contiguous last dim; grouped
    key/value heads are read as they are. out (n * L_q, h, e) and lse (n * L_q, h) float32, views of
    the kernel's own (n, h, L_q) log-sum-exp. Without a cache or a window the kernel's `is_causal`
    is the rule (padding rows come after every real token); otherwise a float mask says it.
    """

    padded = True
    grouped_heads = True

    @staticmethod
    def allowed(seg: PaddedSegments, causal: bool, window: int | None) -> torch.Tensor:
        """(n, L_q, L_k) bool: real keys, and causal (bottom-right) with a sliding window where asked.

        Without `causal` every row reads its sequence's real keys, padding rows too (they repeat a
        real row). Causal padding rows may read every key, so none is empty."""
        device = seg.counts_q.device
        slots_q, slots_k = torch.arange(seg.max_q, device=device), torch.arange(seg.max_k, device=device)
        allowed = (slots_k < seg.counts_k[:, None, None]).expand(-1, seg.max_q, -1)
        if not causal:
            return allowed
        position_q = slots_q[None, :, None] + (seg.counts_k - seg.counts_q)[:, None, None]
        allowed = allowed & (slots_k <= position_q)
        if window is not None:
            allowed = allowed & (position_q - slots_k < window)
        return allowed | (slots_q[None, :, None] >= seg.counts_q[:, None, None])

    @classmethod
    def _mask(cls, seg: PaddedSegments, causal: bool, window: int | None, dtype) -> torch.Tensor | None:
        """The additive (n, 1, L_q, L_k) mask, or None where the kernel's own `is_causal` flag is exact;
        built once per layout (every layer shares it)."""
        if window is None and (seg.aligned if causal else seg.full_keys):
            return None
        if (causal, window, dtype) not in seg.masks:
            allowed = cls.allowed(seg, causal, window)[:, None]
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            seg.masks[causal, window, dtype] = additive.masked_fill_(~allowed, float("-inf"))
        return seg.masks[causal, window, dtype]

    @staticmethod
    def _check(seg, q, k) -> None:
        if not isinstance(seg, PaddedSegments) or q.shape[:2] != (len(seg.counts_q), seg.max_q):
            raise RuntimeError(
                f"CpuFlashKernel takes padded sequences (n, L, h, e) with PaddedSegments; got queries "
                f"{tuple(q.shape)} with {type(seg).__name__}."
            )
        if k.shape[:2] != (len(seg.counts_k), seg.max_k):
            raise RuntimeError(f"Keys {tuple(k.shape)} do not match {len(seg.counts_k)} sequences of {seg.max_k}.")

    @classmethod
    def forward(cls, q, k, v, seg: PaddedSegments, causal: bool, scale: float, window: int | None):
        cls._check(seg, q, k)
        mask = cls._mask(seg, causal, window, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal and mask is None,
            attn_mask=mask, scale=scale,
        )  # fmt: skip
        n, length, heads, dim = q.shape
        if lse.shape != (n, heads, length) or out.shape != (n, heads, length, dim):
            raise RuntimeError(
                f"Unexpected CPU flash attention layout: out {tuple(out.shape)}, log-sum-exp {tuple(lse.shape)}; "
                f"expected (n, h, L, e) and (n, h, L) = {(n, heads, length)}."
            )
        return out.transpose(1, 2).reshape(n * length, heads, dim), lse.transpose(1, 2).reshape(n * length, heads)

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, seg: PaddedSegments, causal: bool, scale: float, window):
        n, length, heads, dim = q.shape
        mask = cls._mask(seg, causal, window, q.dtype)

        def padded(rows):  # (n * L, h, ...) -> the kernel's (n, h, L, ...)
            return rows.reshape(n, length, *rows.shape[1:]).transpose(1, 2)

        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            padded(grad_out), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), padded(out), padded(lse),
            0.0, causal and mask is None, attn_mask=mask, scale=scale,
        )  # fmt: skip
        return tuple(grad.transpose(1, 2) for grad in grads)


def kernel_for(device: torch.device) -> type:
    return {"cuda": FlashKernel, "cpu": CpuFlashKernel}.get(torch.device(device).type, ReferenceKernel)


def merge_rectangle(out, lse, rect_out, rect_lse, rows: torch.Tensor) -> None:
    """Fold the rectangle pass (rect_out (R, h, e), rect_lse (R, h)) into the causal rows `rows` (R,)
    of out (N, h, e) and lse (N, h), in place. The causal pass's share is sigmoid(l_c - l_r)."""
    causal_lse = lse[rows]
    causal_share = torch.sigmoid(causal_lse - rect_lse)[..., None]
    merged = torch.lerp(rect_out.float(), out[rows].float(), causal_share)
    out.index_copy_(0, rows, merged.to(out.dtype))
    lse.index_copy_(0, rows, torch.logaddexp(causal_lse, rect_lse))


class SplitAttention(torch.autograd.Function):
    """Causal pass + rectangle pass, merged by log-sum-exp; the causal pass's (N_q, h, e) rows out.

    The rectangle pass reads rows of the causal pass's q, k, v and adds its gradients to theirs.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout: SplitLayout, scale: float, window: int | None):
        kernel = layout.kernel
        out, lse = kernel.forward(q, k, v, layout.causal, True, scale, window)
        if layout.rectangle is not None:
            rect_q, rect_k, rect_v = rectangle_inputs(q, k, v, layout)
            rect_out, rect_lse = kernel.forward(rect_q, rect_k, rect_v, layout.rectangle, False, scale, None)
            # Padding rows of the rectangle pass repeat a real row: they write the same values again.
            merge_rectangle(out, lse, rect_out, rect_lse, layout.rect_rows)
        if layout.padding_rows is not None:
            out.index_fill_(0, layout.padding_rows, 0.0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.window = layout, scale, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, kernel = ctx.layout, ctx.layout.kernel
        if layout.padding_rows is not None:  # they came out as constant zeros
            grad_out = grad_out.index_fill(0, layout.padding_rows, 0.0)
        grads = kernel.backward(grad_out, q, k, v, out, lse, layout.causal, True, ctx.scale, ctx.window)
        if layout.rectangle is not None:
            rows = layout.rect_rows
            rect_grad_out = grad_out[rows]
            if layout.rect_padding is not None:  # they repeat a real row, whose gradient counts once
                rect_grad_out.index_fill_(0, layout.rect_padding, 0.0)
            rect_grads = kernel.backward(
                rect_grad_out, *rectangle_inputs(q, k, v, layout), out[rows], lse[rows], layout.rectangle, False,
                ctx.scale, None,
            )  # fmt: skip
            indices = (layout.rect_query_at, layout.rect_key_at, layout.rect_key_at)
            for grad, rect_grad, index in zip(grads, rect_grads, indices, strict=True):
                grad.index_put_(index, rect_grad.flatten(0, -3), accumulate=True)
        return (*grads, None, None, None)


def rectangle_inputs(q, k, v, layout: SplitLayout) -> tuple[torch.Tensor, ...]:
    """The rectangle pass's q, k, v: rows of the causal pass's, shaped for its kernel."""
    rect_q = q[layout.rect_query_at]
    rect_k, rect_v = k[layout.rect_key_at], v[layout.rect_key_at]
    if isinstance(layout.rectangle, PaddedSegments):
        rect_q = rect_q.unflatten(0, (-1, layout.rectangle.max_q))
        rect_k, rect_v = (x.unflatten(0, (-1, layout.rectangle.max_k)) for x in (rect_k, rect_v))
    return rect_q, rect_k, rect_v


def gather(tokens: torch.Tensor, index: torch.Tensor | None, width: int | None) -> torch.Tensor:
    """A kernel's rows from tokens (b, s, h, e): the tokens themselves (index None), (T, h, e) varlen
    (width None) or (n, width, h, e) padded."""
    if index is None:
        return tokens
    rows = tokens[index // tokens.shape[1], index % tokens.shape[1]]
    return rows if width is None else rows.unflatten(0, (-1, width))


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
    """query (b, h, s, e), key and value (b, h_kv, t, e) -> (b, s, h, e); the AttentionInterface entry.

    Padded query positions come out as zeros.
    """
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
    if not layout.kernel.grouped_heads:  # grouped key/value heads are repeated: plain multi-head attention
        key, value = (x.repeat_interleave(h // key.shape[1], dim=1) for x in (key, value))
    padded = isinstance(layout.causal, PaddedSegments)
    q = gather(query.transpose(1, 2), layout.query_index, layout.causal.max_q if padded else None)
    k, v = (gather(x.transpose(1, 2), layout.key_index, layout.causal.max_k if padded else None) for x in (key, value))
    window = sliding_window if sliding_window is not None and sliding_window < t else None
    out = SplitAttention.apply(q, k, v, layout, scale, window)
    if layout.output_index is not None:
        out = out if layout.output_rows is None else out[layout.output_rows]
        out = out.new_zeros(b * s, h, e).index_copy(0, layout.output_index, out)
    return out.view(b, s, h, e), None


AttentionInterface.register(SPLIT_ATTENTION, split_attention_forward)


def default_attn_implementation(device: torch.device | str) -> str:
    """The attention the project's tools (training, evaluation, `aki chat`) run when none is named.

    On the CPU, `aki_split`: exact, and with PyTorch's CPU flash kernel MMA costs what causal
    attention costs (benchmarks/README.md), where sdpa with MMA's boolean mask costs 1.4-1.8x.
    Elsewhere sdpa: the CUDA split path has not been timed on a GPU yet. Models loaded with
    `from_pretrained` keep transformers' default (sdpa), which also serves static caches, prepared
    4D masks and attention weights; `aki_split` does not.
    """
    return SPLIT_ATTENTION if torch.device(device).type == "cpu" else "sdpa"
