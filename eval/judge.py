"""An LLM judge behind any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, ...).

Configured by flags or the environment: `AKI_JUDGE_BASE_URL` (e.g. http://127.0.0.1:8000/v1),
`AKI_JUDGE_MODEL` and `AKI_JUDGE_API_KEY` (falling back to `OPENAI_API_BASE` / `OPENAI_API_KEY`).
Every judged number is reported with `Judge.name`.
"""

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

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


class CachedJudge:
    """A judge whose replies are kept in a JSONL file, so a rerun or a second scoring never pays twice.

    A reply is keyed by the judge's name, the messages and the settings, and by how many times this
    object was already asked the same thing: a retry of an unusable reply (MCQ matching asks up to
    three times) is a new question the first time and a cached one on every rerun.
    """

    def __init__(self, judge, path: Path):
        self.judge, self.path = judge, Path(path)
        self.replies: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.replies[entry["key"]] = entry["reply"]
        self.asked: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return self.judge.name

    def ask(self, prompt: str, system: str | None = None, **kwargs) -> str:
        question = json.dumps([self.judge.name, system, prompt, sorted(kwargs.items())])
        key = hashlib.sha256(f"{question}\n{self.asked[question]}".encode()).hexdigest()
        self.asked[question] += 1
        if key not in self.replies:
            self.replies[key] = self.judge.ask(prompt, system, **kwargs)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"key": key, "reply": self.replies[key]}) + "\n")
        return self.replies[key]
