"""`aki serve`: an OpenAI-compatible server for an AKI folder, built on transformers' own server.

The app is `transformers serve`'s (FastAPI, `transformers.cli.serving`): `/v1/chat/completions`
(streaming and not), `/v1/models`, `/health`; the model runs in a process of its own. AKI plugs in
through that package's classes:

- `AkiModelLoader`: transformers' loader finds a model class by looking its architecture name up in
  transformers' own tables, which `AutoModelForImageTextToText.register` (done by `import aki`) does
  not reach. This loader loads AKI through the registered Auto class.
- `AkiChatCompletionHandler`: reads every image of a request under the server's `MediaPolicy` and
  checks that each has its `<image>` place in the prompt, so a bad request gets a 4xx saying what is
  wrong instead of a 500. The prompt is the chat template's, as in `aki chat`: each image sits in the
  user turn of its question, so MMA lets the image's tokens see that question.
- `RequestGate`: what the server answers before transformers' app sees a request: `/health` always,
  the two served routes only with the API key (when one is set), nothing else.

transformers' server package is internal and changes shape between releases (5.25 moved the model
into its own process and renamed its model ids' parser), so this module runs on the releases it was
tested with, `SUPPORTED_TRANSFORMERS` (the `serve` extra states the same range), and on any other
stops at import with one line naming both.

Generation is transformers' sequential path (one `generate` at a time, requests queue). Its
continuous batching cannot take AKI: see "Serving" in the README.

Errors are OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

import asyncio
import base64
import binascii
import hmac
import http.client
import io
import json
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText
from transformers.utils.import_utils import is_serve_available

from .configuration_aki import AkiConfig
from .processing_aki import ImageTooLarge, load_image

SUPPORTED_TRANSFORMERS = ">=5.25,<5.26"


def check_transformers_version(installed: str) -> None:
    if Version(installed) not in SpecifierSet(SUPPORTED_TRANSFORMERS):
        raise ImportError(
            f"aki serve builds on transformers' server internals, which change between releases: it runs on "
            f"transformers {SUPPORTED_TRANSFORMERS}, and {installed} is installed; run pip install 'aki[serve]'."
        )


check_transformers_version(transformers.__version__)
if not is_serve_available():
    raise ImportError("aki serve needs FastAPI, uvicorn and openai: pip install 'aki[serve]'")

from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: E402
from transformers.cli.serving.model_manager import ModelLoader, ModelManager  # noqa: E402
from transformers.cli.serving.server import build_server  # noqa: E402
from transformers.cli.serving.utils import GenerationState, Modality, parse_model_id  # noqa: E402

# The part types transformers' chat handler reads as text and as images (Chat Completions and Responses names).
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image")
SERVED_ROUTES = ("/v1/chat/completions", "/v1/models")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    """Which images a request may name, and how large they may be.

    local_root: the folder whose files (after symlinks and `..` are resolved) a path or `file://` URL
        may name; None: no local file is read.
    allow_remote: fetch http(s) URLs; `allowed_domains`, when set, the only host names fetched.
    max_bytes: the most bytes one image may take, encoded (data URL, file or response body).
    max_pixels: the most pixels one image may have, read from its header before it is decoded.
    timeout_s: the longest a remote image may take to arrive, in all.
    """

    local_root: Path | None = None
    allow_remote: bool = False
    allowed_domains: frozenset[str] | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0


class RequestError(Exception):
    """A request the server refuses; answered with `status` and OpenAI's error object."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def too_large(name: str, policy: MediaPolicy, param: str) -> RequestError:
    return RequestError(
        f"{name} is larger than this server's limit of {policy.max_bytes} bytes (--max-image-bytes).",
        param=param,
        code="image_too_large",
    )


def open_image(source, name: str, policy: MediaPolicy, param: str) -> Image.Image:
    """A path or a file object -> RGB as the processor reads any image (`load_image`: 16-bit, alpha),
    decoded now so a truncated file fails here."""
    try:
        return load_image(source, max_pixels=policy.max_pixels)
    except ImageTooLarge as error:
        message = f"{name} has too many pixels: {error} (--max-image-pixels)"
        raise RequestError(message, param=param, code="image_too_large") from error
    except ValueError as error:
        cause = error.__cause__
        # PIL's own message names the file object, not the request's image.
        reason = "no image format PIL reads." if isinstance(cause, UnidentifiedImageError) else str(cause or error)
        raise RequestError(f"{name} is not a readable image: {reason}", param=param, code="invalid_image") from error


