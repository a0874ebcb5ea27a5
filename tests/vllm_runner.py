"""Greedy tokens from `vllm.LLM` for tests/test_vllm.py, in a process of its own.

    python tests/vllm_runner.py SPEC.json OUT.json

SPEC holds `model` (a saved AKI folder), `engine` (keyword arguments of `vllm.LLM`) and `rounds`:
lists of requests (`prompt`, `images` as file paths, `max_tokens`), each list sent in one
`generate` call, the lists one after the other on the same engine. OUT gets, per round, each
request's generated token ids (EOS ignored), finish reason and prompt tokens read from the prefix cache
(`num_cached_tokens`), or the round's error message. vLLM's engine is a spawned process,
hence the `__main__` guard and a process per engine (tests start engines with other settings).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves most of the RAM


def run(spec: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = LLM(spec["model"], **spec["engine"])
    rounds = []
    for requests in spec["rounds"]:
        prompts = [
            {
                "prompt": request["prompt"],
                "multi_modal_data": {"image": [Image.open(path) for path in request["images"]]},
            }
            if request["images"]
            else {"prompt": request["prompt"]}
            for request in requests
        ]
        params = [
            SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True) for request in requests
        ]
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        except (ValueError, VLLMValidationError) as error:
            rounds.append({"error": str(error)})
            continue
        rounds.append(
            {
                "tokens": [list(output.outputs[0].token_ids) for output in outputs],
                "finish_reasons": [output.outputs[0].finish_reason for output in outputs],
                "cached": [output.num_cached_tokens or 0 for output in outputs],
            }
        )
    return {"rounds": rounds}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:]
    with open(spec_path) as file:
        result = run(json.load(file))
    with open(out_path, "w") as file:
        json.dump(result, file)
