"""Training-step throughput of AKI: causal vs MMA per backend vs the official dense-mask approach.

    python benchmarks/bench_train.py [--shape tiny|small|smollm2|aki-4b] [--length 656] [--batch 4] [--out DIR]

One step = forward, summed next-token loss, backward and an AdamW update, on the AKI layout of
the paper's SFT (144 image tokens, a question, an answer; L = 656). The official approach is
re-stated as the official code runs it: a dense (b, 1, L, L) mask built per sample in Python every
step, passed as an additive float mask to eager attention. `tiny` is the demo's model (2 layers x 64)
with 144 image tokens; `small` fits a CPU; `smollm2` is the tiny
vision tower and connector in front of a SmolLM2-135M-shaped Llama (30 layers x 576, 9 heads, 3 KV heads,
vocabulary 49152; `--language-model` reads the shape from a folder's config.json), random weights (they
do not change the cost); `aki-4b` is the real shape (Phi-3.5-mini + SigLIP-so400m + Perceiver), for a GPU.
The runs take turns (round robin) and report medians, so load on a shared machine falls on all alike.
Also timed: transformers' mask builder for MMA (`create_mma_mask`, vmapped mask functions), which the
sdpa and eager paths run every step and `aki_split` does not (it builds `split_layout` instead).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    device_name,
    layout,
    official_mask,
    peak_memory,
    print_table,
    timed,
    timed_together,
    write_csv,
)

SMOLLM2_TEXT = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
}

SHAPES = {
    "tiny": {"preset": "tiny", "overrides": {"perceiver_num_latents": 144}},  # the demo's model, 144 image tokens
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
    "smollm2": {
        "preset": "tiny",
        "overrides": {"text_config": SMOLLM2_TEXT, "perceiver_num_latents": 144, "tie_word_embeddings": True},
    },
    "aki-4b": {"preset": "aki-4b", "overrides": {}},
}


def build(shape: str, device: torch.device, dtype: torch.dtype, language_model: Path | None = None):
    from aki import AkiForConditionalGeneration
    from aki.presets import config_from_preset

    spec = SHAPES[shape]
    overrides = dict(spec["overrides"])
    if language_model is not None:  # the language model's shape from its folder; the weights stay random
        from transformers import AutoConfig

        overrides["text_config"] = AutoConfig.from_pretrained(language_model).to_dict()
    config = config_from_preset(spec["preset"], **overrides)
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


def mask_builder_seconds(model, inputs: dict, repeats: int) -> dict:
    """Per step: transformers' vmapped mask builder for MMA (the sdpa/eager paths) and the split layout."""
    from aki.modeling_aki import create_mma_mask
    from aki.split_attention import split_layout

    ids, valid = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.get_input_embeddings()(ids).detach()
    windows = model.model.window_ids(ids, valid)
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    text_config._attn_implementation = "sdpa"
    try:
        builder = timed(lambda: create_mma_mask(text_config, embeds, valid, None, windows), repeats=repeats)
    finally:
        text_config._attn_implementation = previous
    b, s = ids.shape
    layout = timed(lambda: split_layout(valid, b, s, s, ids.device, windows), repeats=repeats)
    return {"mask_builder_s": builder, "split_layout_s": layout}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="aki-4b" if torch.cuda.is_available() else "small")
    parser.add_argument("--language-model", type=Path, help="take the smollm2 shape's text config from this folder")
    parser.add_argument("--length", type=int, default=656)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="", help="comma-separated: keep these backends (sdpa always runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build(args.shape, device, dtype, args.language_model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inputs, official_layout = inputs_for(model, args.batch, args.length, device, dtype)
    tokens = int(inputs["attention_mask"].sum())
    print(f"device: {device_name()}; shape {args.shape}; batch {args.batch} x {args.length} tokens; {dtype}")

    runs = [
        ("sdpa", "causal"),
        ("sdpa", "mma"),
        ("aki_split", "causal"),
        ("aki_split", "mma"),
        ("eager", "causal"),
        ("eager", "mma"),
        ("official: dense loop mask, eager", "mma"),
    ]
    if device.type == "cuda":
        runs[2:2] = [("flex_attention", "mma")]
    keep = [word for word in args.backends.split(",") if word]
    runs = [run for run in runs if not keep or run[0] == "sdpa" or any(run[0].startswith(word) for word in keep)]
    steps = {}
    for backend, policy in runs:
        official = backend.startswith("official")
        step = step_function(model, optimizer, inputs, official_layout if official else None)

        def configured_step(backend=backend, policy=policy, step=step, official=official):
            model.set_attn_implementation("eager" if official else backend)
            model.config.attention_policy = policy
            step()

        steps[f"{backend} / {policy}"] = configured_step
    seconds = timed_together(steps, repeats=args.repeats)
    rows = [
        {"method": name, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_mib": peak_memory(steps[name])}
        for name, step_s in seconds.items()
    ]
    causal = {backend: seconds[f"{backend} / causal"] for backend, policy in runs if policy == "causal"}
    official_time = seconds.get("official: dense loop mask, eager / mma")
    for row in rows:
        backend = row["method"].split(" / ")[0]
        row["vs_sdpa_causal"] = row["step_s"] / causal["sdpa"]
        row["vs_same_backend_causal"] = row["step_s"] / causal[backend] if backend in causal else None
        if official_time is not None:
            row["speedup_vs_official"] = official_time / row["step_s"]
    print_table(f"Training step, {args.shape} shape (ratios against causal and against the official approach)", rows)
    masks = mask_builder_seconds(model, inputs, args.repeats)
    masks["sdpa_mma_step_s"] = seconds["sdpa / mma"]
    masks["mask_builder_share_of_step"] = masks["mask_builder_s"] / seconds["sdpa / mma"]
    print_table("Per step: transformers' MMA mask builder (sdpa, eager) against aki_split's layout", [masks])
    write_csv(rows, args.out / f"train_{args.shape}.csv")
    write_csv([masks], args.out / f"mask_builder_{args.shape}.csv")
    print(f"\nwrote {args.out}/train_{args.shape}.csv and mask_builder_{args.shape}.csv")


if __name__ == "__main__":
    main()
