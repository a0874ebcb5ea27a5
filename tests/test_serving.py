"""`aki serve`, the real server on 127.0.0.1, through the official `openai` client.

Two servers for the module, started as a user starts them (`python -m aki.cli serve`), on the tiny
Llama AKI: `server` with the defaults (no local files, no remote images, no key) and `open_server`
with a media folder, remote images under a byte cap, a pixel cap and an API key. The tiny Llama's
greedy answers change when MMA is off, so answers equal to the local MMA model's show the server
encodes each image with its question. Every request is bounded by the client's timeout, the client
never retries, and the servers are stopped at the end.
"""

import base64
import contextlib
import copy
import http.server
import io
import json
import os
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

from helpers import free_port, png_data_url, save_checkpoint, stop_process, trickling_server  # noqa: E402
from tokenizers.decoders import DecodeStream  # noqa: E402

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
MAX_TOKENS = 8
# On the tiny Llama AKI (seed 0) this question about the astronaut is answered differently with MMA off.
MMA_QUESTION = "Which colour?"
API_KEY = "test-key-0123"
MAX_IMAGE_BYTES = 2_000_000
MAX_IMAGE_PIXELS = 4_000_000
FETCH_TIMEOUT_S = 3.0


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
def running_server(folder: str, log_dir, *flags: str, env: dict | None = None):
    """The base URL and process of `aki serve --model <folder> <flags>` on a free port of 127.0.0.1, stopped on exit."""
    port = free_port()
    log_file = log_dir / "server.log"
    command = [sys.executable, "-m", "aki.cli", "serve", "--model", folder, "--port", str(port), *flags]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_file)
        yield url, process
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(checkpoint, tmp_path_factory.mktemp("serve")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, images):
    """The open server's media folder: chelsea.png, a symlink out of it, and a sibling folder with a secret."""
    root = tmp_path_factory.mktemp("media_root")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    images[1].save(media / "chelsea.png")
    images[1].save(outside / "secret.png")
    (media / "link.png").symlink_to(outside / "secret.png")
    (outside / "loop_a").symlink_to(outside / "loop_b")  # a symlink loop outside the folder
    (outside / "loop_b").symlink_to(outside / "loop_a")
    return media


