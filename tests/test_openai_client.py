"""ChatClient (the `openai` SDK underneath) and PromptedAgent against a stub OpenAI-compatible server on loopback:
retries of 429/5xx through the SDK (counted on the stub), timeouts, 4xx and connection failures as one clear
`ChatClientError`, the bounded ordered map, and the prompted agent's turn.

`StubOpenAI` is the test double the G-Eval, prompted-baseline and comparison tests share: it records every request
and the most requests it held at once, and can fail, delay or hold requests on cue."""
import http.server
import json
import math
import re
import socket
import threading
import time

import numpy as np
import pytest

from gopo_jax.clients.openai_chat import PromptedAgent, parse_answer
from gopo_jax.endpoint import ChatClient, ChatClientError, map_concurrently
from gopo_jax.dialogue.env_protocol import HostObs
from gopo_jax.dialogue.sop import UNRECOGNISED, sop_from_dict


def stub_reply(body: dict, index: int) -> str:
    """A deterministic answer in the prompted agent's format (the same for every one of `n` choices): the first
    strategy the system prompt allows, and the customer's last words echoed (so every episode's dialogue differs,
    whatever order requests arrive in)."""
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    allowed = re.search(r"Allowed strategies now: ([^.]*)\.", system)
    strategy = allowed.group(1).split(",")[0].strip() if allowed else "none"
    return f"STRATEGY: {strategy}\nREPLY: about {body['messages'][-1]['content'][:40]}"


class StubOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 serving `models` (chat completions with `n` and `logprobs`, and the
    model list); `reply(body, index)` writes the content of choice `index`.

    `fail(status, times)` queues failing answers served before any good one (with `retry-after-ms: 1`, so the SDK's
    retries do not sleep). `delay` holds every chat request that long; `crowd` holds each chat request until that many
    were in flight at once (or 5 s passed): proof that a client overlaps its requests. `top_logprobs` are the
    {token: probability} alternatives offered when a request asks for log-probabilities (None: offer none)."""

    def __init__(self, models=("stub-model",), *, reply=stub_reply, delay: float = 0.0, crowd: int = 0,
                 top_logprobs: dict[str, float] | None = None):
        self.models, self.reply, self.delay, self.crowd, self.top_logprobs = models, reply, delay, crowd, top_logprobs
        self.requests: list[dict] = []  # {"method", "path", "body", "authorization"} in arrival order
        self.in_flight = self.max_in_flight = 0
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._crowded = threading.Event()
        self._closing = threading.Event()  # cuts every hold short at shutdown
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                stub._record(self, None)
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                             "owned_by": "stub"} for m in stub.models]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub._record(self, body)
                with stub._lock:
                    failure = stub._failures.pop(0) if stub._failures else None
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    if stub.crowd and stub.in_flight >= stub.crowd:
                        stub._crowded.set()
                try:
                    if stub.crowd:
                        stub._crowded.wait(5.0)
                    if stub.delay:
                        stub._closing.wait(stub.delay)
                    status, payload, headers = self._answer(failure, body)
                finally:
                    # Leaves the count before the answer is written: once the client reads it, its next request may
                    # arrive before this thread runs again, and would otherwise be counted beside this finished one.
                    with stub._lock:
                        stub.in_flight -= 1
                self._send(status, payload, headers)

            def _answer(self, failure, body):
                if failure is not None:
                    return failure, {"error": {"message": f"stub failure {failure}"}}, {"retry-after-ms": "1"}
                if self.path != "/v1/chat/completions":
                    return 404, {"error": {"message": f"no route {self.path}"}}, None
                if body.get("model") not in stub.models:
                    return 404, {"error": {"message": f"model {body.get('model')!r} is not served here",
                                           "type": "not_found"}}, None
                return 200, stub._completion(body), None

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up is what some tests provoke

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _record(self, handler, body):
        with self._lock:
            self.requests.append({"method": handler.command, "path": handler.path, "body": body,
                                  "authorization": handler.headers.get("Authorization")})

    def _completion(self, body: dict) -> dict:
        choices = []
        for i in range(body.get("n") or 1):
            choice = {"index": i, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": self.reply(body, i)}}
            if body.get("logprobs") and self.top_logprobs is not None:
                top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in self.top_logprobs.items()]
                choice["logprobs"] = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                   "bytes": None, "top_logprobs": top}]}
            choices.append(choice)
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": choices}

    def fail(self, status: int, times: int) -> None:
        with self._lock:
            self._failures.extend([status] * times)

    def chat_requests(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    def close(self):
        self._closing.set()
        self._crowded.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub():
    server = StubOpenAI()
    yield server
    server.close()


HELLO = [{"role": "user", "content": "hi"}]


def test_chat_through_the_sdk(stub, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    client = ChatClient(stub.url, "stub-model", api_key_env="STUB_KEY")
    assert client.base_url == stub.url + "/v1" and client.models() == ["stub-model"]
    completion = client.chat(HELLO, temperature=0, max_tokens=3, seed=1)
    assert completion.choices[0].message.content == "STRATEGY: none\nREPLY: about hi"
    assert client.complete_text(HELLO) == "STRATEGY: none\nREPLY: about hi"
    first = stub.chat_requests()[0]
    assert first["model"] == "stub-model" and first["messages"] == HELLO
    assert (first["temperature"], first["max_tokens"], first["seed"]) == (0, 3, 1)
    assert stub.requests[0]["authorization"] == "Bearer sk-test"
    # No key configured: a placeholder is sent (the SDK demands one; a loopback server ignores it).
    monkeypatch.delenv("STUB_KEY")
    ChatClient(stub.url + "/v1/", "stub-model", api_key_env="STUB_KEY").complete_text(HELLO)
    assert stub.requests[-1]["authorization"] == "Bearer no-key" and stub.requests[-1]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retryable_statuses_are_retried_by_the_sdk(stub, status):
    stub.fail(status, times=2)
    client = ChatClient(stub.url, "stub-model", max_retries=2)
    assert client.complete_text(HELLO).endswith("about hi")
    assert len(stub.chat_requests()) == 3


def test_retries_run_out_into_one_clear_error(stub):
    stub.fail(503, times=10)
    client = ChatClient(stub.url, "stub-model", max_retries=2, config_keys="geval.endpoint_url")
    with pytest.raises(ChatClientError) as err:
        client.chat(HELLO)
    assert err.value.status == 503 and len(stub.chat_requests()) == 3
    message = str(err.value)
    assert f"{stub.url}/v1/chat/completions (model 'stub-model') answered HTTP 503: stub failure 503" in message
    assert "tried 3 times" in message and "check geval.endpoint_url" in message


def test_4xx_is_not_retried(stub):
    client = ChatClient(stub.url, "no-such-model", max_retries=3)
    with pytest.raises(ChatClientError, match=r"model 'no-such-model'\) answered HTTP 404: model 'no-such-model' "
                                              r"is not served here$") as err:
        client.chat(HELLO)
    assert err.value.status == 404 and len(stub.chat_requests()) == 1
    stub.fail(401, times=1)
    with pytest.raises(ChatClientError, match=r"HTTP 401.*check the API key in \$OPENAI_API_KEY"):
        ChatClient(stub.url, "stub-model", max_retries=3).chat(HELLO)
    assert len(stub.chat_requests()) == 2


def test_timeout_is_honoured_and_retried():
    slow = StubOpenAI(delay=10.0)
    try:
        client = ChatClient(slow.url, "stub-model", timeout=0.3, max_retries=1)
        start = time.monotonic()
        with pytest.raises(ChatClientError, match=r"sent no answer within 0.3 s \(tried 2 times\)") as err:
            client.chat(HELLO)
        # Two 0.3 s attempts and the SDK's first backoff (at most 0.5 s), far below the stub's 10 s.
        assert time.monotonic() - start < 3.0
        assert err.value.status is None and len(slow.chat_requests()) == 2
    finally:
        slow.close()


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}", "m", max_retries=1, timeout=2)
    with pytest.raises(ChatClientError, match=rf"127.0.0.1:{port}/v1/chat/completions \(model 'm'\) could not be "
                                              r"reached \(tried 2 times; .*check the server is up") as err:
        client.chat(HELLO)
    assert err.value.status is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="http:// or https://"):
        ChatClient("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="timeout > 0"):
        ChatClient("http://127.0.0.1:8000", "m", timeout=0)
    with pytest.raises(ValueError, match="at least 1"):
        map_concurrently(str, [1], 0)


def test_map_concurrently_bounds_in_flight_and_keeps_order():
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def work(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.01 * (7 - i % 7))  # later items finish first
        with lock:
            state["now"] -= 1
        return i * i

    assert map_concurrently(work, range(20), 3) == [i * i for i in range(20)]
    assert state["most"] == 3


def test_parse_answer():
    names = ("greet", "recommend")
    assert parse_answer("STRATEGY: recommend\nREPLY: try the red one", names) == (1, "try the red one")
    assert parse_answer("STRATEGY: dance\nREPLY: hi", names) == (UNRECOGNISED, "hi")
    assert parse_answer("just text", names) == (UNRECOGNISED, "just text")


SHOP_SOP = sop_from_dict({"name": "shop", "strategies": ["greet", "recommend", "close"], "initial": "opening",
                          "stages": [{"name": "opening", "allowed": ["greet", "close"], "next": {"greet": "offer"}},
                                     {"name": "offer", "allowed": ["recommend", "close"], "terminal": True}]})


def test_prompted_agent_acts_through_the_endpoint(stub):
    agent = PromptedAgent(ChatClient(stub.url, "stub-model"), SHOP_SOP, ("say hello", "suggest an item", "say bye"),
                          max_tokens=4)
    obs = HostObs(context="welcome to shopwise", customer="hi i need some help", stage=SHOP_SOP.initial,
                  allowed=np.asarray(SHOP_SOP.allowed[SHOP_SOP.initial]), done=False)
    prompt = agent.system_prompt(obs.stage, obs.allowed, obs.context)
    assert "Allowed strategies now: greet, close." in prompt and "welcome to shopwise" in prompt
    assert "- recommend: suggest an item" in prompt
    assert agent.act(obs) == (0, "about hi i need some help")
    sent = stub.chat_requests()[0]
    assert sent["max_tokens"] == 4 and sent["temperature"] == 0.0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert [m["role"] for m in agent.history] == ["user", "assistant"]
