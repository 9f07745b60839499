"""The server under attack, on a live loopback socket: over a thousand property-based requests (arbitrary JSON,
mutations of valid requests, valid but unusual requests) and hostile clients (oversized, malformed and deeply nested
bodies, wrong content types, stalled and dropped connections, clients that leave while their request is answered).

The properties: never a 5xx, never a dropped connection; every 4xx in OpenAI's error format; every 200 a well-formed
completion or server-sent event stream; and after each attack the server answers the next valid request, with no
error in its log.
"""
import collections
import concurrent.futures
import copy
import json
import logging
import math
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gopo_jax.serve import build_api, start_server
from gopo_jax.serve.api import MAX_BODY_BYTES, MAX_N, MAX_SEED
from gopo_jax.serve.engine import MAX_TOP_LOGPROBS, Sampling
from tests.helpers import checkpointed_run, tiny_run_config

OPENING = [{"role": "system", "content": "welcome to shopwise promo yes"},
           {"role": "user", "content": "hi i need some help"}]
VALID = {"messages": OPENING, "max_tokens": 2, "temperature": 0}
JSON = {"content-type": "application/json"}
ROUTE = "/v1/chat/completions"
BODY_TIMEOUT_S = 3.0  # the served body timeout here (30 s by default): a stalled client is cut off this soon
PROMPT_S = 30.0  # a valid request waits at most this long while attacks go on (2 shared CPU cores)
# A sampled request's device program depends on whether it filters (top_p < 1), not on top_p's value (an argument of
# the program): both kinds are compiled at start. 1e-6 is the extreme filter, a nucleus of one token.
TOP_PS = (1.0, 1e-6)
PROPERTY_REQUESTS = 1_100


class ErrorLog(logging.Handler):
    """Collects the server's error records (uvicorn's "Exception in ASGI application", the batcher's failures)."""

    LOGGERS = ("uvicorn.error", "gopo_jax.serve", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [r.getMessage() for r in taken]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = checkpointed_run(tiny_run_config(), tmp_path_factory.mktemp("attacked"))
    served = build_api(workdir, model_name="tiny-gopo", batch_buckets=[1, 4])
    served.body_timeout_s = BODY_TIMEOUT_S
    running = start_server(served)
    errors = ErrorLog()
    for name in ErrorLog.LOGGERS:  # once the server runs: uvicorn's logging set-up replaces its loggers' handlers
        logging.getLogger(name).addHandler(errors)
    running.served, running.errors = served, errors
    yield running
    running.stop()
    for name in ErrorLog.LOGGERS:
        logging.getLogger(name).removeHandler(errors)


@pytest.fixture()
def serving(server):
    """The server, checked after the test: it answers a valid request promptly and logged no error."""
    server.errors.take()
    yield server
    assert_serving(server)


def assert_serving(server) -> None:
    start = time.monotonic()
    response = httpx.post(server.url + ROUTE, json=VALID, timeout=PROMPT_S)
    assert response.status_code == 200, response.text
    assert_completion(response.json(), VALID)
    assert time.monotonic() - start < PROMPT_S
    assert server.errors.take() == []


# ---------------------------------------------------------------------------------------------- what answers look like
def assert_error(response: httpx.Response) -> None:
    """A 4xx in OpenAI's format, its message free of Python internals."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:2000])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and isinstance(error["code"], str), body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert "Traceback" not in error["message"] and 'File "' not in error["message"], body


def assert_completion(body: dict, request: dict) -> None:
    n = request.get("n", 1)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == list(range(n))
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
    top_n = (request.get("top_logprobs") or 0) if request.get("logprobs") else 0
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert set(choice["gopo"]) == {"strategy", "strategy_logprob", "realised", "aligned", "sop_valid"}
        if request.get("logprobs"):
            entries = choice["logprobs"]["content"]
            assert max_tokens is None or len(entries) <= max_tokens
            for entry in entries:
                assert entry["logprob"] <= 1e-6 and len(entry["top_logprobs"]) == top_n
                assert all(t["logprob"] <= 1e-6 for t in entry["top_logprobs"])
        else:
            assert choice["logprobs"] is None
    assert isinstance(body["gopo"]["stage"], str) and isinstance(body["gopo"]["allowed"], list)


def assert_stream(text: str, request: dict) -> None:
    """Server-sent `chat.completion.chunk` events, every choice finished, then `data: [DONE]`."""
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], text[-500:]
    assert all(e.startswith("data: ") for e in events[:-2])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(finished) == list(range(request.get("n", 1)))
    if (request.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def assert_answer(response: httpx.Response, request) -> None:
    """The property every request must have: a 4xx in OpenAI's format, or a well-formed 200."""
    if response.status_code != 200:
        assert_error(response)
    elif isinstance(request, dict) and request.get("stream") is True:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert_stream(response.text, request)
    else:
        assert_completion(response.json(), request)


# ---------------------------------------------------------------------------------------------- generated requests
FIELDS = ("model", "messages", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "logprobs",
          "top_logprobs", "stream", "stream_options", "gopo_stage", "tools", "functions")
EDGE_NUMBERS = (0, -1, 1, 2, 3, 17, 21, MAX_SEED, MAX_SEED + 1, -MAX_SEED - 2, 10 ** 30, -(10 ** 30), 0.5, 2.0000001,
                1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, True, False)
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(EDGE_NUMBERS)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(st.characters(exclude_categories=()), max_size=20))  # lone surrogates too: JSON can carry them
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
words = st.text(max_size=40) | st.sampled_from(["", " ", "\x00\x01\x7f", "\u202e\u200b\ufeff", "😀" * 30,
                                                "hi i want a discount " * 400])
