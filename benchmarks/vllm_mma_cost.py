"""What MMA costs in vLLM, and what prefix caching saves on second turns, in one run.

    .venv-vllm/bin/python benchmarks/vllm_mma_cost.py [--model DIR] [--concurrency 8,32] [--repeats 3]

Four vLLM OpenAI servers of the same model (the SmolLM2-based AKI of serve_vllm.py, float32) run side
by side: attention_policy causal (vLLM's plain CPU_ATTN path) and mma, each with vLLM's defaults
(prefix caching and chunked prefill on) and with both off, all with KV blocks of 32 tokens (prefix
caching reuses whole blocks, and this small model's prompts fill none of vLLM's CPU default, 128).
Only one server works at a time; the others wait idle.

1. **Image requests.** For each repeat, concurrency level and setting, causal and MMA take turns (the
   two policies interleaved): N image requests at once through the `openai` client, a fresh image each
   (nothing cached from before), at most --max-tokens tokens, EOS ignored so both policies generate
   the same count. Reported: medians over the repeats of generated tokens/s and p95 latency, and MMA
   over causal.
2. **Two-turn chat** (MMA, caching on against off). N conversations: turn 1 (a fresh image and a
   question, --turn1-tokens long answers), then turn 2, which re-sends turn 1, its image and its
   answer, and asks a follow-up in text (--turn2-tokens). Turn 2 is timed; reported: medians of its
   wall time and p95 latency, and off over on.

Prints the tables with `uptime` before and after, and writes them to OUTPUT/results.md.
"""

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vllm import QUESTIONS, Server, build_model, free_port, image_url, percentile, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("causal", "mma")
SETTINGS = {
    "caching and chunking on": [],
    "caching and chunking off": ["--no-enable-prefix-caching", "--no-enable-chunked-prefill"],
}
FOLLOW_UP = "And what else is in the image?"
# Prefix caching reuses whole blocks, and this small model's prompts fill no block of vLLM's CPU default (128).
BLOCK_SIZE = 32


def server_command(model: Path, port: int, policy: str, flags: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--block-size", str(BLOCK_SIZE),
        "--hf-overrides", f'{{"attention_policy": "{policy}"}}', *flags,
    ]  # fmt: skip


def first_turn(seed: int) -> list[dict]:
    return [
        {"role": "system", "content": ""},  # AKI's default system prompt derails a model this small
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url(seed)}},
                {"type": "text", "text": QUESTIONS[seed % len(QUESTIONS)]},
            ],
        },
    ]


def chat(client, messages: list[dict], max_tokens: int) -> tuple[float, int, str]:
    """(latency in s, generated tokens, answer)."""
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model=client.served_model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    return time.perf_counter() - started, reply.usage.completion_tokens, reply.choices[0].message.content


def burst(client, conversations: list[list[dict]], max_tokens: int) -> dict:
    """All conversations sent at once: tokens, wall time, tokens/s, p95 latency, answers."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(conversations)) as pool:
        results = list(pool.map(lambda messages: chat(client, messages, max_tokens), conversations))
    wall = time.perf_counter() - started
    tokens = sum(count for _, count, _ in results)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p95_s": percentile([latency for latency, _, _ in results], 0.95),
        "answers": [answer for _, _, answer in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an AKI folder (default: the SmolLM2-based AKI, built once)")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chats", type=int, default=8, help="conversations in the two-turn workload")
    parser.add_argument("--turn1-tokens", type=int, default=128)
    parser.add_argument("--turn2-tokens", type=int, default=8)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "vllm_mma_cost")
    args = parser.parse_args()
    import openai

    args.output.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(ROOT / "outputs" / "serve_vllm" / "model")
    levels = [int(level) for level in args.concurrency.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    load_before = uptime()
    clients = {}
    with ExitStack() as servers:
        for setting, flags in SETTINGS.items():
            for policy in POLICIES:
                port = free_port()
                log = args.output / f"{policy}_{'on' if not flags else 'off'}.log"
                url = servers.enter_context(Server(server_command(model, port, policy, flags), port, log))
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0)
                client.served_model = str(model)  # vLLM serves the folder under its path
                chat(client, first_turn(10**6), 4)  # warm-up
                clients[setting, policy] = client
                print(f"started: {policy}, {setting}", flush=True)
        seed = 0
        images = {}  # (setting, level, policy) -> bursts
        for repeat in range(args.repeats):
            for level in levels:
                for setting in SETTINGS:
                    for policy in POLICIES:
                        conversations = [first_turn(seed + index) for index in range(level)]
                        seed += level
                        result = burst(clients[setting, policy], conversations, args.max_tokens)
                        images.setdefault((setting, level, policy), []).append(result)
                        print(f"#{repeat} x{level} {policy}, {setting}: {result['wall_s']:.2f} s", flush=True)
        turns = {}  # setting -> turn-2 bursts (MMA)
        for repeat in range(args.repeats):
            for setting in SETTINGS:
                client = clients[setting, "mma"]
                conversations = [first_turn(seed + index) for index in range(args.chats)]
                seed += args.chats
                answers = burst(client, conversations, args.turn1_tokens)["answers"]
                second = [
                    [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
                    for messages, answer in zip(conversations, answers, strict=True)
                ]
                turns.setdefault(setting, []).append(burst(client, second, args.turn2_tokens))
                print(f"#{repeat} turn 2, {setting}: {turns[setting][-1]['wall_s']:.2f} s", flush=True)
    table = render(images, turns, levels, args, load_before, uptime())
    (args.output / "results.md").write_text(table)
    print(table)


def median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def render(images: dict, turns: dict, levels: list[int], args, load_before: str, load_after: str) -> str:
    lines = [
        f"uptime before: {load_before}",
        f"uptime after:  {load_after}",
        "",
        f"Image requests ({args.max_tokens} tokens each, medians of {args.repeats}, causal and MMA interleaved):",
        "",
        "| concurrent | vLLM settings | policy | tokens/s | p95 latency (s) | MMA / causal (time) |",
        "|---|---|---|---|---|---|",
    ]
    for level in levels:
        for setting in SETTINGS:
            causal = median(images[setting, level, "causal"], "wall_s")
            for policy in POLICIES:
                runs = images[setting, level, policy]
                ratio = median(runs, "wall_s") / causal
                lines.append(
                    f"| {level} | {setting} | {policy} | {median(runs, 'tokens_per_s'):.1f} | "
                    f"{median(runs, 'p95_s'):.2f} | {ratio:.2f}x |"
                )
    lines += [
        "",
        f"Second turns ({args.chats} chats at once, MMA, turn 1 answers of {args.turn1_tokens} tokens, "
        f"turn 2 of {args.turn2_tokens}, medians of {args.repeats}):",
        "",
        "| vLLM settings | turn 2 wall (s) | p95 latency (s) | off / on |",
        "|---|---|---|---|",
    ]
    on = median(turns["caching and chunking on"], "wall_s")
    for setting in SETTINGS:
        wall = median(turns[setting], "wall_s")
        lines.append(f"| {setting} | {wall:.2f} | {median(turns[setting], 'p95_s'):.2f} | {wall / on:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