@pytest.fixture(scope="module")
def open_server(checkpoint, media_dir, tmp_path_factory):
    flags = (
        *("--allowed-local-media-path", str(media_dir), "--allow-remote-images"),
        *("--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS)),
        *("--image-fetch-timeout", str(FETCH_TIMEOUT_S)),
    )
    # The key as the README advises, from the environment (`--api-key KEY` sets the same field).
    folder = tmp_path_factory.mktemp("serve_open")
    with running_server(checkpoint, folder, *flags, env={"AKI_API_KEY": API_KEY}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def open_client(open_server):
    return openai.OpenAI(base_url=f"{open_server}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0)


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


def test_streamed_two_turn_chat_is_the_local_answer(open_client, checkpoint, tiny_llama, images, media_dir):
    """Two images, each in the user turn of its own question; the second read from the server's media folder."""
    model, processor = tiny_llama
    history = {"role": "assistant", "content": "An astronaut."}
    local = [processor_turn("What is in the image?"), history, processor_turn("And in this one?")]
    expected = local_answer_ids(model, processor, local, images[:2])

    stream = open_client.chat.completions.create(
        model=checkpoint,
        messages=[
            image_turn(png_data_url(images[0]), "What is in the image?"),
            history,
            image_turn(str(media_dir / "chelsea.png"), "And in this one?"),
        ],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *answer, usage = chunks  # as OpenAI streams: the usage comes last, in a chunk of its own

    assert "".join(chunk.choices[0].delta.content or "" for chunk in answer) == streamed_text(
        processor.tokenizer, expected
    )
    assert answer[0].choices[0].delta.role == "assistant"
    assert answer[-1].choices[0].finish_reason == "length"
    assert usage.usage.completion_tokens == MAX_TOKENS


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
    "file path": (lambda images, tmp: str(tmp / "photo.png"), "local_media_disabled", "--allowed-local-media-path"),
    "not an image": (lambda images, tmp: "data:image/png;base64," + base64.b64encode(b"plain text").decode(),
                     "invalid_image", "is not an image this server reads (PNG, JPEG, WEBP, GIF, BMP)"),
    "truncated image": (lambda images, tmp: truncated_png(images[0]), "invalid_image", "is not a readable image"),
    "bad base64": (lambda images, tmp: "data:image/png;base64,%%%", "invalid_image", "not valid base64"),
    "remote url": (lambda images, tmp: "http://127.0.0.1:9/photo.png", "remote_image_disabled", "--allow-remote-images"),
    "other scheme": (lambda images, tmp: "ftp://127.0.0.1/photo.png", "unsupported_url_scheme", "data:, http(s)://"),
}  # fmt: skip


def refusal(client, checkpoint, url: str) -> "openai.BadRequestError":
    messages = [{"role": "user", "content": "Hello."}, image_turn(url, "What is it?")]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)
    return raised.value


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_400_naming_it(client, checkpoint, images, tmp_path, case):
    make_url, code, message = BAD_IMAGES[case]

    error = refusal(client, checkpoint, make_url(images, tmp_path))

    assert error.code == code
    assert error.param == "messages[1].content[0]"
    assert message in error.message


def test_by_default_no_local_file_is_read_and_existence_does_not_show(client, checkpoint, images, tmp_path):
    images[0].save(tmp_path / "present.png")
    answers = [
        refusal(client, checkpoint, url).body
        for url in (str(tmp_path / "present.png"), str(tmp_path / "absent.png"), f"file://{tmp_path}/present.png")
    ]

    assert answers[0]["code"] == "local_media_disabled"
    assert answers[0] == answers[1] == answers[2]


def test_every_path_out_of_the_media_folder_gets_the_one_answer_a_missing_file_gets(open_client, checkpoint, media_dir):
    outside = media_dir.parent / "outside" / "secret.png"
    urls = [
        str(outside),  # outside the folder
        str(media_dir / "link.png"),  # a symlink in it, pointing out
        str(media_dir / ".." / "outside" / "secret.png"),  # ../
        "../outside/secret.png",  # relative, taken from the folder, then ../
        f"file://{media_dir}/../outside/secret.png",
        str(media_dir / "missing.png"),  # a missing file in it
        "/etc/passwd",
        str(media_dir.parent / "outside" / "loop_a"),  # a symlink loop (ELOOP)
        "x" * 300 + ".png",  # a name longer than the file system takes (ENAMETOOLONG)
    ]

    answers = [refusal(open_client, checkpoint, url).body for url in urls]

    assert answers[0]["code"] == "image_not_found"
    assert all(answer == answers[0] for answer in answers), answers


def test_a_file_in_the_media_folder_is_answered(open_client, checkpoint, tiny_llama, images, media_dir):
    model, processor = tiny_llama
    expected = local_answer_ids(model, processor, [processor_turn(MMA_QUESTION)], images[1:2])

    for url in (str(media_dir / "chelsea.png"), "chelsea.png", f"file://{media_dir}/chelsea.png"):
        response = open_client.chat.completions.create(
            model=checkpoint, messages=[image_turn(url, MMA_QUESTION)], max_tokens=MAX_TOKENS
        )
        assert response.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)


@contextlib.contextmanager
def http_files(folder: Path, endless_path: str = "/endless.png"):
    """A local http.server over `folder`; `endless_path` streams PNG-looking bytes without end (no
    Content-Length) and counts what it sent. Yields (base URL, {"sent": bytes})."""
    sent = {"bytes": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(folder))

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != endless_path:
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\x89PNG" + bytes(65532)
            try:
                while sent["bytes"] < 100 * MAX_IMAGE_BYTES:  # bounded, in case the reader never stops
                    self.wfile.write(chunk)
                    sent["bytes"] += len(chunk)
            except OSError:  # the reader hung up
                pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as file_server:
        thread = threading.Thread(target=file_server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{file_server.server_address[1]}", sent
        finally:
            file_server.shutdown()


def test_remote_image_is_fetched_when_allowed(open_client, checkpoint, tiny_llama, images, media_dir):
    model, processor = tiny_llama
    expected = local_answer_ids(model, processor, [processor_turn(MMA_QUESTION)], images[1:2])

    with http_files(media_dir) as (base, _):
        response = open_client.chat.completions.create(
            model=checkpoint, messages=[image_turn(f"{base}/chelsea.png", MMA_QUESTION)], max_tokens=MAX_TOKENS
        )

    assert response.choices[0].message.content == processor.decode(expected, skip_special_tokens=True)


def test_remote_body_over_the_cap_is_cut_off_and_refused(open_client, checkpoint, media_dir):
    with http_files(media_dir) as (base, sent):
        error = refusal(open_client, checkpoint, f"{base}/endless.png")
        time.sleep(0.5)  # the handler notices the closed connection

    assert error.code == "image_too_large"
    assert f"limit of {MAX_IMAGE_BYTES} bytes" in error.message
    assert sent["bytes"] < 10 * MAX_IMAGE_BYTES  # the server stopped reading near the cap, not at the end


def test_too_many_pixels_is_a_400(open_client, checkpoint):
    """A 3000 x 3000 PNG of one colour: 27 KB encoded, 9 million pixels (a small decompression bomb)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), "white").save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_IMAGE_BYTES

    error = refusal(open_client, checkpoint, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())

    assert error.code == "image_too_large"
    assert f"over the limit of {MAX_IMAGE_PIXELS}" in error.message


def test_api_key_is_required_on_v1_and_not_on_health(open_server, checkpoint):
    messages = [{"role": "user", "content": "Hello."}]
    status, body = post_raw(open_server, json.dumps({"model": checkpoint, "messages": messages}).encode())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    wrong = openai.OpenAI(base_url=f"{open_server}/v1", api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.chat.completions.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with urllib.request.urlopen(f"{open_server}/health", timeout=10) as response:
        assert response.status == 200

    keyed = openai.OpenAI(base_url=f"{open_server}/v1", api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    reply = keyed.chat.completions.with_raw_response.create(model=checkpoint, messages=messages, max_tokens=MAX_TOKENS)
    assert reply.status_code == 200


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/completions", "/load_model", "/reset", "/docs"])
def test_routes_other_than_the_served_ones_are_404(open_server, route):
    request = urllib.request.Request(
        f"{open_server}{route}", data=b"{}", headers={"Authorization": f"Bearer {API_KEY}"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)

    assert raised.value.code == 404
    assert json.load(raised.value)["error"]["code"] == "not_served"


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


def read_remote(url: str, policy):
    """One image URL read as the server reads it (`MediaReader`), outside any server."""
    import asyncio

    from aki.media import MediaReader, PixelBudget

    reader = MediaReader(policy)
    try:
        return asyncio.run(reader.read_image(url, "p", PixelBudget(policy)))
    finally:
        reader.close()


def test_allowed_media_domains_are_the_only_hosts_fetched_even_through_a_redirect(images, tmp_path):
    from aki.media import MediaPolicy, RequestError

    images[1].save(tmp_path / "chelsea.png")
    with http_files(tmp_path) as (base, _):
        localhost = base.replace("127.0.0.1", "localhost")
        only_localhost = MediaPolicy(allow_remote=True, allowed_domains=frozenset({"localhost"}))
        assert read_remote(f"{localhost}/chelsea.png", only_localhost).size == images[1].size
        with pytest.raises(RequestError) as raised:
            read_remote(f"{base}/chelsea.png", only_localhost)
        assert raised.value.code == "media_domain_not_allowed"

        with redirecting_server(lambda hop: f"{base}/chelsea.png") as redirect:  # to 127.0.0.1, not allowed
            with pytest.raises(RequestError) as raised:
                read_remote(redirect.replace("127.0.0.1", "localhost") + "/x.png", only_localhost)
        assert raised.value.code == "media_domain_not_allowed"


@contextlib.contextmanager
def redirecting_server(location, delay_s: float = 0.0):
    """A local server answering every GET with a 302 to `location(hop)` after `delay_s`; yields its base URL."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay_s)
            hop = int(self.path.strip("/").split(".")[0] or 0) if self.path.strip("/")[:1].isdigit() else 0
            self.send_response(302)
            self.send_header("Location", location(hop))
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def test_media_flags_are_checked_at_start(tmp_path):
    from aki.serving import media_policy

    with pytest.raises(ValueError, match="no folder"):
        media_policy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="give --allow-remote-images too"):
        media_policy(allowed_media_domains=["example.com"])
    assert media_policy(str(tmp_path), True, ["Example.COM"]).allowed_domains == {"example.com"}


def test_other_transformers_releases_stop_at_import_with_one_line():
    import tomllib

    from aki.serving import SUPPORTED_TRANSFORMERS, check_transformers_version

    for version in ("5.24.0", "5.26.0", "6.0.0"):
        with pytest.raises(ImportError) as raised:
            check_transformers_version(version)
        message = str(raised.value)
        assert "\n" not in message and version in message and SUPPORTED_TRANSFORMERS in message
    check_transformers_version("5.25.1")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["serve"] == [f"transformers[serving]{SUPPORTED_TRANSFORMERS}"]


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
    with running_server(str(folder), tmp_path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        reply = client.chat.completions.create(
            model=str(folder),
            # An empty system prompt: AKI's default one derails a model this small (see aki chat --system).
            messages=[{"role": "system", "content": ""}, {"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content


# Hostile clients (issue 36): every request below is bounded in time and sent to 127.0.0.1 only.
TEXT_TURN = [{"role": "user", "content": "Hello."}]


def timed_refusal(client, checkpoint, url: str) -> tuple["openai.BadRequestError", float]:
    started = time.monotonic()
    error = refusal(client, checkpoint, url)
    return error, time.monotonic() - started


def timed_text_answer(client, checkpoint) -> float:
    started = time.monotonic()
    client.chat.completions.create(model=checkpoint, messages=TEXT_TURN, max_tokens=MAX_TOKENS)
    return time.monotonic() - started


def test_slow_images_fail_within_their_deadline_and_text_requests_do_not_wait(open_client, checkpoint):
    """Headers then a byte a second, a status line a byte a second, four redirect hops of 1.5 s: each
    fails within the one deadline (+1 s), and a text request sent beside six of them is answered as fast
    as on a quiet server."""
    quiet = min(timed_text_answer(open_client, checkpoint) for _ in range(3))
    with trickling_server() as (trickle, _), redirecting_server(lambda hop: f"/{hop + 1}.png", delay_s=1.5) as redirect:
        urls = [f"{trickle}/body.png"] * 3 + [f"{trickle}/status.png"] * 3 + [f"{redirect}/0.png"]
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            slow = [pool.submit(timed_refusal, open_client, checkpoint, url) for url in urls]
            time.sleep(0.5)  # all of them being fetched
            beside = timed_text_answer(open_client, checkpoint)
            refused = [future.result(timeout=REQUEST_TIMEOUT_S) for future in slow]

    for error, seconds in refused:
        assert error.code == "image_fetch_failed" and seconds <= FETCH_TIMEOUT_S + 1, (error.message, seconds)
    assert beside <= quiet + 1.0, (quiet, beside)


def test_a_fetch_stops_when_its_client_hangs_up(open_server, checkpoint):
    """The client leaves 0.3 s into a slow fetch: the server drops the fetch then, not at its deadline."""
    with trickling_server() as (trickle, lasted):
        body = json.dumps(
            {"model": checkpoint, "messages": [image_turn(f"{trickle}/body.png", "What is it?")], "max_tokens": 2}
        ).encode()
        port = int(open_server.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body)
            )
            time.sleep(0.3)
        deadline = time.monotonic() + FETCH_TIMEOUT_S + 3
        while not lasted and time.monotonic() < deadline:
            time.sleep(0.1)
    assert lasted and lasted[0] < FETCH_TIMEOUT_S - 1, lasted  # dropped with the client, well before the deadline


def test_failed_fetches_do_not_tell_why(open_client, checkpoint, media_dir):
    """A closed port, a 404 and a page that is not an image get one answer: the server is no port scanner."""
    with socket_closed_port() as closed, http_files(media_dir) as (base, _):
        (media_dir / "page.html").write_text("<html>not an image</html>")
        urls = [f"http://127.0.0.1:{closed}/a.png", f"{base}/missing.png", f"{base}/page.html"]
        errors = [refusal(open_client, checkpoint, url) for url in urls]

    assert {error.code for error in errors} == {"image_fetch_failed"}
    assert len({error.message.replace(url, "URL") for error, url in zip(errors, urls, strict=True)}) == 1


@contextlib.contextmanager
def socket_closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, never listening)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def png_bytes(image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "PNG", **options})
    return buffer.getvalue()


def test_container_formats_are_not_opened(client, checkpoint):
    """An ICO (Pillow decodes its PNG frames while opening) and an EPS (Ghostscript) are refused unopened."""
    from PIL import Image

    frame = png_bytes(Image.new("RGB", (64, 64), "red"))
    ico = (  # ICONDIR, then one ICONDIRENTRY saying 16x16 for a 64x64 PNG frame
        b"\x00\x00\x01\x00\x01\x00"
        + bytes([16, 16, 0, 0, 1, 0, 32, 0])
        + len(frame).to_bytes(4, "little")
        + (22).to_bytes(4, "little")
        + frame
    )
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    for data in (ico, eps):
        error = refusal(client, checkpoint, "data:image/png;base64," + base64.b64encode(data).decode())
        assert error.code == "invalid_image" and "PNG, JPEG, WEBP, GIF, BMP" in error.message


@pytest.fixture(scope="module")
def wide_server(checkpoint, tmp_path_factory):
    """A server that takes ten images of 40 million pixels each, and request templates."""
    flags = ("--limit-mm-per-prompt", '{"image": 10}', "--max-request-image-pixels", "400000000")
    with running_server(
        checkpoint, tmp_path_factory.mktemp("serve_wide"), *flags, "--trust-request-chat-template"
    ) as served:
        yield served


def huge_images() -> list[str]:
    """Ten 6300 x 6300 PNGs (each under the 40-million-pixel cap), five RGB and five 16-bit grey, as data URLs."""
    from PIL import Image

    rgb = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (6300, 6300), "teal"))).decode()
    grey = Image.new("I;16", (6300, 6300), 40000)
    wide = "data:image/png;base64," + base64.b64encode(png_bytes(grey)).decode()
    return [rgb] * 5 + [wide] * 5