contents = words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=3)


@st.composite
def conversations(draw, strategies: tuple[str, ...], max_turns: int):
    """[system] (user, assistant)* user, as the server accepts them."""
    messages = [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(contents)}] \
        if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, max_turns - 1))):
        reply = {"role": "assistant", "content": draw(contents)}
        if draw(st.booleans()):
            reply["gopo"] = {"strategy": draw(st.sampled_from(strategies))}
        messages += [{"role": "user", "content": draw(contents)}, reply]
    return messages + [{"role": "user", "content": draw(contents)}]


@st.composite
def unusual_requests(draw, strategies, stages, max_turns):
    """Valid requests at the edges of what the schema allows."""
    request = {"messages": draw(conversations(strategies, max_turns)), "n": draw(st.integers(1, MAX_N)),
               "temperature": draw(st.sampled_from([0, 0.0, 2, 2.0]) | st.floats(0, 2)),
               "top_p": draw(st.sampled_from(TOP_PS) | st.floats(1e-6, 1.0)), "max_tokens": draw(st.integers(1, 3)),
               "stream": draw(st.booleans())}
    optional = {"model": st.sampled_from([None, "", "tiny-gopo"]), "seed": st.integers(-MAX_SEED - 1, MAX_SEED),
                "logprobs": st.booleans(), "top_logprobs": st.integers(0, MAX_TOP_LOGPROBS) | st.none(),
                "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
                "gopo_stage": st.sampled_from(stages) | st.integers(0, len(stages) - 1),
                "tools": st.just([]), "user": st.text(max_size=10)}
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        request[name] = draw(optional[name])
    if "max_tokens" in request and draw(st.booleans()):
        request["max_completion_tokens"] = request.pop("max_tokens")
    return request


