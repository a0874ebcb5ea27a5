"""A request's images for `aki serve`: where they may come from, how long and how large they may be.

- `MediaPolicy`: the server's rules (its flags): which local folder and which hosts a request may name,
  the most bytes and pixels one image may have, how many images and pixels one request may hold, and
  one deadline for a remote image, connect, headers, redirects and body together.
- `MediaReader`: reads every `image_url` part of a request's messages under that policy. Remote
  images are fetched with async I/O (never on a thread a text request could wait for), at most
  `max_fetches` at a time; images are opened only in the formats a VLM needs, their size checked
  from the header before anything is decoded, then decoded on threads of their own (images over
  16 million pixels on one thread at a lower CPU priority, so they delay no one else's image or
  answer), to 8-bit RGB, and shrunk at once to the size the model's processor resizes them to (the
  same PIL resize, so the model sees the same pixels): a request holds one full-size image at most.

Every refusal is a `RequestError` (OpenAI's error object): its message names the rule, never what a
remote server answered (that goes to the server's log), so the server is no port scanner.
"""

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .processing_aki import to_rgb

logger = logging.getLogger("aki.media")

# What `image_url` parts may hold: the formats a VLM client sends. Others (ICO, EPS, TIFF, ...) are never
# opened: some decode while opening (an ICO holds whole PNGs), some run external programs (EPS).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_CHUNK_BYTES = 1 << 16
LARGE_IMAGE_PIXELS = 16_000_000  # above a 12 Mpx photo: decoded on the large-image lane
LARGE_IMAGE_NICENESS = 10


@dataclass(frozen=True)
class MediaPolicy:
    """Which images a request may name, and how large they may be.

    local_root: the folder whose files (after symlinks and `..` are resolved) a path or `file://` URL
        may name; None: no local file is read.
    allow_remote: fetch http(s) URLs; `allowed_domains`, when set, the only host names fetched.
    max_bytes: the most bytes one image may take, encoded (data URL, file or response body).
    max_pixels: the most pixels one image may have, read from its header before it is decoded.
    max_images: the most images one request may hold (`--limit-mm-per-prompt`).
    max_request_pixels: the most pixels all images of one request may have together.
    timeout_s: the longest a remote image may take, connect, redirects and body included.
    max_fetches: how many remote images the server fetches at a time; more wait, within their deadline.
    max_redirects: how many redirects a remote image may take.
    """

    local_root: Path | None = None
    allow_remote: bool = False
    allowed_domains: frozenset[str] | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    max_request_pixels: int = 80_000_000
    timeout_s: float = 10.0
    max_fetches: int = 8
    max_redirects: int = 5


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


def fetch_failed(url: str, param: str) -> RequestError:
    """One answer for every failed fetch (refused, timed out, not found, not 2xx): the details are logged."""
    return RequestError(
        f"Cannot fetch image {url!r} (refused, timed out, or not answered with the image).",
        param=param,
        code="image_fetch_failed",
    )


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


def local_file(url: str, policy: MediaPolicy, param: str) -> Path:
    """The file a path or `file://` URL names, if it lies in `policy.local_root` once resolved.

    Every refusal is one answer, the same whether the file is missing, outside the folder, reached
    through a symlink or `..` that leads out, or the path cannot be resolved at all (a symlink loop,
    a name too long): a client learns nothing of other files.
    """
    if policy.local_root is None:  # the file system is not touched
        raise RequestError(
            "This server reads no image files of its own: send the image as a data URL, or start aki serve "
            "with --allowed-local-media-path DIR.",
            param=param,
            code="local_media_disabled",
        )
    not_found = RequestError(
        "No image file at that path in the folder this server reads images from (--allowed-local-media-path).",
        param=param,
        code="image_not_found",
    )
    name = urllib.parse.unquote(url.removeprefix("file://")) if url.startswith("file://") else url
    try:
        resolved = (policy.local_root / name).resolve()
        if resolved.is_relative_to(policy.local_root) and resolved.is_file():
            return resolved
    except (OSError, RuntimeError, ValueError):  # ELOOP, ENAMETOOLONG; RuntimeError: a loop on Python < 3.13
        pass
    raise not_found


class PixelBudget:
    """What is left of one request's pixels (`max_request_pixels`), spent image by image from headers."""

    def __init__(self, policy: MediaPolicy):
        self.policy, self.left = policy, policy.max_request_pixels

    def spend(self, width: int, height: int, name: str, param: str) -> None:
        pixels = width * height
        if pixels > self.policy.max_pixels:
            raise RequestError(
                f"{name} has too many pixels: {width}x{height} = {pixels}, over the limit of "
                f"{self.policy.max_pixels} (--max-image-pixels).",
                param=param,
                code="image_too_large",
            )
        if pixels > self.left:
            raise RequestError(
                f"The request's images have more than {self.policy.max_request_pixels} pixels together "
                "(--max-request-image-pixels).",
                param=param,
                code="request_images_too_large",
            )
        self.left -= pixels


