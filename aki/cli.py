"""The `aki` command: chat with a model, or draw its image-to-question attention.

aki chat --model DIR --image PATH "What is in the image?"     # one answer, streamed
aki chat --model DIR [--image PATH]                           # interactive; /image PATH, /reset, /quit
aki attention --model DIR --image PATH "question" --out map.png
aki serve --model DIR [--host 127.0.0.1] [--port 8000]        # OpenAI-compatible server (aki[serve]); see --help
"""

import argparse
import json
import os
import sys
from pathlib import Path

from transformers import TextStreamer

from .commands import add_debug_flag, model_folder, run_command


def load(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import aki  # registers the Auto classes

    model = AutoModelForImageTextToText.from_pretrained(model_folder(model_dir)).eval()
    model.set_attn_implementation(aki.split_attention.default_attn_implementation(model.device))
    return model, AutoProcessor.from_pretrained(model_dir)


class StreamTo(TextStreamer):
    """transformers' streamer, writing to a chosen stream instead of stdout."""

    def __init__(self, output, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.output = output

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, end="\n" if stream_end else "", file=self.output, flush=True)


class Chat:
    """A conversation: each turn re-encodes the whole chat, so every image sees the question of its turn."""

    def __init__(self, model, processor, max_new_tokens: int = 256, output=None, system: str | None = None):
        # sys.stdout read now, not at import: a stream redirected after `import aki.cli` still gets the answer.
        self.output = sys.stdout if output is None else output
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.system = system  # None: the chat template's default system prompt
        self.reset()

    def reset(self) -> None:
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.images, self.pending_image = [], None

    def add_image(self, path: str) -> None:
        from .processing_aki import load_image

        self.pending_image = load_image(path)

    def ask(self, question: str) -> str:
        """Stream the answer to `output` token by token; returns it."""
        content = [{"type": "text", "text": question}]
        if self.pending_image is not None:
            content.insert(0, {"type": "image"})
            self.images.append(self.pending_image)
            self.pending_image = None
        self.messages.append({"role": "user", "content": content})
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=self.images or None, text=prompt, return_tensors="pt").to(self.model.device)
        streamer = StreamTo(self.output, self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer)
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def interactive(chat: Chat, read=input) -> None:
    print("Type a question; /image PATH adds an image to the next question, /reset starts over, /quit ends.")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
        elif line.startswith("/image "):
            try:
                chat.add_image(line.removeprefix("/image ").strip())
            except ValueError as error:
                print(error)
        elif line:
            print("aki> ", end="", flush=True)
            chat.ask(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aki", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chat_parser = commands.add_parser("chat", help="answer a question about an image (streamed)")
    attention_parser = commands.add_parser("attention", help="save per-layer image-to-question attention maps")
    for sub in (chat_parser, attention_parser):
        sub.add_argument("--model", required=True, help="a native AKI folder")
        sub.add_argument("--image", help="an image file")
        sub.add_argument("question", nargs="?", help="the question (chat: omit it for an interactive session)")
    chat_parser.add_argument("--max-new-tokens", type=int, default=256)
    chat_parser.add_argument(
        "--system", help="the system prompt ('' for none; small LMs such as SmolLM2 answer badly under AKI's default)"
    )
    attention_parser.add_argument("--out", type=Path, default=Path("attention_map.png"))
    serve_parser = commands.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions)")
    serve_parser.add_argument("--model", required=True, help="a native AKI folder")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="read image paths and file:// URLs that lie in DIR (after symlinks and '..'); default: none",
    )
    serve_parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve_parser.add_argument(
        "--allowed-media-domains", nargs="+", metavar="HOST", help="with --allow-remote-images: only these hosts"
    )
    serve_parser.add_argument(
        "--max-image-bytes", type=int, help="the largest encoded image, in bytes (default: 20 MiB)"
    )
    serve_parser.add_argument(
        "--max-image-pixels", type=int, help="the most pixels one image may have (default: 40 million)"
    )
    serve_parser.add_argument(
        "--limit-mm-per-prompt",
        type=mm_limits,
        metavar="JSON",
        help="the most images one request may hold, as vLLM takes it: '{\"image\": 8}' (the default)",
    )
    serve_parser.add_argument(
        "--max-request-image-pixels",
        type=int,
        help="the most pixels all images of one request may have together (default: 80 million)",
    )
    serve_parser.add_argument(
        "--image-fetch-timeout",
        type=float,
        help="seconds a remote image may take in all, redirects included (default: 10)",
    )
    serve_parser.add_argument(
        "--max-request-bytes",
        type=int,
        help="the largest request body; larger ones get a 413 unread (default: the largest image as data URL + 4 MiB)",
    )
    serve_parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat template (chat_template_kwargs.chat_template); default: refused",
    )
    serve_parser.add_argument(
        "--api-key",
        default=os.environ.get("AKI_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $AKI_API_KEY; none: open)",
    )
    for sub in (chat_parser, attention_parser, serve_parser):
        add_debug_flag(sub)
    args = parser.parse_args(argv)
    if args.command == "attention" and not (args.image and args.question):
        parser.error("attention needs --image and a question")
    run_command(lambda: run(args), args.debug)


def mm_limits(text: str) -> int:
    """`--limit-mm-per-prompt` as vLLM writes it, '{"image": N}': N. AKI reads no other modality."""
    try:
        limits = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"give JSON such as '{{\"image\": 4}}': {error}") from error
    if not (isinstance(limits, dict) and set(limits) == {"image"} and isinstance(limits["image"], int)):
        raise argparse.ArgumentTypeError(f"give the image count alone, as '{{\"image\": 4}}'; got {text!r}")
    if limits["image"] < 0:
        raise argparse.ArgumentTypeError(f"the image count must be 0 or more; got {limits['image']}")
    return limits["image"]


def run(args: argparse.Namespace) -> None:
    if args.command == "serve":
        from .serving import build_app, media_policy, serve

        limits = {
            "max_bytes": args.max_image_bytes,
            "max_pixels": args.max_image_pixels,
            "max_images": args.limit_mm_per_prompt,
            "max_request_pixels": args.max_request_image_pixels,
            "timeout_s": args.image_fetch_timeout,
        }
        media = media_policy(
            args.allowed_local_media_path,
            args.allow_remote_images,
            args.allowed_media_domains,
            **{name: value for name, value in limits.items() if value is not None},
        )
        app = build_app(args.model, media, args.api_key, args.trust_request_chat_template, args.max_request_bytes)
        serve(app, args.host, args.port)
        return
    model, processor = load(args.model)
    if args.command == "attention":
        from .attention_maps import save_attention_maps
        from .processing_aki import load_image

        print(save_attention_maps(model, processor, load_image(args.image), args.question, args.out))
        return
    chat = Chat(model, processor, args.max_new_tokens, system=args.system)
    if args.image:
        chat.add_image(args.image)
    if args.question:
        chat.ask(args.question)
    else:
        interactive(chat)


if __name__ == "__main__":
    main()