def read_data_url(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        message = "An image data URL must be base64: data:image/png;base64,<data>."
        raise RequestError(message, param=param, code="invalid_image")
    if len(payload) * 3 // 4 > policy.max_bytes:  # before decoding it
        raise too_large("The image data URL", policy, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        message = f"The image data URL is not valid base64: {error}"
        raise RequestError(message, param=param, code="invalid_image") from error
    return open_image(io.BytesIO(data), "The image data URL", policy, param)


def check_remote_url(url: str, policy: MediaPolicy, param: str) -> None:
    """Refuse a URL (the request's, or a redirect's) that is not http(s) or whose host is not allowed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RequestError(f"Image URL {url!r} is not http(s).", param=param, code="unsupported_url_scheme")
    host = (parts.hostname or "").lower()
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise RequestError(
            f"Image URL {url!r} is on {host!r}, which is not among this server's --allowed-media-domains.",
            param=param,
            code="media_domain_not_allowed",
        )


def fetch_remote(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The body at `url`, read until `policy.max_bytes` or `policy.timeout_s` (in all) runs out; every
    redirect is checked as the URL was."""

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, msg, headers, newurl):
            check_remote_url(newurl, policy, param)
            return super().redirect_request(request, fp, code, msg, headers, newurl)

    deadline = time.monotonic() + policy.timeout_s
    opener = urllib.request.build_opener(CheckedRedirects)
    try:
        with opener.open(url, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise too_large(f"The image at {url!r}", policy, param)
            body = bytearray()
            while chunk := response.read(READ_CHUNK_BYTES):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise too_large(f"The image at {url!r}", policy, param)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"it took more than {policy.timeout_s:g} s")
            return bytes(body)
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors
        raise RequestError(f"Cannot fetch image {url!r}: {error}", param=param, code="image_not_found") from error


def local_file(url: str, policy: MediaPolicy, param: str) -> Path:
    """The file a path or `file://` URL names, if it lies in `policy.local_root` once resolved.

    Every refusal is one answer, the same whether the file is missing, outside the folder, or
    reached through a symlink or `..` that leads out: a client learns nothing of other files.
    """
    if policy.local_root is None:  # the file system is not touched
        raise RequestError(
            "This server reads no image files of its own: send the image as a data URL, or start aki serve "
            "with --allowed-local-media-path DIR.",
            param=param,
            code="local_media_disabled",
        )
    path = policy.local_root / (urllib.parse.unquote(url.removeprefix("file://")) if url.startswith("file://") else url)
    resolved = path.resolve()
    if not (resolved.is_relative_to(policy.local_root) and resolved.is_file()):
        raise RequestError(
            "No image file at that path in the folder this server reads images from (--allowed-local-media-path).",
            param=param,
            code="image_not_found",
        )
    return resolved


def read_image(url: str, param: str, policy: MediaPolicy) -> Image.Image:
    """An `image_url` -> an RGB image: a base64 data URL, a path or `file://` URL in the allowed folder
    (relative paths are taken from it), or an http(s) URL when the policy fetches them."""
    if url.startswith("data:"):
        return read_data_url(url, policy, param)
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise RequestError(
                f"Remote image {url!r} is not fetched: send the image as a data URL, or start the server with "
                "--allow-remote-images.",
                param=param,
                code="remote_image_disabled",
            )
        check_remote_url(url, policy, param)
        return open_image(io.BytesIO(fetch_remote(url, policy, param)), f"The image at {url!r}", policy, param)
    if URL_SCHEME.match(url) and not url.startswith("file://"):
        message = f"Image URL {url!r}: AKI reads data:, http(s):// and file:// URLs and paths."
        raise RequestError(message, param=param, code="unsupported_url_scheme")
    path = local_file(url, policy, param)
    if path.stat().st_size > policy.max_bytes:
        raise too_large("The image file", policy, param)
    return open_image(path, f"The file {url!r}", policy, param)


def image_url(part: dict, param: str) -> str:
    """The URL of an `image_url` part: `{"image_url": {"url": ...}}`, or `{"image_url": ...}` (Responses API)."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise RequestError("An image_url part needs an `image_url.url` string.", param=param)
    return url


def with_images_read(messages, policy: MediaPolicy) -> list[dict]:
    """OpenAI chat messages with every `image_url` part's URL replaced by its decoded image.

    Checks the shape transformers' handler reads without checking: a list of messages, each with a
    role and a string or a list of typed parts.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of messages.", param="messages")
    read = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{param} must be an object with a `role`.", param=param)
        content = message.get("content")
        if content is None or isinstance(content, str):
            read.append(message)
            continue
        if not isinstance(content, list):
            raise RequestError(f"{param}.content must be a string or a list of parts.", param=f"{param}.content")
        parts = []
        for part_index, part in enumerate(content):
            part_param = f"{param}.content[{part_index}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"{part_param} must be an object with a `type`.", param=part_param)
            if part["type"] in TEXT_PARTS and not isinstance(part.get("text"), str):
                raise RequestError(f"{part_param} is a text part without a `text` string.", param=part_param)
            if part["type"] in IMAGE_PARTS:
                image = read_image(image_url(part, part_param), part_param, policy)
                part = {"type": part["type"], "image_url": {"url": image}}
            elif part["type"] not in TEXT_PARTS:
                raise RequestError(
                    f"{part_param} is a {part['type']!r} part; AKI reads text and image_url parts.",
                    param=part_param,
                    code="unsupported_content",
                )
            parts.append(part)
        read.append({**message, "content": parts})
    return read


def check_image_places(processor, messages: list[dict]) -> None:
    """Every image needs its own `<image>` in the prompt the chat template renders, and every `<image>`
    an image. `messages` are the processor's (`{"type": "image"}` parts)."""
    images = sum(
        part["type"] == "image" for message in messages if isinstance(message["content"], list)
        for part in message["content"]
    )  # fmt: skip
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    places = prompt.count(processor.image_token)
    if images > places:
        raise RequestError(
            f"The request has {images} images but the prompt has places for {places}: this model's chat template "
            "shows images in user and assistant turns only (not in system messages).",
            param="messages",
            code="too_many_images",
        )
    if places > images:
        raise RequestError(
            f"The text holds {places - images} {processor.image_token!r} marker(s) of its own: send images as "
            f"image_url parts and remove {processor.image_token!r} from the text.",
            param="messages",
            code="image_marker_in_text",
        )


class AkiModelLoader(ModelLoader):
    """transformers' model loader, loading models through `AutoModelForImageTextToText` (where `import aki`
    registered AKI). The model's process unpickles it, which imports this module, hence `aki`, there too."""

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        repo, revision, gguf_file = parse_model_id(model_id)
        if gguf_file is not None:
            raise ValueError(f"AKI models are folders, not GGUF files: {gguf_file!r}.")
        return AutoModelForImageTextToText.from_pretrained(
            repo,
            revision=revision,
            attn_implementation=self.attn_implementation,
            dtype=self.dtype,
            device_map=self.device,
            quantization_config=self.get_quantization_config(),
            tqdm_class=tqdm_class,
        ).eval()


class AkiChatCompletionHandler(ChatCompletionHandler):
    """transformers' `/v1/chat/completions`, with the request's model and images checked first."""

    def __init__(self, *args, media: MediaPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.media = media

    async def handle_request(self, body: dict, request_id: str):
        self._validate_request(body)
        served = self.model_manager.force_model
        if body.get("model") not in (None, served):
            raise RequestError(
                f"Unknown model {body['model']!r}: this server serves {served!r} (listed by GET /v1/models).",
                param="model",
                code="model_not_found",
                status=404,
            )
        # Off the event loop: decoding (or fetching) images must not stall the other requests' streams.
        messages = await asyncio.to_thread(with_images_read, body.get("messages"), self.media)
        return await super().handle_request({**body, "messages": messages}, request_id)

    def render_messages(self, engine, messages: list[dict], body: dict) -> dict:
        # transformers tells a model's modality from its own class tables, which do not list AKI: an image-text model.
        processor_inputs = self.get_processor_inputs_from_messages(messages, Modality.VLM)
        check_image_places(engine.processor, processor_inputs)
        return engine.processor.apply_chat_template(
            processor_inputs,
            add_generation_prompt=True,
            tools=self._normalize_tools(body.get("tools")),
            return_tensors="pt",
            return_dict=True,
            tokenize=True,
            **self._chat_template_kwargs(body),
        )


class RequestGate:
    """ASGI middleware in front of transformers' app: `/health` is open; every other route needs
    `Authorization: Bearer <api_key>` when a key is set (401 otherwise), and only `SERVED_ROUTES` are
    answered (404 otherwise: transformers' other endpoints, `/load_model` and `/reset` included)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    def authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        if not self.authorized(scope):
            error = RequestError(
                "Missing or wrong API key: send `Authorization: Bearer <key>` (the key aki serve was started with).",
                code="invalid_api_key",
                status=401,
            )
            headers = {"WWW-Authenticate": "Bearer"}
            return await JSONResponse(error.body(), status_code=401, headers=headers)(scope, receive, send)
        if scope["path"] not in SERVED_ROUTES:
            error = RequestError(f"aki serve answers {', '.join(SERVED_ROUTES)} and /health only.", code="not_served")
            return await JSONResponse(error.body(), status_code=404)(scope, receive, send)
        return await self.app(scope, receive, send)


def add_error_handlers(app) -> None:
    """Every refusal as OpenAI's error object: ours, transformers' 4xx and ValueErrors, and bodies FastAPI cannot
    parse."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def refused(_request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(_request, error: HTTPException):
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        return JSONResponse(RequestError(message).body(), status_code=error.status_code, headers=error.headers)

    async def value_error(_request, error: ValueError):  # transformers': e.g. a prompt longer than the model's context
        return JSONResponse(RequestError(str(error)).body(), status_code=400)

    async def unparsable(_request, error: RequestValidationError):
        problems = []
        for problem in error.errors():
            if problem["type"] == "json_invalid":
                reason = problem.get("ctx", {}).get("error", problem["msg"])
                problems.append(f"The request body is not valid JSON: {reason} (at character {problem['loc'][-1]})")
            else:
                problems.append(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}")
        message = "; ".join(problems) + "."
        return JSONResponse(RequestError(message, code="invalid_body").body(), status_code=400)

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ValueError, value_error)
    app.add_exception_handler(RequestValidationError, unparsable)


def check_model_folder(model_dir: str) -> None:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir!r} is not a model folder (it has no config.json).")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != AkiConfig.model_type:
        raise ValueError(f"{model_dir!r} holds a {model_type!r} model; aki serve serves AKI folders.")


