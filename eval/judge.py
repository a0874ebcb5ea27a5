"""An LLM judge behind any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, ...).

Configured by flags or the environment: `AKI_JUDGE_BASE_URL` (e.g. http://127.0.0.1:8000/v1),
`AKI_JUDGE_MODEL` and `AKI_JUDGE_API_KEY` (falling back to `OPENAI_API_BASE` / `OPENAI_API_KEY`).
Every judged number is reported with `Judge.name`.
"""

import json
import logging
import os
import time
import urllib.error
import urllib.request

logger = logging.getLogger("aki.eval.judge")


class JudgeError(RuntimeError):
    """The judge gave no usable reply after every retry."""


class Judge:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 1.0,
    ):
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.api_key, self.timeout, self.retries, self.backoff = model, api_key, timeout, retries, backoff

    @property
    def name(self) -> str:
        return self.model

    @classmethod
    def from_environment(cls, base_url=None, model=None, api_key=None, **kwargs) -> "Judge | None":
        """A judge from flags, else the environment; None when no base URL or model is set."""
        base_url = base_url or os.environ.get("AKI_JUDGE_BASE_URL") or os.environ.get("OPENAI_API_BASE")
        model = model or os.environ.get("AKI_JUDGE_MODEL")
        api_key = api_key or os.environ.get("AKI_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not base_url or not model:
            return None
        return cls(base_url, model, api_key, **kwargs)

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        """The reply text; retries on connection errors, HTTP errors and malformed replies."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = None
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode())
                content = reply["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"content is {type(content).__name__}")
                return content
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
                last_error = error
                logger.warning("judge attempt %d/%d failed: %s", attempt + 1, self.retries, error)
                time.sleep(self.backoff * (2**attempt))
        raise JudgeError(f"The judge at {self.url} failed {self.retries} times; last error: {last_error}")

    def ask(self, prompt: str, system: str | None = None, **kwargs) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.complete(messages, **kwargs)
