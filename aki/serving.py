"""`aki serve`: an OpenAI-compatible server for an AKI folder, built on transformers' own server.

The app is `transformers serve`'s (FastAPI, `transformers.cli.serving`): `/v1/chat/completions`
(streaming and not), `/v1/models`, `/health`; the model runs in a process of its own. AKI plugs in
through that package's classes:

- `AkiModelLoader`: transformers' loader finds a model class by looking its architecture name up in
  transformers' own tables, which `AutoModelForImageTextToText.register` (done by `import aki`) does
  not reach. This loader loads AKI through the registered Auto class.
- `AkiChatCompletionHandler`: checks a request before the model sees it: its fields against OpenAI's
  ranges and what a client may set (`check_generation_fields`: no chat template from the request
  unless the server trusts them, sampling settings only), its images under the server's
  `MediaPolicy` (`aki.media`), each image's `<image>` place in the prompt, and an answer that fits the
  context left. A bad request gets a 4xx saying what is wrong instead of a 500. The prompt is the
  chat template's, as in `aki chat`: each image sits in the user turn of its question, so MMA lets
  the image's tokens see that question.
- `RequestGate`: what the server answers before transformers' app sees a request: `/health` always,
  the two served routes only with the API key (when one is set) and a body under the size limit,
  nothing else; and whether the client is still there, so reading its images stops when it hangs up.

transformers' server package is internal and changes shape between releases (5.25 moved the model
into its own process and renamed its model ids' parser), so this module runs on the releases it was
tested with, `SUPPORTED_TRANSFORMERS` (the `serve` extra states the same range), and on any other
stops at import with one line naming both.

Generation is transformers' sequential path (one `generate` at a time, requests queue). Its
continuous batching cannot take AKI: see "Serving" in the README.

Errors are OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

import asyncio
import hmac
import json
from contextvars import ContextVar
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.utils.import_utils import is_serve_available

from .configuration_aki import AkiConfig
from .media import MediaPolicy, MediaReader, RequestError

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
from transformers.cli.serving.utils import GenerationState, Modality, parse_model_id, prompt_length  # noqa: E402

SERVED_ROUTES = ("/v1/chat/completions", "/v1/models")
# What a request may set beyond the Chat Completions fields: the chat template's own arguments (a template
# of the request's own only with --trust-request-chat-template), and `generate()`'s sampling settings.
TEMPLATE_KWARGS = ("image_separator",)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "do_sample", "repetition_penalty")
# Set by RequestGate for each request it passes on: an event set once the client has hung up.
CLIENT_GONE: ContextVar[asyncio.Event | None] = ContextVar("aki_client_gone", default=None)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_range(body: dict, name: str, low: float, high: float, low_open: bool = False) -> None:
    """A request field, when given, is a number in [low, high] ((low, high] with `low_open`), or a 400 naming it."""
    value = body.get(name)
    if value is None:
        return
    if not (is_number(value) and (low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"`{name}` must be a number in {interval}; got {value!r}.", param=name)


def check_positive_integer(body: dict, name: str) -> None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise RequestError(f"`{name}` must be a positive integer; got {value!r}.", param=name)


def check_generation_fields(body: dict, trust_request_chat_template: bool) -> None:
    """Refuse, naming the field, what a request may not set or sets out of OpenAI's ranges."""
    check_range(body, "temperature", 0, 2)
    check_range(body, "top_p", 0, 1, low_open=True)
    check_range(body, "frequency_penalty", -2, 2)
    for name in ("n", "max_tokens", "max_completion_tokens"):
        check_positive_integer(body, name)
    if (body.get("n") or 1) > 1:
        raise RequestError("`n` > 1 is not served: send one request per completion.", param="n", code="unsupported")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stops, list) and 0 < len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError("`stop` must be a non-empty string or a list of 1 to 4 of them.", param="stop")
    template_kwargs = body.get("chat_template_kwargs")
    if template_kwargs is not None:
        if not isinstance(template_kwargs, dict):
            raise RequestError("`chat_template_kwargs` must be an object.", param="chat_template_kwargs")
        allowed = (*TEMPLATE_KWARGS, "chat_template") if trust_request_chat_template else TEMPLATE_KWARGS
        for name, value in template_kwargs.items():
            param = f"chat_template_kwargs.{name}"
            if name not in allowed:
                trust = " unless aki serve runs with --trust-request-chat-template" if name == "chat_template" else ""
                raise RequestError(
                    f"`{param}` is not taken{trust}; a request may set {', '.join(allowed)}.", param=param
                )
            if not isinstance(value, str):
                raise RequestError(f"`{param}` must be a string.", param=param)
    if body.get("generation_config") is not None:
        check_sampling_settings(body["generation_config"])


