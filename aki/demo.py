"""`make demo`: a tiny AKI reads a real photo and a question, generates, and draws its masks.

The tiny model has random weights, so its words are noise; what the demo shows is the machinery:
the chat template, image expansion, MMA at prefill, cached decoding, and the attention mask that
MMA opens compared with the causal one.
"""

import argparse
import logging
import time
from pathlib import Path

import torch

from .masking import dense_attention_mask, render_mask, token_roles
from .presets import build_tiny

logger = logging.getLogger("aki.demo")


def draw_masks(model, inputs, out_dir: Path) -> dict[str, Path]:
    """Save the MMA and causal masks of the prompt; returns {policy: path}."""
    input_ids = inputs["input_ids"]
    windows = model.model.window_ids(input_ids, inputs["attention_mask"])
    roles = token_roles(input_ids, model.config.image_token_id, windows, inputs["attention_mask"])[0]
    paths = {}
    for policy in ("mma", "causal"):
        allowed = dense_attention_mask(windows, inputs["attention_mask"], policy)[0]
        opened = int((allowed & ~torch.ones_like(allowed).tril()).sum())
        title = f"{policy.upper()}: {input_ids.shape[1]} tokens, {opened} query-key pairs above the diagonal"
        paths[policy] = Path(render_mask(allowed, roles, str(out_dir / f"mask_{policy}.png"), title))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "tiny-llama"])
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from PIL import Image
    from skimage import data

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(args.preset, seed=0)
    image = Image.fromarray(data.astronaut())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    logger.info("model: %s preset, %.2fM parameters, attention_policy=%s", args.preset,
                sum(p.numel() for p in model.parameters()) / 1e6, model.config.attention_policy)  # fmt: skip
    logger.info("prompt: %d tokens, of which %d image tokens", inputs["input_ids"].shape[1],
                int((inputs["input_ids"] == model.config.image_token_id).sum()))  # fmt: skip

    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    paths = draw_masks(model, inputs, args.out)

    print(f"\nQuestion : {args.question}")
    print(f"Answer   : {answer!r}  (random weights: the words are noise)")
    for policy, path in paths.items():
        print(f"Mask     : {policy:6s} -> {path}")
    print(f"Elapsed  : {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