@st.composite
def mutated_requests(draw, strategies, stages, max_turns):
    """A cheap valid request, then 1-3 mutations: wrong types, out-of-range numbers, odd messages, unknown fields."""
    request = {"messages": draw(conversations(strategies, max_turns)), "max_tokens": 1,
               "temperature": draw(st.sampled_from([0, 1.0]))}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "number", "top_p", "drop", "extra", "messages", "message", "gopo",
                                     "gopo_stage"]))
        messages = request.get("messages")
        if kind == "field":  # any JSON value in any field
            request[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif kind == "number":
            request[draw(st.sampled_from(["n", "temperature", "max_tokens", "max_completion_tokens", "seed",
                                          "top_logprobs"]))] = draw(st.sampled_from(EDGE_NUMBERS) | st.integers())
        elif kind == "top_p":
            request["top_p"] = draw(st.sampled_from((*TOP_PS, 0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, "0.9",
                                                     None, [0.9])))
        elif kind == "drop" and request:
            request.pop(draw(st.sampled_from(sorted(request))))
        elif kind == "extra":
            request[draw(st.text(max_size=12))] = draw(json_values)
        elif kind == "messages":
            request["messages"] = draw(st.sampled_from([[], {}, "hi", None, [None], [[]], OPENING * 50,
                                                        [OPENING[1]] * 200]).map(copy.deepcopy)  # mutated below
                                       | st.lists(json_values, max_size=3))
        elif kind == "message" and isinstance(messages, list) and messages:
            message = draw(st.sampled_from(messages))
            if isinstance(message, dict):
                field = draw(st.sampled_from(["role", "content", "name", "tool_calls", "gopo"]))
                message[field] = draw(
                    st.sampled_from(["robot", "tool", "function", "USER", "user ", "", "\x00"]) if field == "role"
                    else st.sampled_from(["\ud800", "x\udfffy", [{"type": "text", "text": "\udbff"}],
                                          [{"type": "text", "text": [{"type": "text", "text": "x"}]}],
                                          [{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}],
                                          [[{"type": "text", "text": "x"}]], {"type": "text", "text": "x"}])
                    | json_values)
        elif kind == "gopo" and isinstance(messages, list):
            replies = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
            if replies:
                gopo = {draw(st.sampled_from(["strategy", "stage", "extra"])): draw(
                    st.sampled_from([*strategies, *stages, -1, 10 ** 20, True]) | json_values)}
                draw(st.sampled_from(replies))["gopo"] = draw(st.just(gopo) | json_values)
        elif kind == "gopo_stage":
            request["gopo_stage"] = draw(st.sampled_from([*stages, -1, len(stages), 10 ** 40, True, 1.0, "", " "])
                                         | json_values)
    return request


def encode(request) -> bytes:
    return json.dumps(request).encode()  # NaN and Infinity as JavaScript writes them: a parser must cope


@st.composite
def arbitrary_bodies(draw):
    """JSON of any shape, objects with the schema's field names, and bytes that are not JSON at all."""
    return draw(json_values.map(encode)
                | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=6).map(encode)
                | st.binary(max_size=64))


@pytest.mark.slow
def test_a_thousand_generated_requests_get_4xx_or_well_formed_answers(serving):
    engine = serving.served.engine
    # The programs of the other settings generated requests use (greedy and default sampling are compiled already).
    engine.warmup([Sampling(temperature=t, top_p=p, top_logprobs=k) for t, p, k in [
        (0.0, 1.0, MAX_TOP_LOGPROBS), (1.0, 1.0, MAX_TOP_LOGPROBS), (1.0, TOP_PS[1], 0),
        (1.0, TOP_PS[1], MAX_TOP_LOGPROBS)]])
    shape = engine.sop.strategies, engine.sop.stages, engine.layout.max_turns
    sent = collections.Counter()
    # No retries: a dropped connection fails the example rather than being sent again.
    client = httpx.Client(base_url=serving.url, timeout=PROMPT_S, transport=httpx.HTTPTransport(retries=0))

    @settings(max_examples=PROPERTY_REQUESTS, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(data=st.data())
    def one_request(data):
        family = data.draw(st.sampled_from(["arbitrary", "mutated", "mutated", "unusual"]))  # valid ones cost most
        if family == "arbitrary":
            request, body = None, data.draw(arbitrary_bodies())
        else:
            request = data.draw((mutated_requests if family == "mutated" else unusual_requests)(*shape))
            body = encode(request)
        response = client.post(ROUTE, content=body, headers=JSON)
        sent[family] += 1
        assert_answer(response, request)
        assert family != "unusual" or response.status_code == 200, response.text

    with client:
        one_request()
    assert sum(sent.values()) >= 1_000 and min(sent.values()) >= 100, sent


# ---------------------------------------------------------------------------------------------- hostile clients
def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=PROMPT_S)


