"""An OpenAI-compatible chat client (standard library only) and a prompted large model acting as the CS agent.

`ChatClient` posts to `<base_url>/v1/chat/completions` with retries: HTTP 429 and 5xx answers and connection
errors / timeouts are retried with exponential backoff (`backoff · 2^attempt` seconds, or the server's
`Retry-After` when it sends one); other 4xx answers fail at once. Every failure raises one `ChatClientError`
naming the URL, the model, the HTTP status and the server's own message. The API key is read from the
environment variable `api_key_env` (never passed on the command line or stored in configs); a local server needs
none.

`PromptedAgent` is the prompt-only baseline for host environments: a system prompt with the service procedure
(the strategies the SOP allows at the current stage, with their descriptions) and the whole strategy set asks the
model to answer as the customer-service agent with one line `STRATEGY: <name>` followed by the reply.
`act(obs)` returns (strategy index, reply text). If the model names no valid strategy the environment's
realisation check decides later what the reply carried out (the strategy is then reported as UNRECOGNISED).
"""
from __future__ import annotations

import dataclasses
import email.utils
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from gopo_jax.dialogue.sop import SOP, UNRECOGNISED

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatClientError(RuntimeError):
    """A chat request that failed for good; `status` is the HTTP status (None for connection errors)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class ChatClient:
    """`chat(messages, **params) -> response dict` against an OpenAI-compatible endpoint."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"ChatClient: base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("ChatClient: max_retries >= 0, backoff >= 0 and timeout > 0 are required")
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.attempts = 0  # requests sent, retries included (for diagnostics and tests)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            self.attempts += 1
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            request = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError:
                    raise ChatClientError(f"{url} (model {self.model!r}) answered with non-JSON: "
                                          f"{payload[:200]!r}", status=200) from None
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                if e.code not in RETRY_STATUSES:
                    raise ChatClientError(f"{url} (model {self.model!r}) refused the request: HTTP {e.code}: "
                                          f"{detail}", status=e.code) from None
                last, status = f"HTTP {e.code}: {detail}", e.code
                wait = _retry_after(e.headers) if _retry_after(e.headers) is not None else wait
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last, status = f"{type(reason).__name__}: {reason}", None
            if attempt < self.max_retries:
                time.sleep(min(wait, self.max_backoff))
        raise ChatClientError(f"{url} (model {self.model!r}) failed after {self.max_retries + 1} attempts; last "
                              f"error {last}. Check the server is up, the URL and the key in ${self.api_key_env}",
                              status=status)

    def chat(self, messages: Sequence[dict], **params: Any) -> dict:
        """POST /chat/completions with `messages` and OpenAI parameters (temperature, max_tokens, n, logprobs, ...)."""
        return self._request("POST", "/chat/completions", {"model": self.model, "messages": list(messages),
                                                           **params})

    def complete_text(self, messages: Sequence[dict], **params: Any) -> str:
        """The first choice's message content."""
        response = self.chat(messages, **params)
        try:
            return response["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ChatClientError(f"{self.base_url}/chat/completions (model {self.model!r}) answered without "
                                  f"choices[0].message.content: {str(response)[:200]}") from None

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/models").get("data", [])]


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        return str(body.get("error", {}).get("message") or body)[:500]
    except (json.JSONDecodeError, AttributeError, OSError):
        return str(err.reason)


@dataclasses.dataclass
class PromptedAgent:
    """A prompted chat model as the CS agent of a host environment (HostObs in, (strategy, reply) out)."""

    client: ChatClient
    sop: SOP
    strategy_descriptions: Sequence[str] = ()
    temperature: float = 0.0
    max_tokens: int = 128
    history: list = dataclasses.field(default_factory=list)

    def system_prompt(self, stage: int, allowed, context: str = "") -> str:
        descriptions = dict(zip(self.sop.strategies, self.strategy_descriptions))
        lines = [f"- {k}: {descriptions.get(k, k)}" for k in self.sop.strategies]
        allowed_names = [k for k, ok in zip(self.sop.strategies, allowed) if ok]
        business = f"Business context: {context}\n" if context else ""
        return ("You are the customer-service agent of a shop. Follow the standard operating procedure (SOP).\n"
                f"{business}Strategies:\n" + "\n".join(lines) + "\n\n"
                f"Current SOP stage: {self.sop.stages[stage]}. Allowed strategies now: {', '.join(allowed_names)}. "
                "Using any other strategy violates the SOP.\n"
                "Answer with exactly two lines:\nSTRATEGY: <one allowed strategy name>\nREPLY: <your reply to the "
                "customer, one or two sentences>")

    def reset(self) -> None:
        self.history = []

    def act(self, obs) -> tuple[int, str]:
        """One agent turn for `obs` (a HostObs): the strategy index (UNRECOGNISED if none named) and the reply."""
        self.history.append({"role": "user", "content": obs.customer})
        system = self.system_prompt(obs.stage, obs.allowed, getattr(obs, "context", ""))
        messages = [{"role": "system", "content": system}, *self.history]
        text = self.client.complete_text(messages, temperature=self.temperature, max_tokens=self.max_tokens)
        strategy, reply = parse_answer(text, self.sop.strategies)
        self.history.append({"role": "assistant", "content": reply})
        return strategy, reply


def parse_answer(text: str, strategies: Sequence[str]) -> tuple[int, str]:
    """"STRATEGY: x\\nREPLY: y" -> (index of x or UNRECOGNISED, y); without a REPLY line the whole text is the reply."""
    match = re.search(r"STRATEGY:\s*([A-Za-z_\-]+)", text)
    name = match.group(1).strip().lower() if match else ""
    strategy = strategies.index(name) if name in strategies else UNRECOGNISED
    reply_match = re.search(r"REPLY:\s*(.*)", text, flags=re.S)
    reply = reply_match.group(1).strip() if reply_match else re.sub(r"STRATEGY:.*\n?", "", text).strip()
    return strategy, reply
