"""Small helpers shared by the tests."""

import base64
import contextlib
import http.server
import io
import select
import socket
import subprocess
import threading
import time


def chat(question, answer=None, num_images=1):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process, timeout_s: float = 60) -> None:
    """Terminate a server process, and kill it if it does not stop in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def save_checkpoint(model, processor, folder):
    """A model and its processor saved as one native folder; returns the folder."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def encode(processor, messages, images, add_generation_prompt=None):
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] == "user"
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return processor(images=images or None, text=text, return_tensors="pt")


def supervised_text(processor, encoded):
    """The decoded tokens an encoded sample takes the loss on."""
    ids = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    return processor.tokenizer.decode(ids)


def packed_caption_and_chat(processor, images, question, answer):
    """A caption sample and a chat sample packed in one row (position ids restart); returns (packed, parts).

    The caption's image has no assistant header, so the chat's header must not open a window for it.
    """
    import torch

    caption = processor(images=images[:1], text="<image>An astronaut.<|endofchunk|>", return_tensors="pt")
    parts = [caption, encode(processor, chat(question, answer), images[1:2])]
    packed = {
        "input_ids": torch.cat([p["input_ids"] for p in parts], dim=1),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "position_ids": torch.cat([torch.arange(p["input_ids"].shape[1]) for p in parts])[None],
    }
    return packed, parts


def save_tiny_qwen2(folder):
    """A tiny random Qwen2 causal LM and a ChatML tokenizer (`<|im_start|>`, `<|im_end|>`), saved as a
    pretrained LM folder is, with a base model's EOS (`<|endoftext|>`). Returns the tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aki.presets import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@contextlib.contextmanager
def trickling_server(max_seconds: int = 40):
    """A server on 127.0.0.1 that answers `/status.png` with its status line one byte a second, and any
    other path with an image's headers and then one byte a second, each for at most `max_seconds` or
    until the reader hangs up (looked for every 0.1 s). Yields its base URL and a list that gets, per
    request, how many seconds it was read before the reader hung up (or the bytes ran out)."""
    lasted = []

    class Trickle(http.server.BaseHTTPRequestHandler):
        def hung_up(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

        def do_GET(self):
            started = time.monotonic()
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % max_seconds
            slow = head if self.path == "/status.png" else bytes(max_seconds)
            with contextlib.suppress(OSError):  # the reader hung up
                if self.path != "/status.png":
                    self.wfile.write(head)
                for byte in slow[:max_seconds]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    for _ in range(10):
                        if self.hung_up():
                            raise ConnectionResetError
                        time.sleep(0.1)
            lasted.append(time.monotonic() - started)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", lasted
        finally:
            server.shutdown()
