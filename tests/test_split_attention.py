"""The split path ("aki_split": causal pass + rectangle pass merged by log-sum-exp) against sdpa."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import chat, encode, packed_caption_and_chat
from test_masking import IMG, LLAMA_MARKER, PAD, PHI_MARKER, random_batch, reference_mask
from transformers import AutoModelForImageTextToText, DynamicCache, StaticCache

from aki import AkiForConditionalGeneration
from aki.masking import dense_attention_mask, mma_mask_function, mma_window_ids
from aki.presets import TINY_IDS, TINY_TEXT, build_tiny, config_from_preset
from aki.split_attention import (
    SPLIT_ATTENTION,
    CpuFlashKernel,
    FlashKernel,
    ReferenceKernel,
    Segments,
    default_attn_implementation,
    split_attention_forward,
    split_layout,
)

ROOT = Path(__file__).resolve().parent.parent
SPLIT = {"text_config": SPLIT_ATTENTION, "vision_config": "sdpa", "": "sdpa"}
QUESTION = "What colour is the shape?"
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention, compiled flex_attention)"
)


KERNELS = {"cpu-flash": CpuFlashKernel, "reference-varlen": ReferenceKernel}


def pass_mask(layout, rectangle: bool) -> torch.Tensor:
    """The (b * s, b * t) mask one pass attends with, in position coordinates, for real queries."""
    b, s, t = layout.batch, layout.query_length, layout.key_length
    # Position of every causal row (rows are positions where the layout has no index).
    query_position = layout.query_index if layout.query_index is not None else torch.arange(b * s)
    key_position = layout.key_index if layout.key_index is not None else torch.arange(b * t)
    real = torch.zeros(len(query_position), dtype=torch.bool)
    if layout.output_rows is not None:
        real[layout.output_rows] = True
    elif layout.padding_rows is not None:
        real[:] = True
        real[layout.padding_rows] = False
    else:
        real[:] = True
    seg = layout.causal
    if rectangle:
        seg, real = layout.rectangle, real[layout.rect_rows]
        if layout.rect_padding is not None:
            real[layout.rect_padding] = False
        query_position, key_position = query_position[layout.rect_rows], key_position[layout.rect_key_rows]
    if layout.kernel.padded:
        inner = torch.block_diag(*CpuFlashKernel.allowed(seg, not rectangle, None))  # (n, L_q, L_k) -> rows x rows
    else:
        inner = ReferenceKernel.allowed(seg, len(query_position), len(key_position), not rectangle, None, "cpu")
    rows, columns = (inner & real[:, None]).nonzero(as_tuple=True)
    # A key gathered for several image blocks is one key: the copies count once.
    mask = torch.zeros(b * s, b * t, dtype=torch.long)
    mask.index_put_((query_position[rows], key_position[columns]), torch.ones_like(rows), accumulate=True)
    return mask > 0


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("marker", [PHI_MARKER, LLAMA_MARKER], ids=["one-token-marker", "three-token-marker"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("seed", range(12))
def test_the_two_passes_are_disjoint_and_cover_the_rule(seed, padding_side, marker, kernel):
    input_ids, valid = random_batch(seed, marker, padding_side)
    b, s = input_ids.shape
    windows = mma_window_ids(input_ids, IMG, marker, valid.long())
    layout = split_layout(valid, b, s, s, torch.device("cpu"), windows, kernel=kernel)
    causal, rectangle = pass_mask(layout, False), pass_mask(layout, True)
    assert not (causal & rectangle).any()
    union = (causal | rectangle).view(b, s, b, s)
    for row in range(b):
        expected = reference_mask(input_ids[row].tolist(), valid[row].tolist(), marker)
        expected[~valid[row]] = False  # padded queries are not computed at all
        assert torch.equal(union[row, :, row], expected), f"sample {row}: {input_ids[row].tolist()}"
        others = torch.cat([union[row, :, :row], union[row, :, row + 1 :]], dim=1)
        assert not others.any()


def test_right_padding_reads_the_rows_in_place_and_left_padding_gathers():
    """On CPU right-padded rows are the kernel's padded sequences as they are: no copy of q, k, v."""
    input_ids, valid = random_batch(3, PHI_MARKER, "right")
    b, s = input_ids.shape
    windows = mma_window_ids(input_ids, IMG, PHI_MARKER, valid.long())
    right = split_layout(valid, b, s, s, torch.device("cpu"), windows)
    left = split_layout(valid.flip(1), b, s, s, torch.device("cpu"), windows.flip(1))
    assert right.kernel is CpuFlashKernel and right.query_index is None and right.key_index is None
    assert right.output_index is None and len(right.padding_rows) == int((~valid).sum())
    assert left.query_index is not None and torch.equal(left.causal.counts_q, right.causal.counts_q)


