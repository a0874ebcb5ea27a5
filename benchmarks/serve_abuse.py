"""`aki serve` under hostile clients: valid clients' latency beside them, and the server's memory.

    .venv/bin/python benchmarks/serve_abuse.py [--model DIR] [--clients 8] [--requests 6] [--seconds 180]

One server (`aki serve --allow-remote-images`, every other flag at its default) on 127.0.0.1, the model
the tiny Llama AKI (or --model DIR). Two runs, one after the other on the same server:
- quiet: `--clients` valid clients, each sending `--requests` image questions one after another
  (a 64 x 64 PNG as a data URL, greedy, 16 tokens);
- hostile: the same valid clients, with as many hostile ones beside them (in a process of their own at
  nice 19, standing in for other machines), each repeating its attack until the valid clients are done:
  a remote image that trickles a byte a second (from a local server), two 6300 x 6300 images (just
  under the pixel caps) in one request, a 64 MiB body.
Prints the valid clients' p50 / p95 latency in both runs, their ratio, and the server's peak memory
(its processes together) over its idle memory, with `uptime` before and after; writes the table to
OUTPUT/results.md. Every request is bounded by a timeout and every loop by `--seconds`; all traffic
stays on 127.0.0.1.
"""

import argparse
import contextlib
import http.client
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
from helpers import trickling_server  # noqa: E402
from serve_vllm import Server, free_port, image_url, percentile, png_url, uptime  # noqa: E402

REQUEST_TIMEOUT_S = 120
ATTACKS = ("trickle", "huge images", "huge body")


def tiny_model(folder: Path) -> Path:
    """The tiny Llama AKI (seed 0), saved once."""
    if (folder / "config.json").exists():
        return folder
    from aki.presets import build_tiny

    model, processor = build_tiny("tiny-llama", seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def image_turn(urls: list[str], question: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def valid_client(client, model: str, index: int, requests: int) -> list[float]:
    latencies = []
    for request in range(requests):
        started = time.monotonic()
        client.chat.completions.create(
            model=model,
            messages=image_turn([image_url(index * 100 + request)], f"Question {request}: what is in the image?"),
            max_tokens=16,
            temperature=0,
        )
        latencies.append(time.monotonic() - started)
    return latencies


def attack(kind: str, client, model: str, server: str, slow: str, huge: str, stop: threading.Event, deadline) -> int:
    """Repeat one attack until `stop` (or the deadline); returns how many were answered as they should be:
    the trickle refused, the huge images served within the caps, the huge body a 413."""
    import openai

    refused = 0
    while not stop.is_set() and time.time() < deadline:
        if kind == "huge body":
            connection = http.client.HTTPConnection(server.split("//")[1], timeout=REQUEST_TIMEOUT_S)
            connection.putrequest("POST", "/v1/chat/completions")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(64 * 2**20))
            connection.endheaders()
            with contextlib.suppress(OSError):
                for _ in range(64):
                    connection.send(b"x" * 2**20)
            refused += connection.getresponse().status == 413
            connection.close()
            continue
        urls = [slow] if kind == "trickle" else [huge, huge]
        try:
            client.chat.completions.create(model=model, messages=image_turn(urls, "What is it?"), max_tokens=16)
        except openai.BadRequestError:
            refused += kind == "trickle"
        else:
            refused += kind == "huge images"  # served, within the caps
    return refused


class PeakMemory:
    """Polls a process and its children's RSS every 50 ms while entered; `peak` in bytes."""

    def __init__(self, pid: int):
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def now(self) -> int:
        processes = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running())

    def __enter__(self):
        def poll():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.now())
                time.sleep(0.05)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def attackers(kinds: list[str], count: int, model: str, server: str, slow: str, huge: str, stop, deadline, handled):
    """The hostile clients, in a process of their own at the lowest CPU priority: they stand in for machines
    of their own, so what the run measures is what the server spends on them, not the CPU their loops burn
    on this one (nor the GIL the valid clients' timing runs under). `count` threads, the attacks of `kinds`
    in turn; puts the total handled."""
    import openai

    os.nice(19)

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [
            pool.submit(attack, kinds[i % len(kinds)], client, model, server, slow, huge, stop, deadline)
            for i in range(count)
        ]
        handled.put(sum(future.result() for future in futures))


def run(client, model: str, args, hostile: tuple[str, str, str] | None) -> dict:
    context = multiprocessing.get_context("spawn")
    stop, handled = context.Event(), context.Queue()
    deadline = time.time() + args.seconds
    process = None
    if hostile:
        process = context.Process(
            target=attackers, args=(args.attacks, args.clients, model, *hostile, stop, deadline, handled)
        )
        process.start()
        time.sleep(3.0)  # the attacks under way first
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        valid = [pool.submit(valid_client, client, model, i, args.requests) for i in range(args.clients)]
        latencies = [latency for future in valid for latency in future.result(timeout=args.seconds + 60)]
    stop.set()
    refused = handled.get(timeout=REQUEST_TIMEOUT_S) if process else 0
    if process:
        process.join(timeout=REQUEST_TIMEOUT_S)
    return {
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "requests": len(latencies),
        "attacks_handled": refused,
    }


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an AKI folder (default: the tiny Llama AKI, saved under OUTPUT)")
    parser.add_argument("--clients", type=int, default=8, help="valid clients, and as many hostile ones")
    parser.add_argument("--requests", type=int, default=6, help="requests per valid client and run")
    parser.add_argument("--seconds", type=float, default=180, help="the longest a run may take")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), type=lambda text: text.split(","), help="which, comma-separated"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "serve_abuse")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    model = str(args.model or tiny_model(args.output / "model"))
    huge = png_url(Image.new("RGB", (6300, 6300), "teal"))  # 39.7 million pixels, under the 40 million cap

    port = free_port()
    command = [sys.executable, "-m", "aki.cli", "serve", "--model", model, "--port", str(port), "--allow-remote-images"]
    load_before = uptime()
    server = Server(command, port, args.output / "server.log")
    with server as url, trickling_server(max_seconds=60) as (trickle, _):
        slow = f"{trickle}/slow.png"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        valid_client(client, model, 999, 1)  # warm-up
        idle = PeakMemory(server.process.pid).now()
        results = {}
        for name, hostile in (("quiet", None), ("hostile", (url, slow, huge))):
            with PeakMemory(server.process.pid) as memory:
                results[name] = run(client, model, args, hostile)
            results[name]["peak_gb"] = (memory.peak - idle) / 2**30
            print(name, results[name], flush=True)
    table = render(results, args, load_before, uptime())
    (args.output / "results.md").write_text(table)
    print(table)


def render(results: dict, args, load_before: str, load_after: str) -> str:
    quiet = results["quiet"]["p95"]
    lines = [
        f"uptime before: {load_before}",
        f"uptime after:  {load_after}",
        "",
        f"{args.clients} valid clients x {args.requests} image requests; hostile run: {args.clients} attackers "
        f"({', '.join(args.attacks)}, in turn) in a process of their own",
        "",
        "| run | valid p50 (s) | valid p95 (s) | p95 / quiet p95 | peak memory over idle (GB) | attacks handled |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['p50']:.2f} | {row['p95']:.2f} | {row['p95'] / quiet:.2f} | {row['peak_gb']:.2f} | "
            f"{row['attacks_handled'] if name == 'hostile' else '-'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
