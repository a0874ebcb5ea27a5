"""MMA attention at the cost of causal attention: masks, one attention layer, and the whole model.

    python benchmarks/bench_attention.py [--lengths 512,1024,2048] [--batches 1,4] [--out benchmarks/results]

Three measurements, each printed as a table with ratios against a baseline measured in the same run:
1. mask construction for a batch (ours, vectorised, vs the official per-sample Python loop);
2. one attention layer (h=8 heads of 64), forward and forward+backward: causal (`is_causal`), MMA through
   sdpa with our boolean mask, eager with an additive mask, flex_attention with a block mask (forward
   only on CPU), the split path `aki_split` (causal pass + rectangle pass: FlashAttention-2 varlen on
   CUDA, PyTorch's CPU flash kernel on CPU), and the official approach (dense float mask built per
   sample, eager attention); bf16 on CUDA, fp32 on CPU;
3. the tiny AKI model, forward+backward, causal vs MMA per backend.
The methods of one table run in turn (round robin) and report medians, so load on a shared machine
falls on all of them alike. `--methods` keeps the methods whose names contain one of its words.
Writes `attention.csv`, `masks.csv`, `model.csv` and `attention.png` under --out.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    device_name,
    layout,
    official_mask,
    our_mask,
    peak_memory,
    print_table,
    timed,
    timed_together,
    write_csv,
)

from aki.masking import mma_mask_function, mma_window_ids  # noqa: E402

HEADS, HEAD_DIM = 8, 64
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # FlashAttention needs 16-bit


def eager_attention(q, k, v, additive_mask):
    weights = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + additive_mask
    return weights.softmax(-1) @ v


def bench_masks(batch: int, length: int) -> dict:
    """The official per-sample loop (dense float mask) against ours: the O(s) window ids that flex and
    the model's mask functions read, and the dense boolean mask that sdpa gets."""
    ids, valid = layout(batch, length)
    official = timed(lambda: official_mask(ids, valid), repeats=3)
    windows = timed(lambda: mma_window_ids(ids, 3, [7], valid), repeats=3)
    dense = timed(lambda: our_mask(ids, valid), repeats=3)
    return {
        "batch": batch, "length": length, "official_loop_s": official, "ours_window_ids_s": windows,
        "ours_dense_bool_s": dense, "speedup_window_ids": official / windows, "speedup_dense": official / dense,
        "official_mask_mib": batch * length * length * 4 / 2**20, "window_ids_mib": batch * length * 8 / 2**20,
    }  # fmt: skip