def head(length: int | None = None) -> bytes:
    """A request head for a JSON body of `length` bytes (None: chunked)."""
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return f"POST {ROUTE} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{size}\r\n\r\n".encode()


def read_response(sock: socket.socket, timeout: float = PROMPT_S) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 response with a Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    top, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside its answer"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_raw_error(status: int, body: bytes, expected: int) -> None:
    assert status == expected, (status, body[:500])
    assert_error(httpx.Response(status, content=body))


def reset(sock: socket.socket) -> None:
    """Closes with a TCP RST (SO_LINGER 0), as a crashed client or a proxy that gave up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_a_declared_oversized_body_is_refused_before_it_is_sent(serving):
    with connect(serving) as sock:
        sock.sendall(head(MAX_BODY_BYTES + 1))
        status, _, body = read_response(sock)
    assert_raw_error(status, body, 413)
    # A client that sends it anyway gets the 413, and its connection serves the next request.
    with httpx.Client(base_url=serving.url, timeout=PROMPT_S) as client:
        response = client.post(ROUTE, content=b" " * (MAX_BODY_BYTES + 1), headers=JSON)
        assert_raw_error(response.status_code, response.content, 413)
        assert client.post(ROUTE, json=VALID).status_code == 200


def test_a_chunked_body_that_grows_past_the_limit_is_refused(serving):
    def growing():
        yield b'{"messages": [' + b'{"role": "user", "content": "hi"}, ' * 1000
        for _ in range(2 * MAX_BODY_BYTES // 65536):
            yield b" " * 65536

    with httpx.Client(base_url=serving.url, timeout=PROMPT_S) as client:
        response = client.post(ROUTE, content=growing(), headers=JSON)
        assert "content-length" not in response.request.headers  # sent chunked, its size unknown in advance
        assert_raw_error(response.status_code, response.content, 413)
        assert client.post(ROUTE, json=VALID).status_code == 200


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"{", b'{"messages": [}', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"null", b"[]", b'"x"', b"1e999",
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5_000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": NaN}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}], "max_tokens": 1}',
], ids=["unclosed", "empty", "brace", "bad-array", "utf16-bom", "utf8-bom-object", "null", "array", "string",
        "huge-float", "nested-messages", "nested-lists", "nested-objects", "5000-digit-seed", "nan-n",
        "lone-surrogate", "lone-surrogate-part"])
def test_malformed_and_deeply_nested_json_gets_a_400(serving, body):
    response = httpx.post(serving.url + ROUTE, content=body, headers=JSON, timeout=PROMPT_S)
    assert response.status_code == 400, response.text[:500]
    assert_error(response)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml", "image/png",
                                          "application/json; charset=utf-16", "*/*"])
def test_wrong_content_types_get_a_4xx_or_are_read_as_json(serving, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    for body in [json.dumps(VALID).encode(), b"messages=hi", b"<messages/>", b"\x89PNG\r\n\x1a\n"]:
        response = httpx.post(serving.url + ROUTE, content=body, headers=headers, timeout=PROMPT_S)
        assert_answer(response, VALID)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 10 ** 30), ("max_tokens", 2 ** 63), ("max_completion_tokens", 2 ** 31), ("n", 10 ** 30),
    ("n", MAX_N + 1), ("n", -1), ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("top_logprobs", 10 ** 9),
    ("temperature", 1e308), ("top_p", 1e-400), ("max_tokens", 1.0), ("n", True)])
def test_huge_numbers_get_a_400(serving, field, value):
    response = httpx.post(serving.url + ROUTE, content=encode({**VALID, field: value, "logprobs": True}),
                          headers=JSON, timeout=PROMPT_S)
    assert response.status_code == 400, response.text
    assert_error(response)
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-7])
def test_a_vanishing_temperature_is_answered_greedily(serving, temperature):
    """The hypothesis run's find: a positive temperature that is 0.0 (or overflows the logits) in float32 made every
    log-prob NaN and the response unencodable (500). It is served as greedy: the greedy reply, finite log-probs."""
    request = {**VALID, "logprobs": True, "top_logprobs": 2}
    tiny = httpx.post(serving.url + ROUTE, json={**request, "temperature": temperature}, timeout=PROMPT_S)
    greedy = httpx.post(serving.url + ROUTE, json=request, timeout=PROMPT_S)
    assert tiny.status_code == 200, tiny.text
    assert_completion(tiny.json(), request)
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
    assert tiny.json()["choices"][0]["logprobs"] == greedy.json()["choices"][0]["logprobs"]


def answered_meanwhile(server, seconds: float) -> int:
    """Valid requests answered, each promptly, over `seconds`."""
    answered, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        response = httpx.post(server.url + ROUTE, json=VALID, timeout=PROMPT_S)
        assert response.status_code == 200 and time.monotonic() - start < PROMPT_S / 2
        answered += 1
    return answered


def test_a_stalled_body_is_cut_off_and_others_are_answered_meanwhile(serving):
    with connect(serving) as stalled:
        stalled.sendall(head(1000) + b'{"messages": [{"role": "us')
        started = time.monotonic()
        assert answered_meanwhile(serving, BODY_TIMEOUT_S / 2) >= 1
        status, headers, body = read_response(stalled, timeout=BODY_TIMEOUT_S + PROMPT_S)
        assert BODY_TIMEOUT_S - 0.5 <= time.monotonic() - started
        assert_raw_error(status, body, 408)
        assert headers["connection"] == "close" and stalled.recv(1) == b""  # and the connection is closed


def test_a_stalled_chunked_body_and_a_stalled_request_head_do_not_stop_others(serving):
    """uvicorn never times out a request head (nor a connection that sends nothing): those two stay open until
    they close, but the event loop serves everyone else meanwhile."""
    with connect(serving) as chunked, connect(serving) as half_head, connect(serving):
        chunked.sendall(head() + b"10\r\n" + b'{"messages": [{"')
        half_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: te")
        assert answered_meanwhile(serving, 1.0) >= 1
        status, _, body = read_response(chunked, timeout=BODY_TIMEOUT_S + PROMPT_S)
        assert_raw_error(status, body, 408)
        assert answered_meanwhile(serving, 0.5) >= 1


def test_many_connections_dropped_mid_request(serving):
    whole = head(len(encode(VALID))) + encode(VALID)
    cuts = [0, 5, 20, len(head(0)) - 2, len(head(0)) + 3, len(whole) - 1, len(whole)]
    sockets = []
    for i in range(120):
        sock = connect(serving)
        sock.sendall(whole[:cuts[i % len(cuts)]] if i % 11 else b"\x16\x03\x01 not http at all\r\n\r\n")
        sockets.append(sock)
    # While they are all open (and some of them are being answered), another client is served.
    assert answered_meanwhile(serving, 0.5) >= 1
    for i, sock in enumerate(sockets):
        if i % 2:
            reset(sock)
        else:
            sock.close()


def test_clients_that_leave_while_their_request_is_queued_or_decoded(serving):
    """Costly requests (n = 16, sampled) whose clients close or reset their connection once they have sent them, or
    leave a stream after its first bytes: the batcher answers the rest, and the next request, as usual; requests
    whose clients left while they waited behind the others are withdrawn, never computed."""
    batcher = serving.served.batcher
    rows_before, abandoned_before = batcher.rows_served, batcher.rows_abandoned
    costly = encode({**VALID, "n": MAX_N, "temperature": 1.0, "seed": 3})
    for i in range(12):
        sock = connect(serving)
        sock.sendall(head(len(costly)) + costly)
        time.sleep(0.02 * (i % 4))  # some leave while queued, some while their batch is on the device
        if i % 2:
            reset(sock)
        else:
            sock.close()
    stream = encode({**VALID, "n": MAX_N, "stream": True, "max_tokens": 3})
    with connect(serving) as sock:
        sock.sendall(head(len(stream)) + stream)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    # Concurrent valid requests from other clients while the batcher works through what the others left.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: answered_meanwhile(serving, 0.1), range(4), timeout=2 * PROMPT_S))
    assert batcher.rows_served > rows_before
    assert batcher.rows_abandoned > abandoned_before and batcher.pending_rows == 0
