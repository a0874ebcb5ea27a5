"""Serving on the CPU: `vllm serve` (AKI's vLLM plugin) against `aki serve`, in one run.

    .venv-vllm/bin/python benchmarks/serve_vllm.py [--model DIR] [--concurrency 8,32,64] [--max-tokens 32]

The model is the SmolLM2-based AKI (`make smollm2`; a tiny SigLIP tower, an MLP connector, SmolLM2-135M,
float32), saved once under outputs/serve_vllm/model unless --model names another folder. For each
server in turn: start it as a user does (`aki serve` from .venv, vLLM's OpenAI server from
.venv-vllm, prefix caching and chunked prefill off as the published figures were measured), send one
warm-up request, then for each concurrency level N send N image requests at once (a different image
each, greedy, up to --max-tokens) through the `openai` client and time them. Prints one table
(generated tokens/s, p50 and p95 latency, and vLLM's tokens/s over aki serve's at each level) with
`uptime` before and after: the figures are only comparable within one run, on one machine, under one
load. The table is also written to OUTPUT/results.md.
"""

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
QUESTIONS = ("What colour is the shape?", "Where is the circle?", "Describe the image.", "What is in the image?")
STARTUP_TIMEOUT_S = 900


def build_model(folder: Path) -> Path:
    """The SmolLM2-based AKI (seed 0), saved once."""
    if (folder / "config.json").exists():
        return folder
    from aki.assemble import from_parts
    from aki.presets import TINY_VISION

    torch.manual_seed(0)
    model, processor = from_parts(TINY_VISION, str(SMOLLM2), connector_type="mlp")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_url(seed: int) -> str:
    """A 64 x 64 PNG of random pixels (`seed`) as a data URL."""
    generator = torch.Generator().manual_seed(seed)
    return png_url(Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def server_commands(model: Path, port: int, aki_python: str, vllm: list[str]) -> dict[str, list[str]]:
    return {
        "aki serve": [aki_python, "-m", "aki.cli", "serve", "--model", str(model), "--port", str(port)],
        "vllm serve": [
            *vllm, str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            # Caching and chunking off, as the published figures (benchmarks/README.md) were measured.
            "--max-model-len", "2048", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
        ],
    }  # fmt: skip


class Server:
    """A server process on 127.0.0.1, healthy on entry, stopped on exit."""

    def __init__(self, command: list[str], port: int, log_file: Path):
        self.command, self.url, self.log_file = command, f"http://127.0.0.1:{port}", log_file

    def __enter__(self) -> str:
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.command[:3]} did not start; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self.url
            except OSError:
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def ask(client, model: str, seed: int, max_tokens: int) -> tuple[float, int]:
    """One image question: (latency in s, generated tokens)."""
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": ""},  # AKI's default system prompt derails a model this small
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(seed)}},
                    {"type": "text", "text": QUESTIONS[seed % len(QUESTIONS)]},
                ],
            },
        ],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    return time.perf_counter() - started, reply.usage.completion_tokens


def run_level(client, model: str, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` requests sent at once: generated tokens/s over the whole burst, p50/p95 latency."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda seed: ask(client, model, seed, max_tokens), range(concurrency)))
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    tokens = sum(count for _, count in results)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an AKI folder (default: the SmolLM2-based AKI, built once)")
    parser.add_argument("--concurrency", default="8,32,64")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, help="default: a free port of 127.0.0.1")
    parser.add_argument("--aki-python", default=str(ROOT / ".venv" / "bin" / "python"))
    # vllm-cpu 0.32.0's `vllm` command stops at start (it asks for a distribution named "vllm"), so vLLM's server
    # starts through its module, from this Python (.venv-vllm); `vllm serve` is the same with the CUDA wheel.
    parser.add_argument(
        "--vllm",
        nargs="+",
        default=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"],
        help="the command that starts vLLM's OpenAI server, up to the model folder (e.g. vllm serve)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "serve_vllm")
    args = parser.parse_args()
    import openai

    args.output.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.output / "model")
    levels = [int(level) for level in args.concurrency.split(",")]
    load_before = uptime()
    results = {}
    port = args.port or free_port()
    for name, command in server_commands(model, port, args.aki_python, args.vllm).items():
        with Server(command, port, args.output / f"{name.replace(' ', '_')}.log") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0)
            ask(client, str(model), 10_000, args.max_tokens)  # warm-up
            for level in levels:
                results[name, level] = run_level(client, str(model), level, args.max_tokens)
                print(f"{name} x{level}: {results[name, level]}", flush=True)
    table = render(results, levels, load_before, uptime())
    (args.output / "results.md").write_text(table)
    print(table)


def render(results: dict, levels: list[int], load_before: str, load_after: str) -> str:
    """The markdown table, with the load before and after."""
    lines = [
        f"uptime before: {load_before}",
        f"uptime after:  {load_after}",
        "",
        "| concurrent | server | tokens | tokens/s | p50 latency (s) | p95 latency (s) | vLLM / aki serve |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        for name in ("aki serve", "vllm serve"):
            row = results[name, level]
            ratio = row["tokens_per_s"] / results["aki serve", level]["tokens_per_s"]
            lines.append(
                f"| {level} | {name} | {row['tokens']} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | "
                f"{row['p95_s']:.2f} | {ratio:.2f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