@contextlib.contextmanager
def readable(name: str, param: str, policy: MediaPolicy):
    """Pillow's refusals of an image as `RequestError`s."""
    try:
        yield
    except Image.DecompressionBombError as error:
        message = f"{name} has too many pixels, over the limit of {policy.max_pixels} (--max-image-pixels)."
        raise RequestError(message, param=param, code="image_too_large") from error
    except UnidentifiedImageError as error:
        formats = ", ".join(IMAGE_FORMATS)
        message = f"{name} is not an image this server reads ({formats})."
        raise RequestError(message, param=param, code="invalid_image") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise RequestError(f"{name} is not a readable image: {error}", param=param, code="invalid_image") from error


def image_size(source, name: str, param: str, policy: MediaPolicy) -> tuple[int, int]:
    """(width, height) of an encoded image (a path or a file object), from its header alone."""
    with readable(name, param, policy), Image.open(source, formats=IMAGE_FORMATS) as opened:
        return opened.size


def decode_image(source, name: str, param: str, policy: MediaPolicy, fit: tuple[int, int] | None, resample):
    """An encoded image whose size was checked (`image_size`) -> 8-bit RGB, shrunk to `fit` (width, height)
    with `resample` when given."""
    if hasattr(source, "seek"):
        source.seek(0)
    with readable(name, param, policy), Image.open(source, formats=IMAGE_FORMATS) as opened:
        image = to_rgb(opened)
    if fit is not None and image.size != fit:
        image = image.resize(fit, resample)
    return image


def lower_priority() -> None:
    """Run the calling thread at a lower CPU priority (Linux: threads have their own nice value)."""
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + LARGE_IMAGE_NICENESS))


def image_url(part: dict, param: str) -> str:
    """The URL of an `image_url` part: `{"image_url": {"url": ...}}`, or `{"image_url": ...}` (Responses API)."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise RequestError("An image_url part needs an `image_url.url` string.", param=param)
    return url


def checked_messages(messages, policy: MediaPolicy) -> list[tuple[int, int, str]]:
    """The shape transformers' handler reads without checking (a list of messages, each with a role and a
    string or a list of typed parts), and where the images are: (message, part, URL) of each, at most
    `max_images` of them."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of messages.", param="messages")
    images = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{param} must be an object with a `role`.", param=param)
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{param}.content must be a string or a list of parts.", param=f"{param}.content")
        for part_index, part in enumerate(content):
            part_param = f"{param}.content[{part_index}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"{part_param} must be an object with a `type`.", param=part_param)
            if part["type"] in TEXT_PARTS and not isinstance(part.get("text"), str):
                raise RequestError(f"{part_param} is a text part without a `text` string.", param=part_param)
            if part["type"] in IMAGE_PARTS:
                images.append((index, part_index, image_url(part, part_param)))
            elif part["type"] not in TEXT_PARTS:
                raise RequestError(
                    f"{part_param} is a {part['type']!r} part; AKI reads text and image_url parts.",
                    param=part_param,
                    code="unsupported_content",
                )
    if len(images) > policy.max_images:
        raise RequestError(
            f"The request has {len(images)} images; this server takes at most {policy.max_images} a request "
            "(--limit-mm-per-prompt).",
            param="messages",
            code="too_many_images",
        )
    return images