def check_sampling_settings(settings) -> None:
    """`generation_config` (a JSON object in a string): sampling settings only, none negative."""
    try:
        settings = json.loads(settings) if isinstance(settings, str) else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise RequestError("`generation_config` must be a JSON object in a string.", param="generation_config")
    for name, value in settings.items():
        param = f"generation_config.{name}"
        if name not in SAMPLING_FIELDS:
            raise RequestError(f"`{param}` is not taken; a request may set {', '.join(SAMPLING_FIELDS)}.", param=param)
        valid = isinstance(value, bool) if name == "do_sample" else is_number(value) and value >= 0
        if not valid or (name == "top_k" and not isinstance(value, int)):
            raise RequestError(f"`{param}` is out of range: {value!r}.", param=param)


async def unless_client_gone(awaitable):
    """`awaitable`'s result, or a 499 once the client has hung up (`CLIENT_GONE`), `awaitable` then cancelled."""
    task = asyncio.ensure_future(awaitable)
    gone = CLIENT_GONE.get()
    if gone is None:
        return await task
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():  # the client hung up, or this request was cancelled (by the app, on a disconnect)
            task.cancel()
    if not task.done():
        raise RequestError("The client closed the connection.", code="client_gone", status=499)
    return task.result()


def check_image_places(processor, messages: list[dict], **template_kwargs) -> None:
    """Every image needs its own `<image>` in the prompt the chat template renders, and every `<image>`
    an image. `messages` are the processor's (`{"type": "image"}` parts)."""
    images = sum(
        part["type"] == "image" for message in messages if isinstance(message["content"], list)
        for part in message["content"]
    )  # fmt: skip
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
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
    """transformers' `/v1/chat/completions`, with the request checked first: its model, its fields
    (`check_generation_fields`), its images (`MediaReader`), and an answer that fits the context left."""

    def __init__(self, *args, media: MediaReader, trust_request_chat_template: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.media, self.trust_request_chat_template = media, trust_request_chat_template

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
        check_generation_fields(body, self.trust_request_chat_template)
        body = {**body, "messages": await unless_client_gone(self.media.read_messages(body.get("messages")))}
        # From here on as transformers' handler, with the answer's length fitted to the context.
        engine = self.model_manager.get_engine(served)
        inputs = await self.run_in_thread(self.render_messages, engine, body["messages"], body)
        generation_kwargs = self._build_generation_kwargs(body, engine.generation_config)
        self._check_prompt_length(engine, inputs)
        self.fit_answer(engine, inputs, body, generation_kwargs)
        self._log_request(request_id, engine, inputs, generation_kwargs, body.get("stream"), body)
        if body.get("stream"):
            tools, stream_options = body.get("tools"), body.get("stream_options")
            return self._streaming(request_id, engine, inputs, generation_kwargs, tools, stream_options)
        return await self._non_streaming(request_id, engine, inputs, generation_kwargs, tools=body.get("tools"))

    def fit_answer(self, engine, inputs: dict, body: dict, generation_kwargs: dict) -> None:
        """An asked-for answer longer than the context left after the prompt is a 400; the default is cut to it."""
        limit = self.generation_state.context_length(engine.model_config)
        if limit is None:
            return
        left = limit - prompt_length(inputs)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if body.get(name) is not None and body[name] > left:
            raise RequestError(
                f"`{name}` is {body[name]}, but the model's context ({limit} tokens) leaves {left} after this prompt.",
                param=name,
            )
        generation_kwargs["max_new_tokens"] = min(generation_kwargs["max_new_tokens"], left)

    def render_messages(self, engine, messages: list[dict], body: dict) -> dict:
        # transformers tells a model's modality from its own class tables, which do not list AKI: an image-text model.
        processor_inputs = self.get_processor_inputs_from_messages(messages, Modality.VLM)
        template_kwargs = self._chat_template_kwargs(body)
        check_image_places(engine.processor, processor_inputs, **template_kwargs)
        return engine.processor.apply_chat_template(
            processor_inputs,
            add_generation_prompt=True,
            tools=self._normalize_tools(body.get("tools")),
            return_tensors="pt",
            return_dict=True,
            tokenize=True,
            **template_kwargs,
        )


class RequestGate:
    """ASGI middleware in front of transformers' app: `/health` is open; every other route needs
    `Authorization: Bearer <api_key>` when a key is set (401 otherwise), and only `SERVED_ROUTES` are
    answered (404 otherwise: transformers' other endpoints, `/load_model` and `/reset` included). A
    body over `max_body_bytes` is a 413 before any of it is parsed. While the app works on a request,
    `CLIENT_GONE` tells whether its client has hung up."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    def authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        if not self.authorized(scope):
            error = RequestError(
                "Missing or wrong API key: send `Authorization: Bearer <key>` (the key aki serve was started with).",
                code="invalid_api_key",
                status=401,
            )
            return await refuse(scope, receive, send, error, {"WWW-Authenticate": "Bearer"})
        if scope["path"] not in SERVED_ROUTES:
            message = f"aki serve answers {', '.join(SERVED_ROUTES)} and /health only."
            return await refuse(scope, receive, send, RequestError(message, code="not_served", status=404))
        body = await self.read_body(scope, receive)
        if body is None:
            error = RequestError(
                f"The request body is larger than this server's limit of {self.max_body_bytes} bytes "
                "(--max-request-bytes).",
                code="request_too_large",
                status=413,
            )
            return await refuse(scope, receive, send, error, {"Connection": "close"})
        await self.pass_on(scope, receive, send, body)

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it is over `max_body_bytes` (by its Content-Length, or while read)."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return None
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return bytes(body)

    async def pass_on(self, scope, receive, send, body: bytes) -> None:
        """The app gets `body` in one message, while a watcher reads on and sets `CLIENT_GONE` at the disconnect."""
        gone = asyncio.Event()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        token = CLIENT_GONE.set(gone)
        try:
            await self.app(scope, replay, send)
        finally:
            CLIENT_GONE.reset(token)
            watcher.cancel()


async def refuse(scope, receive, send, error: RequestError, headers: dict | None = None) -> None:
    from fastapi.responses import JSONResponse

    await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


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


def build_app(
    model_dir: str,
    media: MediaPolicy | None = None,
    api_key: str | None = None,
    trust_request_chat_template: bool = False,
    max_request_bytes: int | None = None,
):
    """transformers' FastAPI app serving the AKI folder `model_dir` (its process started now), named as given.
    `max_request_bytes` defaults to the largest image as a data URL, plus 4 MiB."""
    from .processing_aki import AkiImageProcessor

    check_model_folder(model_dir)
    media = media or MediaPolicy()
    Image.MAX_IMAGE_PIXELS = media.max_pixels  # PIL's own guard, for a decode outside the header check
    images = AkiImageProcessor.from_pretrained(model_dir)
    reader = MediaReader(media, fit=(images.size["width"], images.size["height"]), resample=images.resample)
    generation_state = GenerationState()
    manager = ModelManager(loader=AkiModelLoader(), generation_state=generation_state, force_model=model_dir)
    chat = AkiChatCompletionHandler(
        manager, generation_state, media=reader, trust_request_chat_template=trust_request_chat_template
    )
    # The other handlers are never reached: RequestGate answers their routes with a 404.
    app = build_server(manager, chat, None, None, None, None)
    add_error_handlers(app)
    max_body_bytes = max_request_bytes or media.max_bytes * 4 // 3 + 4 * 1024 * 1024
    app.add_middleware(RequestGate, api_key=api_key or None, max_body_bytes=max_body_bytes)
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
