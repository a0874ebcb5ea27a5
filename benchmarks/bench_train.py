"""Training-step throughput of AKI: causal vs MMA per backend vs the official dense-mask approach.

    python benchmarks/bench_train.py [--shape small|aki-4b] [--length 656] [--batch 4] [--out benchmarks/results]

One step = forward, summed next-token loss, backward and an AdamW update, on the AKI layout of
the paper's SFT (144 image tokens, a question, an answer; L = 656). The official approach is
re-stated as the official code runs it: a dense (b, 1, L, L) mask built per sample in Python every
step, passed as an additive float mask to eager attention. `small` fits a CPU; `aki-4b` is the real
shape (Phi-3.5-mini + SigLIP-so400m + Perceiver), for a GPU.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, layout, official_mask, peak_memory, print_table, timed, write_csv  # noqa: E402

SHAPES = {
    "small": {
        "preset": "tiny",
        "overrides": {
            "text_config": {
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096,
            },
            "perceiver_num_latents": 144,
        },  # fmt: skip
    },
    "aki-4b": {"preset": "aki-4b", "overrides": {}},
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from aki import AkiForConditionalGeneration
    from aki.presets import config_from_preset

    spec = SHAPES[shape]
    config = config_from_preset(spec["preset"], **spec["overrides"])
    model = AkiForConditionalGeneration(config).to(device=device, dtype=dtype)
    model.model.vision_tower.requires_grad_(False)
    return model


def inputs_for(model, batch: int, length: int, device: torch.device, dtype: torch.dtype):
    config = model.config
    ids, valid = layout(batch, length)
    if config.num_image_tokens != 144:
        raise ValueError("The benchmark layout holds one 144-token image per row.")
    vocab = config.text_config.vocab_size
    text = torch.randint(10, min(vocab, 400), ids.shape)
    ids = torch.where(ids == 3, config.image_token_id, torch.where(ids == 7, config.assistant_marker_ids[0], text))
    size = config.vision_config.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": valid.to(device),
        "pixel_values": torch.randn(batch, 3, size, size, device=device, dtype=dtype),
    }, (ids, valid)


def step_function(model, optimizer, inputs, official_layout=None):
    def step():
        batch = dict(inputs)
        if official_layout is not None:  # rebuilt every step, as the official forward does
            batch["attention_mask"] = official_mask(*official_layout, dtype=model.dtype).to(model.device)
        logits = model(**batch).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="aki-4b" if torch.cuda.is_available() else "small")
    parser.add_argument("--length", type=int, default=656)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build(args.shape, device, dtype)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs, official_layout = inputs_for(model, args.batch, args.length, device, dtype)
    tokens = int(inputs["attention_mask"].sum())
    print(f"device: {device_name()}; shape {args.shape}; batch {args.batch} x {args.length} tokens; {dtype}")

    runs = [
        ("sdpa", "causal"),
        ("sdpa", "mma"),
        ("eager", "causal"),
        ("eager", "mma"),
        ("official: dense loop mask, eager", "mma"),
    ]
    if device.type == "cuda":
        runs[2:2] = [("flex_attention", "mma"), ("aki_split", "causal"), ("aki_split", "mma")]
    rows = []
    for backend, policy in runs:
        official = backend.startswith("official")
        model.set_attn_implementation("eager" if official else backend)
        model.config.attention_policy = policy
        step = step_function(model, optimizer, inputs, official_layout if official else None)
        seconds = timed(step, repeats=args.repeats)
        rows.append(
            {
                "method": f"{backend} / {policy}",
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "peak_mib": peak_memory(step),
            }
        )
    causal = rows[0]["step_s"]
    official_time = rows[-1]["step_s"]
    for row in rows:
        row["vs_sdpa_causal"] = row["step_s"] / causal
        row["speedup_vs_official"] = official_time / row["step_s"]
    print_table(
        f"Training step, {args.shape} shape (ratios against sdpa causal and against the official approach)", rows
    )
    write_csv(rows, args.out / f"train_{args.shape}.csv")
    print(f"\nwrote {args.out}/train_{args.shape}.csv")


if __name__ == "__main__":
    main()