def many_images_turn(urls: list[str]) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": "What are these?"}]}


def test_more_images_than_the_limit_are_refused_unread(client, checkpoint):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=checkpoint, messages=[many_images_turn(huge_images())], max_tokens=MAX_TOKENS
        )
    assert raised.value.code == "too_many_images" and "--limit-mm-per-prompt" in raised.value.message


def test_ten_huge_images_are_served_in_bounded_memory(wide_server, checkpoint):
    """Each image is decoded alone and shrunk to the model's size at once: the server's memory (its
    processes together) grows by less than 1.5 GB for 400 million pixels."""
    import psutil

    url, process = wide_server
    server = psutil.Process(process.pid)

    def memory() -> int:
        processes = [server, *server.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running())

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    urls = huge_images()
    before, peak = memory(), 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(
            client.chat.completions.create, model=checkpoint, messages=[many_images_turn(urls)], max_tokens=2
        )
        while not answer.done():
            peak = max(peak, memory())
            time.sleep(0.05)
    assert answer.result().choices[0].message.content is not None
    assert peak - before < 1.5 * 2**30, (before, peak)


def test_request_chat_templates_need_the_servers_trust(client, wide_server, checkpoint):
    template = "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=checkpoint,
            messages=TEXT_TURN,
            max_tokens=MAX_TOKENS,
            extra_body={"chat_template_kwargs": {"chat_template": template}},
        )
    assert raised.value.param == "chat_template_kwargs.chat_template"
    assert "--trust-request-chat-template" in raised.value.message

    trusting = openai.OpenAI(base_url=f"{wide_server[0]}/v1", api_key="x", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    reply = trusting.chat.completions.create(
        model=checkpoint,
        messages=TEXT_TURN,
        max_tokens=MAX_TOKENS,
        extra_body={"chat_template_kwargs": {"chat_template": template}},
    )
    assert reply.usage.prompt_tokens <= 4  # "Hello." alone (and a BOS): the request's template was used


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 5}, "top_p"),
        ({"n": 100}, "n"),
        ({"extra_body": {"generation_config": json.dumps({"num_beams": 4})}}, "generation_config.num_beams"),
        ({"extra_body": {"generation_config": json.dumps({"num_return_sequences": 8})}}, "generation_config.num_return_sequences"),
        ({"extra_body": {"chat_template_kwargs": {"add_vision_id": True}}}, "chat_template_kwargs.add_vision_id"),
    ],
)  # fmt: skip
def test_out_of_range_or_untaken_fields_are_a_400_naming_them(client, checkpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=checkpoint, messages=TEXT_TURN, **{"max_tokens": MAX_TOKENS, **fields})
    assert raised.value.param == param, raised.value.message


def test_stop_strings_end_the_answer(client, checkpoint, tiny_llama):
    model, processor = tiny_llama
    expected = processor.decode(local_answer_ids(model, processor, TEXT_TURN, None), skip_special_tokens=True)
    stop = expected[len(expected) // 2 :][:3]
    assert stop.strip() and stop in expected

    reply = client.chat.completions.create(model=checkpoint, messages=TEXT_TURN, max_tokens=MAX_TOKENS, stop=[stop])

    content = reply.choices[0].message.content
    assert expected.startswith(content) and len(content) < len(expected)
    assert reply.choices[0].finish_reason == "stop"


def test_a_body_over_the_cap_is_a_413_unread(server):
    """64 MiB, declared by Content-Length and sent in chunks without one: 413 either way."""
    import http.client

    port = int(server.rsplit(":", 1)[1])
    for chunked in (False, True):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(64 * 2**20))))
        connection.endheaders()
        chunk = b"x" * 2**20
        with contextlib.suppress(OSError):  # the server may answer and close before the body is all sent
            for _ in range(64):
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        assert response.status == 413 and json.load(response)["error"]["code"] == "request_too_large"
        connection.close()