def attention_methods(batch: int, length: int, device: torch.device):
    ids, valid = layout(batch, length)
    windows = mma_window_ids(ids, 3, [7], valid).to(device)
    bool_mask = our_mask(ids, valid)[:, None].to(device)
    additive = torch.zeros(bool_mask.shape, device=device, dtype=DTYPE).masked_fill(~bool_mask, torch.finfo(DTYPE).min)
    methods = {
        "causal (is_causal)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "mma sdpa (bool mask)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
        "mma eager (additive mask)": lambda q, k, v: eager_attention(q, k, v, additive),
    }

    def official(q, k, v):  # the mask is rebuilt for every batch, as the official forward does
        return eager_attention(q, k, v, official_mask(ids, valid, DTYPE).to(device))

    methods["official (dense loop mask, eager)"] = official
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        keys = valid.bool().to(device)
        overlay = mma_mask_function(windows)

        def mask_mod(b, h, q_idx, kv_idx):
            return ((kv_idx <= q_idx) | overlay(b, h, q_idx, kv_idx)) & keys[b, kv_idx]

        block_mask = create_block_mask(mask_mod, batch, None, length, length, device=str(device))
        compiled = torch.compile(flex_attention, dynamic=False)
        methods["mma flex (block mask)"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    except Exception as error:  # noqa: BLE001 - report, do not fail the other measurements
        print(f"flex_attention unavailable: {error}")
    from aki.split_attention import split_attention_forward, split_layout

    for name, window_ids in (("causal split (aki_split)", None), ("mma split (aki_split)", windows)):
        split = split_layout(valid.to(device), batch, length, length, device, window_ids)

        def split_attention(q, k, v, split=split):
            return split_attention_forward(None, q, k, v, None, aki_split_layout=split)[0]

        methods[name] = split_attention
    return methods


def bench_attention(batch: int, length: int, device: torch.device, keep: list[str], repeats: int) -> list[dict]:
    shape = (batch, HEADS, length, HEAD_DIM)
    methods = {
        name: method
        for name, method in attention_methods(batch, length, device).items()
        if name.startswith("causal (") or any(word in name for word in keep)
    }
    forwards, forward_backwards = {}, {}
    for name, method in methods.items():
        trainable = not ("flex" in name and device.type == "cpu")  # flex_attention has no CPU backward
        q, k, v = (torch.randn(shape, device=device, dtype=DTYPE, requires_grad=trainable) for _ in range(3))

        def forward(method=method, q=q, k=k, v=v):
            with torch.no_grad():
                method(q, k, v)

        def forward_backward(method=method, q=q, k=k, v=v):
            method(q, k, v).sum().backward()

        forwards[name] = forward
        if trainable:
            forward_backwards[name] = forward_backward
    forward_s = timed_together(forwards, repeats=repeats)
    forward_backward_s = timed_together(forward_backwards, repeats=repeats)
    rows = []
    for name in methods:
        row = {"method": name, "batch": batch, "length": length, "forward_s": forward_s[name]}
        row["forward_backward_s"] = forward_backward_s.get(name)
        if name in forward_backwards:
            row["peak_mib"] = peak_memory(forward_backwards[name])
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["forward_vs_causal"] = row["forward_s"] / base["forward_s"]
        if row["forward_backward_s"] is not None:
            row["fwd_bwd_vs_causal"] = row["forward_backward_s"] / base["forward_backward_s"]
    return rows


def bench_model(length: int, device: torch.device, repeats: int) -> list[dict]:
    from aki.presets import build_tiny

    rows = []
    model, processor = build_tiny("tiny", text_config={"max_position_embeddings": max(1024, 2 * length)})
    model.to(device, DTYPE).train()
    ids, valid = layout(2, length)
    vocab = model.config.text_config.vocab_size
    ids = torch.where(
        ids == 3, model.config.image_token_id, torch.where(ids == 7, model.config.assistant_marker_ids[0], ids % vocab)
    )
    # The layout holds 144 image tokens; the tiny connector makes 8 per image, so 18 images per row.
    images = int((ids == model.config.image_token_id).sum()) // model.config.num_image_tokens
    pixel_values = torch.randn(images, 3, 32, 32, device=device, dtype=DTYPE)
    inputs = {"input_ids": ids.to(device), "attention_mask": valid.to(device), "pixel_values": pixel_values}
    steps = {}
    for implementation in ("sdpa", "eager", "aki_split"):
        for policy in ("causal", "mma"):

            def step(implementation=implementation, policy=policy):
                model.set_attn_implementation(implementation)
                model.config.attention_policy = policy
                model(**inputs).logits.sum().backward()

            steps[(implementation, policy)] = step
    seconds = timed_together(steps, repeats=repeats)
    for (implementation, policy), step_s in seconds.items():
        causal = seconds[(implementation, "causal")]
        rows.append(
            {
                "backend": implementation,
                "policy": policy,
                "length": length,
                "fwd_bwd_s": step_s,
                "vs_causal": step_s / causal,
            }
        )
    model.config.attention_policy = "mma"
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted(
            (r["length"], r["fwd_bwd_vs_causal"]) for r in rows if r["method"] == method and r.get("fwd_bwd_vs_causal")
        )
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("sequence length")
    axis.set_ylabel("forward+backward time / causal")
    axis.set_title(f"One attention layer, {device_name()}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_lengths = "512,1024,2048,4096,8192" if torch.cuda.is_available() else "512,1024,2048"
    parser.add_argument("--lengths", default=default_lengths)
    parser.add_argument("--batches", default="1,4,16" if torch.cuda.is_available() else "1,4")
    parser.add_argument("--mask-batch", type=int, default=32)
    parser.add_argument("--model-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="", help="comma-separated words; keep the methods naming one (and causal)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: masks, attention, model")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep = [word for word in args.methods.split(",") if word] or [""]
    skip = set(args.skip.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    print(f"device: {device_name()}; torch {torch.__version__}")

    if "masks" not in skip:
        masks = [bench_masks(args.mask_batch, length) for length in lengths]
        print_table(f"Mask construction, batch {args.mask_batch} (speedup = official loop / ours)", masks)
        write_csv(masks, args.out / "masks.csv")
    if "attention" not in skip:
        attention = []
        for batch in batches:
            for length in lengths:
                rows = bench_attention(batch, length, device, keep, args.repeats)
                print_table(f"One attention layer, batch {batch}, L {length}", rows)
                attention += rows
        print_table("One attention layer (ratios against causal in the same run)", attention)
        write_csv(attention, args.out / "attention.csv")
        plot(attention, args.out / "attention.png")
    if "model" not in skip:
        model = bench_model(args.model_length, device, args.repeats)
        print_table("Tiny AKI, forward+backward (ratios against causal, same backend)", model)
        write_csv(model, args.out / "model.csv")
    print(f"\nwrote the tables under {args.out}")


if __name__ == "__main__":
    main()
