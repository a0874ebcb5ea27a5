"""Can `transformers serve --continuous-batching` take AKI? Three checks on the tiny AKI, printed as a table.

    python benchmarks/serve_continuous_batching.py

1. The server's gate: `GenerationState.use_continuous_batching` for AKI's config and processor.
2. The request API: which inputs `ContinuousBatchingManager.add_request` carries (are images among them?).
3. A text-only chat through continuous batching (`generate_batch`) against `generate`, greedy.
"""

import inspect
import sys
from pathlib import Path

from transformers import GenerationConfig
from transformers.cli.serving.utils import GenerationState
from transformers.generation.continuous_batching import ContinuousBatchingManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from aki.presets import build_tiny  # noqa: E402

MAX_NEW_TOKENS = 8


def server_gate(model, processor) -> str:
    routed = GenerationState(continuous_batching=True).use_continuous_batching(model.config, processor)
    return "continuous batching" if routed else "sequential generate (continuous batching takes text-only LMs)"


def request_inputs() -> str:
    names = [name for name in inspect.signature(ContinuousBatchingManager.add_request).parameters if name != "self"]
    return ", ".join(names) + ("" if "pixel_values" in names else " (no pixel_values)")


def text_chat(model, processor) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which colour is the sky?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt_length = inputs["input_ids"].shape[1]
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, prompt_length:].tolist()
    eos = processor.tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos)
    (output,) = model.generate_batch([inputs["input_ids"][0].tolist()], generation_config=config).values()
    if output.error is not None:
        return f"failed: {output.error}"
    return "same tokens as generate" if output.generated_tokens == expected else "different tokens from generate"


def main() -> None:
    model, processor = build_tiny("tiny-llama", seed=0)
    rows = [
        {"check": "transformers serve's gate", "result": server_gate(model, processor)},
        {"check": "add_request inputs", "result": request_inputs()},
        {"check": "text-only chat, continuous batching", "result": text_chat(model, processor)},
    ]
    print_table("Continuous batching and AKI (tiny-llama, seed 0)", rows)


if __name__ == "__main__":
    main()
