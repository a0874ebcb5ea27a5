"""`aki serve`, the real server on 127.0.0.1, through the official `openai` client.

One server for the module, started as a user starts it (`python -m aki.cli serve`), on the tiny
Llama AKI: its greedy answers change when MMA is off, so answers equal to the local MMA model's show
the server encodes each image with its question. Every request is bounded by the client's timeout,
the client never retries, and the server is stopped at the end.
"""

import base64
import contextlib
import copy
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers import save_checkpoint  # noqa: E402
from tokenizers.decoders import DecodeStream  # noqa: E402

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
MAX_TOKENS = 8
# On the tiny Llama AKI (seed 0) this question about the astronaut is answered differently with MMA off.
MMA_QUESTION = "Which colour?"


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log_file) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"aki serve exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if json.load(response) == {"status": "ok"}:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"aki serve was not healthy after {STARTUP_TIMEOUT_S} s:\n{log_file.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llama):
    return str(save_checkpoint(*tiny_llama, tmp_path_factory.mktemp("tiny_llama_checkpoint")))


@contextlib.contextmanager
def running_server(folder: str, log_dir):
    """The base URL of `aki serve --model <folder>` on a free port of 127.0.0.1, stopped on exit."""
    port = free_port()
    log_file = log_dir / "server.log"
    command = [sys.executable, "-m", "aki.cli", "serve", "--model", folder, "--port", str(port)]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_file)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(checkpoint, tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def image_turn(url: str, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    }


def local_answer_ids(model, processor, messages, images) -> list[int]:
    """Greedy answer ids of the in-process model, the prompt built as `aki chat` builds it."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def processor_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def streamed_text(tokenizer, ids: list[int]) -> str:
    """What a token-by-token decode emits for `ids` (tokenizers' DecodeStream, as the server streams)."""
    stream = DecodeStream([], skip_special_tokens=True)
    return "".join(piece for token in ids if (piece := stream.step(tokenizer.backend_tokenizer, token)) is not None)


def test_models_lists_the_served_folder(client, checkpoint):
    assert [model.id for model in client.models.list()] == [checkpoint]


def test_image_chat_is_the_local_mma_answer(client, checkpoint, tiny_llama, images):
    model, processor = tiny_llama
    expected = local_answer_ids(model, processor, [processor_turn(MMA_QUESTION)], images[:1])
    causal = copy.deepcopy(model)
    causal.config.attention_policy = "causal"
    assert local_answer_ids(causal, processor, [processor_turn(MMA_QUESTION)], images[:1]) != expected

    response = client.chat.completions.create(
        model=checkpoint, messages=[image_turn(png_data_url(images[0]), MMA_QUESTION)], max_tokens=MAX_TOKENS
    )

    assert response.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == MAX_TOKENS
    prompt = processor.apply_chat_template([processor_turn(MMA_QUESTION)], add_generation_prompt=True, tokenize=False)
    assert response.usage.prompt_tokens == len(processor(images=images[:1], text=prompt)["input_ids"][0])


def test_streamed_two_turn_chat_is_the_local_answer(client, checkpoint, tiny_llama, images, tmp_path):
    """Two images, each in the user turn of its own question; the second read from a path on the server."""
    model, processor = tiny_llama
    path = tmp_path / "chelsea.png"
    images[1].save(path)
    history = {"role": "assistant", "content": "An astronaut."}
    local = [processor_turn("What is in the image?"), history, processor_turn("And in this one?")]
    expected = local_answer_ids(model, processor, local, images[:2])

    stream = client.chat.completions.create(
        model=checkpoint,
        messages=[
            image_turn(png_data_url(images[0]), "What is in the image?"),
            history,
            image_turn(str(path), "And in this one?"),
        ],
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = list(stream)

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == streamed_text(
        processor.tokenizer, expected
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_text_only_chat_is_the_local_answer(client, checkpoint, tiny_llama):
    model, processor = tiny_llama
    messages = [{"role": "user", "content": "Which colour is the sky?"}]
    expected = local_answer_ids(model, processor, messages, None)

    response = client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)

    assert response.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)


def test_eight_concurrent_requests_are_all_answered(client, checkpoint, tiny_llama, images):
    model, processor = tiny_llama
    questions = [f"Question {index}: what is in the image?" for index in range(8)]
    url = png_data_url(images[0])

    def ask(question):
        messages = [image_turn(url, question)]
        return client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        responses = list(pool.map(ask, questions, timeout=REQUEST_TIMEOUT_S * 2))

    for question, response in zip(questions, responses, strict=True):
        expected = local_answer_ids(model, processor, [processor_turn(question)], images[:1])
        assert response.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)
    assert len({response.id for response in responses}) == len(questions)


def truncated_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 2]).decode()