def random_layout(seed: int, padding_side: str, packed: bool):
    """(input_ids, valid, window ids, document ids or None, the dense rule (b, s, s)) of a random batch;
    packed: two samples end to end per row, the rest of the row a padding sample of its own."""
    input_ids, valid = random_batch(seed, PHI_MARKER, padding_side)
    if not packed:
        windows = mma_window_ids(input_ids, IMG, PHI_MARKER, valid.long())
        return input_ids, valid, windows, None, dense_attention_mask(windows, valid.long())
    samples = [ids[keep] for ids, keep in zip(input_ids, valid, strict=True)]
    length = max(len(samples[0]) + len(samples[1]), len(samples[2]) + len(samples[3])) + 3
    rows, documents = [], []
    for first, second in ((0, 1), (2, 3)):
        row = torch.cat([samples[first], samples[second]])
        rows.append(F.pad(row, (0, length - len(row)), value=PAD))
        sizes = [len(samples[first]), len(samples[second]), length - len(row)]
        documents.append(torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)))
    input_ids, documents = torch.stack(rows), torch.stack(documents)
    windows = mma_window_ids(input_ids, IMG, PHI_MARKER, document_ids=documents)
    allowed = dense_attention_mask(windows) & (documents[:, :, None] == documents[:, None, :])
    return input_ids, torch.ones_like(input_ids, dtype=torch.bool), windows, documents, allowed


def attention_on_a_random_layout(
    seed: int, padding_side: str, attend, device="cpu", dtype=torch.float32, case: str = "plain"
):
    """Outputs and q/k/v gradients of `attend(q, k, v, windows, valid, documents, past, window)` on valid
    query rows, and of sdpa with the dense rule as reference; 4 query heads share 2 key/value heads.

    case: "plain"; "sliding-window" (keys less than 5 positions back); "cache" (the queries are the
    last 40% of the keys, the rest is cached); "packed" (two samples per row)."""
    input_ids, valid, windows, documents, allowed = random_layout(seed, padding_side, case == "packed")
    b, t = input_ids.shape
    past = int(0.6 * t) if case == "cache" else 0
    window = 5 if case == "sliding-window" else None
    if window is not None:
        positions = torch.arange(t)
        allowed = allowed & (positions[:, None] - positions[None, :] < window)
    allowed = allowed[:, None, past:].to(device)  # (b, 1, s, t)
    generator = torch.Generator().manual_seed(seed)
    shapes = ((b, 4, t - past, 16), (b, 2, t, 16), (b, 2, t, 16))
    tensors = [torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for shape in shapes]
    rows = valid[:, past:].to(device).bool()
    args = (windows[:, past:].to(device), valid.to(device), documents, past, window)
    results = []
    for method in (attend, None):
        if method is None:
            q, k, v = tensors
            # Padded query rows see nothing under the rule; give them their own key so sdpa stays finite.
            safe = allowed | ~allowed.any(-1, keepdim=True)
            output = F.scaled_dot_product_attention(
                q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=safe
            ).transpose(1, 2)
        else:
            output = method(*tensors, *args)
        grads = torch.autograd.grad((output[rows].float() ** 2).sum(), tensors)
        results.append((output[rows].detach(), grads))
    return results


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("case", ["plain", "sliding-window", "cache", "packed"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("seed", range(6))
def test_split_attention_equals_sdpa_on_random_layouts(seed, padding_side, case, kernel):
    """Outputs and q/k/v gradients to 1e-5 in float32: several images and turns, padding on either side,
    grouped key/value heads, a sliding window, a cache, packed rows; on the real CPU kernel and on the varlen
    (CUDA) layout through the reference kernel."""

    def split(q, k, v, windows, valid, documents, past, window):
        b, _, s, _ = q.shape
        layout = split_layout(valid, b, s, k.shape[2], q.device, windows, documents, kernel=kernel)
        return split_attention_forward(
            None, q, k, v, None, scaling=0.25, sliding_window=window, aki_split_layout=layout
        )[0]

    (output, grads), (reference, reference_grads) = attention_on_a_random_layout(seed, padding_side, split, case=case)
    assert torch.allclose(output, reference, atol=1e-5)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_cpu_kernel_refuses_another_layout():
    """A varlen layout handed to the padded CPU kernel raises instead of mis-merging."""
    seg = Segments(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 3, 8], dtype=torch.int32), 5, 5)
    q = torch.randn(8, 2, 4)
    with pytest.raises(RuntimeError, match="padded sequences"):
        CpuFlashKernel.forward(q, q, q, seg, True, 0.5, None)