def media_policy(
    allowed_local_media_path: str | None = None,
    allow_remote_images: bool = False,
    allowed_media_domains: list[str] | None = None,
    **limits,
) -> MediaPolicy:
    """The `MediaPolicy` of `aki serve`'s flags; `limits` are MediaPolicy's own fields."""
    root = None
    if allowed_local_media_path is not None:
        root = Path(allowed_local_media_path).resolve()
        if not root.is_dir():
            raise ValueError(f"--allowed-local-media-path: no folder {allowed_local_media_path!r}.")
    if allowed_media_domains and not allow_remote_images:
        raise ValueError("--allowed-media-domains restricts remote images: give --allow-remote-images too.")
    domains = frozenset(domain.lower() for domain in allowed_media_domains) if allowed_media_domains else None
    return MediaPolicy(local_root=root, allow_remote=allow_remote_images, allowed_domains=domains, **limits)


def build_app(model_dir: str, media: MediaPolicy | None = None, api_key: str | None = None):
    """transformers' FastAPI app serving the AKI folder `model_dir` (its process started now), named as given."""
    check_model_folder(model_dir)
    generation_state = GenerationState()
    manager = ModelManager(loader=AkiModelLoader(), generation_state=generation_state, force_model=model_dir)
    chat = AkiChatCompletionHandler(manager, generation_state, media=media or MediaPolicy())
    # The other handlers are never reached: RequestGate answers their routes with a 404.
    app = build_server(manager, chat, None, None, None, None)
    add_error_handlers(app)
    app.add_middleware(RequestGate, api_key=api_key or None)
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
