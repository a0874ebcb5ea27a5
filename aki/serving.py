"""`aki serve`: an OpenAI-compatible server for an AKI folder, built on transformers' own server.

The app is `transformers serve`'s (FastAPI, `transformers.cli.serving`): `/v1/chat/completions`
(streaming and not), `/v1/models`, `/health`. AKI plugs in through that package's public classes:

- `AkiModelManager`: transformers' loader finds a model class by looking its architecture name up in
  transformers' own tables, which `AutoModelForImageTextToText.register` (done by `import aki`) does
  not reach. This manager loads AKI through the registered Auto class and calls it an image-text model.
- `AkiChatCompletionHandler`: reads every image of a request (a data URL or a path on the server;
  http(s) only with `allow_remote_images`) and checks that each has its `<image>` place in the
  prompt, so a bad request gets a 4xx saying what is wrong instead of a 500. The prompt is the chat
  template's, as in `aki chat`: each image sits in the user turn of its question, so MMA lets the
  image's tokens see that question.

Generation is transformers' sequential path (one `generate` at a time, requests queue). Its
continuous batching cannot take AKI: see "Serving" in the README.

Errors are OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

import asyncio
import base64
import binascii
import http.client
import io
import json
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText
from transformers.utils.import_utils import is_serve_available

if not is_serve_available():
    raise ImportError("aki serve needs FastAPI, uvicorn and openai: pip install 'aki[serve]'")

from transformers.cli.serving.chat_completion import ChatCompletionHandler  # noqa: E402
from transformers.cli.serving.model_manager import ModelManager  # noqa: E402
from transformers.cli.serving.server import build_server  # noqa: E402
from transformers.cli.serving.utils import GenerationState, Modality, split_revision  # noqa: E402

from .configuration_aki import AkiConfig  # noqa: E402
from .processing_aki import load_image  # noqa: E402

REMOTE_IMAGE_TIMEOUT_S = 10.0
# The part types transformers' chat handler reads as text and as images (Chat Completions and Responses names).
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image")


class RequestError(Exception):
    """A request the server refuses; answered with `status` and OpenAI's error object."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        }


def open_image(source, name: str, param: str) -> Image.Image:
    """A path or a file object -> RGB as the processor reads any image (`load_image`: 16-bit, alpha),
    decoded now so a truncated file fails here."""
    try:
        return load_image(source)
    except ValueError as error:
        cause = error.__cause__
        # PIL's own message names the file object, not the request's image.
        reason = "no image format PIL reads." if isinstance(cause, UnidentifiedImageError) else str(cause or error)
        raise RequestError(f"{name} is not a readable image: {reason}", param=param, code="invalid_image") from error


def read_image(url: str, param: str, allow_remote: bool) -> Image.Image:
    """An `image_url` -> an RGB image: a base64 data URL, a path on the server (or a file:// URL), or,
    when `allow_remote`, an http(s) URL."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(
                "An image data URL must be base64: data:image/png;base64,<data>.", param=param, code="invalid_image"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            message = f"The image data URL is not valid base64: {error}"
            raise RequestError(message, param=param, code="invalid_image") from error
        return open_image(io.BytesIO(data), "The image data URL", param)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise RequestError(
                f"Remote image {url!r} is not fetched: send the image as a data URL or a path on the server, "
                "or start the server with --allow-remote-images.",
                param=param,
                code="remote_image_disabled",
            )
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, ValueError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors
            raise RequestError(f"Cannot fetch image {url!r}: {error}", param=param, code="image_not_found") from error
        return open_image(io.BytesIO(data), f"The image at {url!r}", param)
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise RequestError(
            f"No image file at {str(path)!r} (paths are read on the server's machine).",
            param=param,
            code="image_not_found",
        )
    return open_image(path, f"The file {str(path)!r}", param)


def image_url(part: dict, param: str) -> str:
    """The URL of an `image_url` part: `{"image_url": {"url": ...}}`, or `{"image_url": ...}` (Responses API)."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise RequestError("An image_url part needs an `image_url.url` string.", param=param)
    return url


def with_images_read(messages, allow_remote: bool) -> list[dict]:
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
                image = read_image(image_url(part, part_param), part_param, allow_remote)
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


class AkiModelManager(ModelManager):
    """transformers' model manager, loading models through `AutoModelForImageTextToText` (where `import aki`
    registered AKI); every model it loads is an image-text model."""

    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
        if gguf_file is not None:
            raise ValueError(f"AKI models are folders, not GGUF files: {gguf_file!r}.")
        model_id, revision = split_revision(model_id_and_revision)
        return AutoModelForImageTextToText.from_pretrained(
            model_id,
            revision=revision,
            attn_implementation=self.attn_implementation,
            dtype=self.dtype,
            device_map=self.device,
            quantization_config=self.get_quantization_config(),
            tqdm_class=tqdm_class,
        ).eval()

    @staticmethod
    def get_model_modality(model, processor=None) -> Modality:
        return Modality.VLM


class AkiChatCompletionHandler(ChatCompletionHandler):
    """transformers' `/v1/chat/completions`, with the request's model and images checked first."""

    def __init__(self, *args, allow_remote_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_remote_images = allow_remote_images

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
        messages = await asyncio.to_thread(with_images_read, body.get("messages"), self.allow_remote_images)
        _, _, processor = self._resolve_model(body)
        check_image_places(processor, self.get_processor_inputs_from_messages(messages, Modality.VLM))
        return await super().handle_request({**body, "messages": messages}, request_id)


class NotServed:
    """The endpoints of transformers' server that `aki serve` does not answer."""

    async def handle_request(self, *args, **kwargs):
        raise RequestError("aki serve answers /v1/chat/completions only.", code="not_served", status=404)


def add_error_handlers(app) -> None:
    """Every refusal as OpenAI's error object: ours, transformers' 4xx, and bodies FastAPI cannot parse."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def refused(_request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(_request, error: HTTPException):
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        return JSONResponse(RequestError(message).body(), status_code=error.status_code, headers=error.headers)

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
    app.add_exception_handler(RequestValidationError, unparsable)


def check_model_folder(model_dir: str) -> None:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir!r} is not a model folder (it has no config.json).")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != AkiConfig.model_type:
        raise ValueError(f"{model_dir!r} holds a {model_type!r} model; aki serve serves AKI folders.")


def build_app(model_dir: str, allow_remote_images: bool = False):
    """transformers' FastAPI app serving the AKI folder `model_dir` (loaded now), named as given."""
    check_model_folder(model_dir)
    manager = AkiModelManager(force_model=model_dir)
    generation_state = GenerationState()
    chat = AkiChatCompletionHandler(manager, generation_state, allow_remote_images=allow_remote_images)
    not_served = NotServed()
    app = build_server(
        manager,
        chat,
        completion_handler=not_served,
        response_handler=not_served,
        transcription_handler=not_served,
        systemone_handler=not_served,
        generation_state=generation_state,
    )
    add_error_handlers(app)
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