@cuda
@pytest.mark.parametrize("seed", range(3))
def test_cuda_flex_attention_equals_sdpa_on_random_layouts(seed):
    """flex_attention with the block mask from the window ids, forward and gradients, on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def flex(q, k, v, windows, valid, *_):
        b, _, s, _ = q.shape
        overlay = mma_mask_function(windows)

        def mask_mod(batch, head, q_idx, kv_idx):
            return ((kv_idx <= q_idx) | overlay(batch, head, q_idx, kv_idx)) & valid[batch, kv_idx].bool()

        block_mask = create_block_mask(mask_mod, b, None, s, s, device="cuda")
        output = torch.compile(flex_attention)(q, k, v, block_mask=block_mask, scale=0.25, enable_gqa=True)
        return output.transpose(1, 2)

    (output, grads), (reference, reference_grads) = attention_on_a_random_layout(seed, "right", flex, "cuda")
    assert torch.allclose(output, reference, atol=1e-4)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_packed_samples_are_separate_sequences(kernel):
    input_ids, valid = random_batch(5, PHI_MARKER, "right")
    lengths = valid.sum(1).tolist()
    packed = torch.cat([input_ids[i, : lengths[i]] for i in range(2)])[None]
    documents = torch.cat([torch.full((lengths[i],), i) for i in range(2)])[None]
    windows = mma_window_ids(packed, IMG, PHI_MARKER, document_ids=documents)
    length = packed.shape[1]
    layout = split_layout(None, 1, length, length, torch.device("cpu"), windows, documents, kernel=kernel)
    union, start = pass_mask(layout, False) | pass_mask(layout, True), 0
    expected = torch.zeros_like(union)
    for i in range(2):
        end = start + lengths[i]
        expected[start:end, start:end] = reference_mask(
            input_ids[i, : lengths[i]].tolist(), [True] * lengths[i], PHI_MARKER
        )
        start = end
    assert torch.equal(union, expected)


def test_reference_kernel_backward_equals_autograd():
    """The backward from (out, lse) alone, as FlashAttention computes it, equals autograd of the softmax."""
    torch.manual_seed(0)
    seg = Segments(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32), 5, 7)
    q, k, v = (torch.randn(n, 2, 4, requires_grad=True) for n in (8, 12, 12))
    for causal, window in ((True, None), (True, 3), (False, None)):
        allowed = ReferenceKernel.allowed(seg, 8, 12, causal, window, "cpu")
        scores = torch.einsum("qhe,khe->hqk", q, k) * 0.5
        expected = torch.einsum("hqk,khe->qhe", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        grad_out = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
        with torch.no_grad():
            out, lse = ReferenceKernel.forward(q, k, v, seg, causal, 0.5, window)
            grads = ReferenceKernel.backward(grad_out, q, k, v, out, lse, seg, causal, 0.5, window)
        assert torch.allclose(out, expected, atol=1e-6)
        for ours, reference in zip(grads, expected_grads, strict=True):
            assert torch.allclose(ours, reference, atol=1e-5)


def loss_and_grads(model, batch, implementation):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    model.train()
    try:
        output = model(**batch)
        valid = (
            batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"]).bool()
        )
        loss = (output.logits[valid] ** 2).mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    finally:
        model.eval()
        model.zero_grad()
        model.set_attn_implementation("sdpa")
    return output.logits.detach(), grads


def assert_same_training_step(model, batch):
    reference_logits, reference_grads = loss_and_grads(model, batch, "sdpa")
    logits, grads = loss_and_grads(model, batch, SPLIT)
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)
    assert torch.allclose(logits[valid], reference_logits[valid], atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_forward_and_gradients_equal_sdpa(model_and_processor, images, padding_side):
    """A padded batch: two images in one turn, and a two-turn chat with one image per turn."""
    model, processor = model_and_processor
    processor.tokenizer.padding_side = padding_side
    two_images = processor.apply_chat_template(chat(QUESTION, "Red.", num_images=2), tokenize=False)
    two_turns = processor.apply_chat_template(chat(QUESTION, "Red.") + chat("And this one?", "Blue."), tokenize=False)
    batch = processor(images=images + images, text=[two_images, two_turns], padding=True, return_tensors="pt")
    processor.tokenizer.padding_side = "left"
    assert_same_training_step(model, batch)
    # MMA is really on: the causal split path gives other logits.
    model.config.attention_policy = "causal"
    try:
        causal_logits, _ = loss_and_grads(model, batch, SPLIT)
        reference, _ = loss_and_grads(model, batch, "sdpa")
    finally:
        model.config.attention_policy = "mma"
    valid = batch["attention_mask"].bool()
    assert torch.allclose(causal_logits[valid], reference[valid], atol=1e-5)
    mma_logits, _ = loss_and_grads(model, batch, SPLIT)
    assert not torch.allclose(causal_logits[valid], mma_logits[valid], atol=1e-4)


def test_packed_row_equals_sdpa(tiny, images):
    model, processor = tiny
    packed, _ = packed_caption_and_chat(processor, images, QUESTION, "A red square.")
    assert_same_training_step(model, packed)


def test_sliding_window_equals_sdpa(images):
    special = {
        "bos_token_id": TINY_IDS["<s>"],
        "eos_token_id": TINY_IDS["<|endoftext|>"],
        "pad_token_id": TINY_IDS["<pad>"],
    }
    text = {
        **TINY_TEXT,
        **special,
        "model_type": "phi3",
        "sliding_window": 12,
        "original_max_position_embeddings": 1024,
    }
    model = AkiForConditionalGeneration(config_from_preset("tiny", text_config=text)).eval()
    _, processor = build_tiny("tiny")
    batch = encode(processor, chat(QUESTION + " Answer in one word, please.", "Red."), images[:1])
    assert batch["input_ids"].shape[1] > 2 * 12
    assert_same_training_step(model, batch)


def test_generation_equals_sdpa(model_and_processor, images):
    """Greedy decoding of a left-padded batch: prefill with the rectangle, decode steps causal."""
    model, processor = model_and_processor
    texts = [
        processor.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False)
        for q in (QUESTION, "Is there a cat in this picture? Answer yes or no.")
    ]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    settings = {"max_new_tokens": 12, "do_sample": False, "min_new_tokens": 12}
    model.set_attn_implementation(SPLIT)
    try:
        with torch.no_grad():
            split = model.generate(**batch, **settings, output_scores=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model.generate(**batch, **settings, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(split.sequences, reference.sequences)
    for ours, theirs in zip(split.scores, reference.scores, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_new_image_turn_after_a_cached_turn(tiny, images):
    """A cache holds the first turn; the next chunk brings a second image with its question."""
    model, processor = tiny
    first = encode(processor, chat(QUESTION, "Red."), images[:1])
    full = encode(processor, chat(QUESTION, "Red.") + chat("And this one?"), images)
    cached = first["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][:, :cached], first["input_ids"])
    results = []
    for implementation in (SPLIT, "sdpa"):
        model.set_attn_implementation(implementation)
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            model(**first, cache=cache, use_cache=True)
            chunk = {"input_ids": full["input_ids"][:, cached:], "pixel_values": full["pixel_values"][1:]}
            results.append(model(**chunk, cache=cache).logits)
    model.set_attn_implementation("sdpa")
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_one_name_for_the_whole_model(tiny, images):
    """`set_attn_implementation("aki_split")`: the vision tower and the Perceiver run it unmasked."""
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION, "Red.", num_images=2), images)
    with torch.no_grad():
        reference = model(**inputs).logits
        model.set_attn_implementation(SPLIT_ATTENTION)
        try:
            split = model(**inputs).logits
        finally:
            model.set_attn_implementation("sdpa")
    assert torch.allclose(split, reference, atol=1e-5)


def test_refusals_name_the_problem(tiny, images):
    model, processor = tiny
    inputs = encode(processor, chat(QUESTION), images[:1])
    model.set_attn_implementation(SPLIT)
    try:
        cache = StaticCache(config=model.config.text_config, max_cache_len=256)
        with pytest.raises(ValueError, match="dynamic cache, not a static one|static cache"):
            model(**inputs, cache=cache)
        with pytest.raises(ValueError, match="needs the layout"):
            model.model.language_model(input_ids=inputs["input_ids"])
        attention = model.model.language_model.layers[0].self_attn
        attention.attention_dropout = 0.1
        model.train()
        with pytest.raises(ValueError, match="dropout"):
            model(**inputs)
    finally:
        attention.attention_dropout = 0.0
        model.eval()
        model.set_attn_implementation("sdpa")


def test_the_tools_run_the_split_path_on_the_cpu(tiny_checkpoint):
    """Training ("auto"), aki-eval and aki chat pick aki_split on the CPU; from_pretrained keeps sdpa."""
    from aki.cli import load
    from aki_eval.run import Predictor
    from aki_training.config import load_config
    from aki_training.train import build_model

    assert default_attn_implementation("cpu") == SPLIT_ATTENTION
    assert default_attn_implementation(torch.device("cuda", 0)) == "sdpa"
    cfg = load_config(ROOT / "configs" / "tiny_sft.yaml", {"model.pretrained": str(tiny_checkpoint)})
    models = {
        "training": build_model(cfg)[0],
        "aki-eval": Predictor(str(tiny_checkpoint)).model,
        "aki chat": load(str(tiny_checkpoint))[0],
        "from_pretrained": AutoModelForImageTextToText.from_pretrained(tiny_checkpoint),
    }
    implementations = {name: model.config.text_config._attn_implementation for name, model in models.items()}
    assert implementations == {"training": SPLIT_ATTENTION, "aki-eval": SPLIT_ATTENTION, "aki chat": SPLIT_ATTENTION,
                               "from_pretrained": "sdpa"}  # fmt: skip
    sdpa = load_config(ROOT / "configs" / "tiny_sft.yaml", {"model.pretrained": str(tiny_checkpoint),
                                                            "model.attn_implementation": "sdpa"})  # fmt: skip
    assert build_model(sdpa)[0].config.text_config._attn_implementation == "sdpa"


def test_flash_kernel_calls_match_torch_shape_rules():
    """Without a GPU: PyTorch's meta kernels check our FlashAttention-2 calls (arguments, varlen
    layout, the (h, T) log-sum-exp), forward and backward, with a sliding window."""
    meta = torch.device("meta")
    seg = Segments(*(torch.tensor(x, dtype=torch.int32, device=meta) for x in ([0, 70, 200], [0, 90, 260])), 130, 170)
    q, k, v = (torch.empty(n, 4, 64, device=meta, dtype=torch.bfloat16) for n in (200, 260, 260))
    out, lse = FlashKernel.forward(q, k, v, seg, True, 0.125, 16)
    assert out.shape == q.shape and lse.shape == (200, 4) and lse.dtype == torch.float32
    grads = FlashKernel.backward(torch.empty_like(out), q, k, v, out, lse, seg, True, 0.125, 16)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_flash_kernel_equals_the_reference_kernel(causal):
    torch.manual_seed(0)
    device = torch.device("cuda")
    seg = Segments(*(torch.tensor(x, dtype=torch.int32, device=device) for x in ([0, 70, 200], [0, 90, 260])), 130, 170)
    q, k, v = (torch.randn(n, 4, 64, device=device, dtype=torch.bfloat16) for n in (200, 260, 260))
    out, lse = FlashKernel.forward(q, k, v, seg, causal, 0.125, None)
    ref_out, ref_lse = ReferenceKernel.forward(q, k, v, seg, causal, 0.125, None)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2)
    assert torch.allclose(lse, ref_lse, atol=1e-2)
    grad_out = torch.randn_like(out)
    grads = FlashKernel.backward(grad_out, q, k, v, out, lse, seg, causal, 0.125, None)
    ref_grads = ReferenceKernel.backward(grad_out, q, k, v, ref_out, ref_lse, seg, causal, 0.125, None)
    for ours, reference in zip(grads, ref_grads, strict=True):
        assert torch.allclose(ours.float(), reference.float(), atol=5e-2, rtol=5e-2)


@cuda
def test_cuda_bf16_split_path_equals_sdpa(images):
    model, processor = build_tiny("tiny-llama", seed=0)
    model = model.to("cuda", torch.bfloat16)
    processor.tokenizer.padding_side = "right"
    texts = [processor.apply_chat_template(chat(q, "Red."), tokenize=False) for q in (QUESTION, "Is it a cat?")]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt").to("cuda")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    reference_logits, reference_grads = loss_and_grads(model, batch, "sdpa")
    logits, grads = loss_and_grads(model, batch, SPLIT)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(logits[valid].float(), reference_logits[valid].float(), atol=5e-2)
    for name, grad in grads.items():
        assert torch.allclose(grad.float(), reference_grads[name].float(), atol=5e-2, rtol=5e-2), name