class MediaReader:
    """Reads a request's images under `policy`; `fit` (width, height) and `resample`: the resize the
    model's processor applies, done as each image is decoded."""

    def __init__(self, policy: MediaPolicy, fit: tuple[int, int] | None = None, resample=None):
        self.policy, self.fit, self.resample = policy, fit, resample
        self.fetch_slots = asyncio.Semaphore(policy.max_fetches)
        # Decoding holds a core, on threads no other work of the server waits for: headers and ordinary
        # images on two, images over LARGE_IMAGE_PIXELS on one of their own at a lower CPU priority, so
        # a client sending huge images neither queues others' images behind them nor starves generation.
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aki-decode")
        self.large_decoder = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="aki-decode-large", initializer=lower_priority
        )

    async def read_messages(self, messages) -> list[dict]:
        """OpenAI chat messages with every `image_url` part's URL replaced by its decoded image."""
        images = checked_messages(messages, self.policy)
        if not images:
            return messages
        budget = PixelBudget(self.policy)
        read = [dict(message) for message in messages]
        for message, part, url in images:
            param = f"messages[{message}].content[{part}]"
            if read[message]["content"] is messages[message]["content"]:
                read[message]["content"] = list(messages[message]["content"])
            image = await self.read_image(url, param, budget)
            read[message]["content"][part] = {
                "type": messages[message]["content"][part]["type"],
                "image_url": {"url": image},
            }
        return read

    async def read_image(self, url: str, param: str, budget: PixelBudget) -> Image.Image:
        """An `image_url` -> an RGB image: a base64 data URL, a path or `file://` URL in the allowed folder
        (relative paths are taken from it), or an http(s) URL when the policy fetches them."""
        policy = self.policy
        if url.startswith("data:"):
            name, source = "The image data URL", data_url_bytes(url, policy, param)
        elif url.startswith(("http://", "https://")):
            if not policy.allow_remote:
                raise RequestError(
                    f"Remote image {url!r} is not fetched: send the image as a data URL, or start the server with "
                    "--allow-remote-images.",
                    param=param,
                    code="remote_image_disabled",
                )
            body = io.BytesIO(await self.fetch(url, param))
            try:
                return await self.decode(body, f"The image at {url!r}", param, budget)
            except RequestError as error:  # what a remote server sent is not told: it would map the network
                if error.code == "invalid_image":
                    logger.info("image fetch %s: %s", url, error.message)
                    raise fetch_failed(url, param) from error
                raise
        elif URL_SCHEME.match(url) and not url.startswith("file://"):
            message = f"Image URL {url!r}: AKI reads data:, http(s):// and file:// URLs and paths."
            raise RequestError(message, param=param, code="unsupported_url_scheme")
        else:
            source = local_file(url, policy, param)
            if source.stat().st_size > policy.max_bytes:
                raise too_large("The image file", policy, param)
            name = f"The file {url!r}"
        return await self.decode(source, name, param, budget)

    async def decode(self, source, name: str, param: str, budget: PixelBudget) -> Image.Image:
        loop = asyncio.get_running_loop()
        width, height = await loop.run_in_executor(self.decoder, image_size, source, name, param, self.policy)
        budget.spend(width, height, name, param)
        lane = self.decoder if width * height <= LARGE_IMAGE_PIXELS else self.large_decoder
        return await loop.run_in_executor(lane, decode_image, source, name, param, self.policy, self.fit, self.resample)

    async def fetch(self, url: str, param: str) -> bytes:
        """The body at `url`, within one deadline (`timeout_s`: waiting for a slot, connect, every redirect
        and the body), refused once it passes `max_bytes`; every redirect is checked as the URL was."""
        import httpx2

        policy = self.policy
        try:
            async with asyncio.timeout(policy.timeout_s), self.fetch_slots:
                async with httpx2.AsyncClient(follow_redirects=False, timeout=policy.timeout_s) as client:
                    for _ in range(policy.max_redirects + 1):
                        check_remote_url(url, policy, param)
                        async with client.stream("GET", url) as response:
                            if response.is_redirect:
                                url = urllib.parse.urljoin(url, response.headers["location"])
                                continue
                            if not response.is_success:
                                raise ConnectionError(f"HTTP {response.status_code}")
                            declared = response.headers.get("content-length", "")
                            if declared.isdigit() and int(declared) > policy.max_bytes:
                                raise too_large(f"The image at {url!r}", policy, param)
                            body = bytearray()
                            async for chunk in response.aiter_bytes(READ_CHUNK_BYTES):
                                body += chunk
                                if len(body) > policy.max_bytes:
                                    raise too_large(f"The image at {url!r}", policy, param)
                            return bytes(body)
                    raise ConnectionError(f"more than {policy.max_redirects} redirects")
        except TimeoutError:
            logger.info("image fetch %s: over the %g s deadline", url, policy.timeout_s)
        except (OSError, httpx2.HTTPError) as error:  # ConnectionError is an OSError
            logger.info("image fetch %s: %s", url, error)
        raise fetch_failed(url, param)

    def close(self) -> None:
        for pool in (self.decoder, self.large_decoder):
            pool.shutdown(wait=False, cancel_futures=True)


def data_url_bytes(url: str, policy: MediaPolicy, param: str) -> io.BytesIO:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        message = "An image data URL must be base64: data:image/png;base64,<data>."
        raise RequestError(message, param=param, code="invalid_image")
    if len(payload) * 3 // 4 > policy.max_bytes:  # before decoding it
        raise too_large("The image data URL", policy, param)
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except binascii.Error as error:
        message = f"The image data URL is not valid base64: {error}"
        raise RequestError(message, param=param, code="invalid_image") from error