BAD_IMAGES = {
    "missing file": (lambda images, tmp: str(tmp / "missing.png"), "image_not_found", "No image file at"),
    "not an image": (lambda images, tmp: "data:image/png;base64," + base64.b64encode(b"plain text").decode(),
                     "invalid_image", "is not a readable image"),
    "truncated image": (lambda images, tmp: truncated_png(images[0]), "invalid_image", "is not a readable image"),
    "bad base64": (lambda images, tmp: "data:image/png;base64,%%%", "invalid_image", "not valid base64"),
    "remote url": (lambda images, tmp: "http://127.0.0.1:9/photo.png", "remote_image_disabled", "--allow-remote-images"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_400_naming_it(client, checkpoint, images, tmp_path, case):
    make_url, code, message = BAD_IMAGES[case]
    messages = [{"role": "user", "content": "Hello."}, image_turn(make_url(images, tmp_path), "What is it?")]

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)

    assert raised.value.code == code
    assert raised.value.param == "messages[1].content[0]"
    assert message in raised.value.message


def test_more_images_than_places_is_a_400(client, checkpoint, images):
    """The chat template shows no image in a system message: that image has no `<image>` place."""
    url = png_data_url(images[0])
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]}

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=checkpoint, messages=[system, image_turn(url, "What is it?")], max_tokens=MAX_TOKENS
        )

    assert raised.value.code == "too_many_images"
    assert "2 images but the prompt has places for 1" in raised.value.message


def test_image_marker_typed_in_the_text_is_a_400(client, checkpoint):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=checkpoint, messages=[{"role": "user", "content": "Look: <image>"}], max_tokens=MAX_TOKENS
        )

    assert raised.value.code == "image_marker_in_text"


def test_unknown_model_is_a_404_naming_the_served_one(client, checkpoint):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello."}], max_tokens=MAX_TOKENS
        )

    assert raised.value.code == "model_not_found"
    assert "'gpt-4o'" in raised.value.message and checkpoint in raised.value.message


def test_video_part_is_a_400(client, checkpoint):
    video = {"type": "video_url", "video_url": {"url": "/tmp/clip.mp4"}}
    messages = [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)

    assert raised.value.code == "unsupported_content"
    assert raised.value.param == "messages[0].content[0]"


def post_raw(server: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_malformed_json_is_a_400_saying_so(server, checkpoint):
    status, body = post_raw(server, b'{"model": "x", "messages": [')

    assert status == 400
    assert body["error"]["code"] == "invalid_body"
    assert "not valid JSON" in body["error"]["message"]


def test_messages_that_are_not_a_list_are_a_400(server, checkpoint):
    status, body = post_raw(server, json.dumps({"model": checkpoint, "messages": "Hello."}).encode())

    assert status == 400
    assert body["error"]["param"] == "messages"


def test_remote_images_are_fetched_when_allowed(images, tmp_path):
    """`--allow-remote-images`: an http URL is fetched (here from a server on 127.0.0.1)."""
    from aki.serving import read_image

    images[1].save(tmp_path / "chelsea.png")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as file_server:
        thread = threading.Thread(target=file_server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{file_server.server_address[1]}/chelsea.png"
            fetched = read_image(url, "messages[0].content[0]", allow_remote=True)
        finally:
            file_server.shutdown()

    assert fetched.tobytes() == images[1].convert("RGB").tobytes()


def test_serve_refuses_a_folder_without_an_aki_model(tmp_path, capsys):
    from aki.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for folder, message in [(tmp_path / "missing", "has no config.json"), (tmp_path, "holds a 'llama' model")]:
        with pytest.raises(SystemExit):
            main(["serve", "--model", str(folder)])
        assert message in capsys.readouterr().err


def test_text_chat_with_the_smollm2_aki_answers_sensibly(tmp_path):
    """A pretrained language model behind the server talks: SmolLM2 (make smollm2) in an assembled AKI."""
    import torch

    from aki.assemble import from_parts
    from aki.presets import TINY_VISION
    from aki_demo.smollm2 import build

    root = Path(__file__).resolve().parent.parent
    try:
        language_model = build(root / "checkpoints" / "SmolLM2-135M-Instruct", root / ".cache" / "smollm2")
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 unavailable: {error}")
    torch.manual_seed(0)
    folder = save_checkpoint(*from_parts(TINY_VISION, str(language_model), connector_type="mlp"), tmp_path / "aki")
    with running_server(str(folder), tmp_path) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        reply = client.chat.completions.create(
            model=str(folder),
            # An empty system prompt: AKI's default one derails a model this small (see aki chat --system).
            messages=[{"role": "system", "content": ""}, {"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content
