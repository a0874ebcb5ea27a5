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

from helpers import free_port, png_data_url, save_checkpoint, stop_process  # noqa: E402
from tokenizers.decoders import DecodeStream  # noqa: E402

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
MAX_TOKENS = 8
# On the tiny Llama AKI (seed 0) this question about the astronaut is answered differently with MMA off.
MMA_QUESTION = "Which colour?"
API_KEY = "test-key-0123"
MAX_IMAGE_BYTES = 2_000_000
MAX_IMAGE_PIXELS = 4_000_000


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
    """The base URL of `aki serve --model <folder> <flags>` on a free port of 127.0.0.1, stopped on exit."""
    port = free_port()
    log_file = log_dir / "server.log"
    command = [sys.executable, "-m", "aki.cli", "serve", "--model", folder, "--port", str(port), *flags]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_file)
        yield url
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(checkpoint, tmp_path_factory.mktemp("serve")) as url:
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
    return media


@pytest.fixture(scope="module")
def open_server(checkpoint, media_dir, tmp_path_factory):
    flags = (
        *("--allowed-local-media-path", str(media_dir), "--allow-remote-images"),
        *("--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS)),
    )
    # The key as the README advises, from the environment (`--api-key KEY` sets the same field).
    folder = tmp_path_factory.mktemp("serve_open")
    with running_server(checkpoint, folder, *flags, env={"AKI_API_KEY": API_KEY}) as url:
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
                     "invalid_image", "is not a readable image"),
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


def test_allowed_media_domains_are_the_only_hosts_fetched_even_through_a_redirect(images, tmp_path):
    from aki.serving import MediaPolicy, RequestError, read_image

    images[1].save(tmp_path / "chelsea.png")
    with http_files(tmp_path) as (base, _):
        localhost = base.replace("127.0.0.1", "localhost")
        only_localhost = MediaPolicy(allow_remote=True, allowed_domains=frozenset({"localhost"}))
        assert read_image(f"{localhost}/chelsea.png", "p", only_localhost).size == images[1].size
        with pytest.raises(RequestError) as raised:
            read_image(f"{base}/chelsea.png", "p", only_localhost)
        assert raised.value.code == "media_domain_not_allowed"

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", f"{base}/chelsea.png")  # to 127.0.0.1, not allowed
                self.end_headers()

            def log_message(self, *args):
                pass

        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect) as redirecting:
            threading.Thread(target=redirecting.serve_forever, daemon=True).start()
            try:
                with pytest.raises(RequestError) as raised:
                    read_image(f"http://localhost:{redirecting.server_address[1]}/x.png", "p", only_localhost)
            finally:
                redirecting.shutdown()
        assert raised.value.code == "media_domain_not_allowed"


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
