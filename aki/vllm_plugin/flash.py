"""Exact MMA on vLLM's CUDA backend (FLASH_ATTN): the causal pass, then the image rows by log-sum-exp.

FlashAttention runs causal attention for every token, as vLLM's own backend does. For the image
rows the planner lists (`aki.vllm_plugin.attention.MmaPlanner`), two more varlen calls return their
log-sum-exp: the causal pass again, over the paged cache (one sequence per contiguous image run,
bottom-right aligned so that each row sees the keys up to itself), and the rectangle pass over the
question keys after the run, taken from this step (a window never reaches outside its step). The
two key sets are disjoint, so the merge by log-sum-exp (`aki.split_attention.merge_rectangle`) is
exactly attention over their union, MMA's row. Nothing is read back from the cache by hand.

Written against vLLM 0.32's `FlashAttentionImpl` and `flash_attn_varlen_func`; its pieces are
tested on CPU through a reference varlen kernel (tests/test_vllm.py), and the engine checks the
whole at start-up on the machine it runs on (`aki.vllm_plugin.self_check`). It has not run on a GPU
here.

Shape legend: ``R`` image rows in the step, ``n`` image runs, ``K`` question keys, ``h`` query
heads, ``g`` key/value heads, ``e`` head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..split_attention import merge_rectangle
from .attention import ImageRows, MmaPlanner, with_prefill_flags


@dataclasses.dataclass
class FlashRows:
    """The planned image rows in FlashAttention's varlen layout: run i owns rows[cu_rows[i]:cu_rows[i + 1]]."""

    rows: torch.Tensor  # (R,) step token indices, run after run
    cu_rows: torch.Tensor  # (n + 1,) int32
    causal_keys: torch.Tensor  # (n,) int32: keys run i sees causally (its last position + 1)
    block_table: torch.Tensor  # (n, blocks) int32: the blocks of run i's request
    question: torch.Tensor  # (K,) step token indices of each run's question keys, run after run
    cu_question: torch.Tensor  # (n + 1,) int32
    max_rows: int
    max_causal_keys: int
    max_question: int


def flash_rows(images: list[ImageRows]) -> FlashRows | None:
    """The planner's image rows as FlashAttention's arguments; None when there are none."""
    rows, runs, causal_keys, tables, question, question_counts = [], [], [], [], [], []
    for image in images:
        positions = image.context + image.rows - image.step_start
        run_starts = torch.cat([torch.tensor([0]), (positions.diff() != 1).nonzero().flatten() + 1])
        run_ends = torch.cat([run_starts[1:], torch.tensor([len(positions)])])
        for start, end in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
            last = int(positions[end - 1])
            # The keys a run's rows see beyond causal: its question after the run (the same for each row).
            keys = image.allowed[start, last + 1 :].nonzero().flatten() + last + 1
            rows.append(image.rows[start:end])
            runs.append(end - start)
            causal_keys.append(last + 1)
            tables.append(image.block_table)
            question.append(image.step_start + keys - image.context)
            question_counts.append(len(keys))
    if not rows:
        return None
    width = max(len(table) for table in tables)
    return FlashRows(
        rows=torch.cat(rows),
        cu_rows=F.pad(torch.tensor(runs).cumsum(0), (1, 0)).to(torch.int32),
        causal_keys=torch.tensor(causal_keys, dtype=torch.int32),
        block_table=torch.stack([F.pad(table, (0, width - len(table))) for table in tables]).to(torch.int32),
        question=torch.cat(question),
        cu_question=F.pad(torch.tensor(question_counts).cumsum(0), (1, 0)).to(torch.int32),
        max_rows=max(runs),
        max_causal_keys=max(causal_keys),
        max_question=max(question_counts),
    )


def mma_flash_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: FlashRows,
    scale: float,
    varlen: Callable,
) -> torch.Tensor:
    """MMA's output (R, h, e) for `plan`'s rows: this step's query/key/value (tokens, heads, e), the paged
    cache (blocks, block size, g, e), and `varlen`, a `flash_attn_varlen_func`."""
    device = query.device
    plan = FlashRows(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in dataclasses.asdict(plan).items()})
    rows_query = query[plan.rows]
    out, lse = varlen(
        q=rows_query, k=key_cache, v=value_cache, cu_seqlens_q=plan.cu_rows, max_seqlen_q=plan.max_rows,
        seqused_k=plan.causal_keys, max_seqlen_k=plan.max_causal_keys, block_table=plan.block_table,
        softmax_scale=scale, causal=True, return_softmax_lse=True,
    )  # fmt: skip
    rect_out, rect_lse = varlen(
        q=rows_query, k=key[plan.question], v=value[plan.question], cu_seqlens_q=plan.cu_rows,
        max_seqlen_q=plan.max_rows, cu_seqlens_k=plan.cu_question, max_seqlen_k=plan.max_question,
        softmax_scale=scale, causal=False, return_softmax_lse=True,
    )  # fmt: skip
    lse = lse.transpose(0, 1).contiguous()  # varlen gives (h, R); the merge takes (R, h)
    merge_rectangle(out, lse, rect_out, rect_lse.transpose(0, 1), torch.arange(len(plan.rows), device=device))
    return out


@functools.cache
def flash_backend() -> type:
    """vLLM's FLASH_ATTN backend with AKI's image rows (built on first use: the module needs vLLM's CUDA build)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadata,
        FlashAttentionMetadataBuilder,
    )

    @dataclasses.dataclass
    class MmaFlashAttentionMetadata(FlashAttentionMetadata):
        is_prefilling: torch.Tensor | None = None

    class MmaFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
        def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
            metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
            return with_prefill_flags(MmaFlashAttentionMetadata, metadata, common_attn_metadata)

    class MmaFlashAttentionImpl(FlashAttentionImpl):
        def __init__(self, *args, mma_planner: MmaPlanner, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.mma_planner = mma_planner
            self.varlen = functools.partial(flash_attn_varlen_func, fa_version=self.vllm_flash_attn_version)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if attn_metadata is None:
                return output
            plan = self.mma_planner.once("flash_rows", flash_rows)  # built by the first layer of the step
            if plan is None:
                return output
            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # as FLASH_ATTN reads it
            rows = mma_flash_rows(query, key, value, key_cache, value_cache, plan, self.scale, self.varlen)
            output[plan.rows.to(output.device)] = rows.to(output.dtype)
            return output

    class MmaFlashAttentionBackend(FlashAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return MmaFlashAttentionImpl

        @staticmethod
        def get_builder_cls():
            return MmaFlashAttentionMetadataBuilder

    return MmaFlashAttentionBackend
