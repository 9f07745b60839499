"""The project's client of OpenAI-compatible chat endpoints, built on the official `openai` SDK: what the G-Eval
judge (`gopo_jax.metrics.geval`) and the prompted baseline (`gopo_jax.clients`) talk through.

`ChatClient` wraps `openai.OpenAI`: retries, backoff and timeouts are the SDK's (`max_retries` retries of HTTP 408,
409, 429 and 5xx answers, connection errors and timeouts, with exponential backoff or the server's `Retry-After`;
`timeout` seconds per attempt). Every SDK failure becomes one `ChatClientError` naming the URL, the model, the HTTP
status and the server's own message. The API key is an argument or, when that is empty, the environment variable
`api_key_env` (never the command line or a config that is written to disk); without one a placeholder is sent, which
servers on loopback ignore and providers answer with 401.

`map_concurrently` runs the episodes or prompts of a batch with a bound on how many are in flight and returns their
results in input order.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence, TypeVar

import openai
from openai.types.chat import ChatCompletion

# The SDK refuses to build a client without a key; local servers need none and ignore the header.
PLACEHOLDER_API_KEY = "no-key"

Item = TypeVar("Item")
Result = TypeVar("Result")


class ChatClientError(RuntimeError):
    """A chat request that failed for good; `status` is the HTTP status (None for connection errors and timeouts)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _retried_by_sdk(status: int) -> bool:
    """The statuses `openai` retries by itself (its `_should_retry` without the `x-should-retry` override)."""
    return status in (408, 409, 429) or status >= 500


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        return str(body.get("message") or body)[:500]
    return str(body or err.message)[:500]


class ChatClient:
    """`chat(messages, **params) -> ChatCompletion` against an OpenAI-compatible endpoint.

    `base_url` is the server root or its `/v1` root (`/v1` is added when missing). `config_keys` names the settings
    that chose this endpoint (e.g. "baselines.prompted.base_url / .model") so that an error says what to fix.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str = "", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, config_keys: str = ""):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"ChatClient: base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError(f"ChatClient: no model name given for {base_url}")
        if max_retries < 0 or timeout <= 0:
            raise ValueError(f"ChatClient: max_retries >= 0 and timeout > 0 are required, got max_retries="
                             f"{max_retries}, timeout={timeout}")
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model, self.api_key_env, self.config_keys = model, api_key_env, config_keys
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        key = api_key or (os.environ.get(api_key_env, "") if api_key_env else "")
        self.sdk = openai.OpenAI(base_url=self.base_url, api_key=key or PLACEHOLDER_API_KEY, timeout=self.timeout,
                                 max_retries=self.max_retries)

    def _error(self, err: openai.OpenAIError) -> ChatClientError:
        request = getattr(err, "request", None)
        where = f"{request.url if request is not None else self.base_url} (model {self.model!r})"
        tries = self.max_retries + 1
        tried = f"tried {tries} time{'s' if tries > 1 else ''}"
        check = f"; check {self.config_keys}" if self.config_keys else ""
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            message = f"{where} answered HTTP {status}: {_server_message(err)}"
            if _retried_by_sdk(status):
                message += f" ({tried})"
            if status in (401, 403):
                message += f"; check the API key in ${self.api_key_env}"
            return ChatClientError(message + check, status=status)
        if isinstance(err, openai.APITimeoutError):
            return ChatClientError(f"{where} sent no answer within {self.timeout:g} s ({tried}); raise the timeout "
                                   f"or check the server's load{check}")
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err
            return ChatClientError(f"{where} could not be reached ({tried}; {type(cause).__name__}: {cause}); check "
                                   f"the server is up and the URL{check}")
        return ChatClientError(f"{where} failed: {type(err).__name__}: {err}{check}")

    def chat(self, messages: Sequence[dict], **params: Any) -> ChatCompletion:
        """POST /chat/completions with `messages` and the SDK's parameters (temperature, max_tokens, n, logprobs,
        top_logprobs, seed, extra_body, ...)."""
        try:
            return self.sdk.chat.completions.create(model=self.model, messages=list(messages), **params)
        except openai.OpenAIError as err:
            raise self._error(err) from None

    def complete_text(self, messages: Sequence[dict], **params: Any) -> str:
        """The first choice's message content."""
        completion = self.chat(messages, **params)
        if not completion.choices or completion.choices[0].message is None:
            raise ChatClientError(f"{self.base_url}/chat/completions (model {self.model!r}) answered without "
                                  f"choices[0].message: {str(completion)[:200]}")
        return completion.choices[0].message.content or ""

    def models(self) -> list[str]:
        """The model names the endpoint serves (GET /models)."""
        try:
            return [m.id for m in self.sdk.models.list()]
        except openai.OpenAIError as err:
            raise self._error(err) from None


def map_concurrently(fn: Callable[[Item], Result], items: Sequence[Item], max_concurrency: int) -> list[Result]:
    """`[fn(x) for x in items]` with at most `max_concurrency` calls in flight, results in input order. The first
    failure (in input order) is raised once the calls already running end; calls not yet started are dropped."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    with concurrent.futures.ThreadPoolExecutor(max_concurrency) as pool:
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
