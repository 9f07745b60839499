"""ChatClient and PromptedAgent against the project's own server (live loopback), plus the retry rules."""
import http.server
import json
import threading

import numpy as np
import pytest

from gopo_jax.clients.openai_chat import ChatClient, ChatClientError, PromptedAgent, parse_answer
from gopo_jax.dialogue.env_protocol import HostObs
from gopo_jax.dialogue.sop import UNRECOGNISED
from test_serve import OPENING, server  # noqa: F401  (the live server fixture)


def client_for(srv, **kw):
    return ChatClient(f"http://127.0.0.1:{srv.server_address[1]}", "tiny-gopo", **kw)


def test_chat_against_the_server(server):  # noqa: F811
    client = client_for(server)
    assert client.models() == ["tiny-gopo"]
    response = client.chat(OPENING, temperature=0, max_tokens=3)
    assert response["object"] == "chat.completion" and response["choices"][0]["gopo"]["strategy"] == "greet"
    assert isinstance(client.complete_text(OPENING, max_tokens=3, seed=1), str)


def test_client_errors_are_clear_and_4xx_is_not_retried(server):  # noqa: F811
    client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}", "no-such-model", max_retries=3, backoff=0)
    with pytest.raises(ChatClientError, match="HTTP 404.*not served here") as err:
        client.chat(OPENING)
    assert err.value.status == 404 and client.attempts == 1


def test_connection_errors_are_retried_then_reported(monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff=0.0, timeout=2)
    with pytest.raises(ChatClientError, match="after 3 attempts"):
        client.chat([{"role": "user", "content": "hi"}])
    assert client.attempts == 3


def test_503_is_retried_with_backoff_until_success(monkeypatch):
    """A flaky front (two 503 answers with Retry-After: 0) before a good answer: three attempts, one result."""
    answers = [503, 503, 200]

    class Flaky(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            code = answers.pop(0)
            body = json.dumps({"choices": [{"message": {"content": "ok"}}]} if code == 200 else
                              {"error": {"message": "busy"}}).encode()
            self.send_response(code)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = ChatClient(f"http://127.0.0.1:{srv.server_address[1]}", "m", max_retries=3, backoff=5.0)
        assert client.complete_text([{"role": "user", "content": "hi"}]) == "ok"
        assert client.attempts == 3  # Retry-After: 0 overrode the 5 s backoff
    finally:
        srv.shutdown()
        srv.server_close()


def test_parse_answer():
    names = ("greet", "recommend")
    assert parse_answer("STRATEGY: recommend\nREPLY: try the red one", names) == (1, "try the red one")
    assert parse_answer("STRATEGY: dance\nREPLY: hi", names) == (UNRECOGNISED, "hi")
    assert parse_answer("just text", names) == (UNRECOGNISED, "just text")


def test_prompted_agent_acts_through_the_server(server):  # noqa: F811
    served = server.served
    sop = served.sop
    agent = PromptedAgent(client_for(server), sop, served.world.spec.strategy_descriptions, max_tokens=4)
    obs = HostObs(context="welcome to shopwise promo yes", customer="hi i need some help", stage=sop.initial,
                  allowed=np.asarray(sop.allowed[sop.initial]), done=False)
    prompt = agent.system_prompt(obs.stage, obs.allowed, obs.context)
    allowed = [k for k, ok in zip(sop.strategies, obs.allowed) if ok]
    assert f"Allowed strategies now: {', '.join(allowed)}." in prompt and "welcome to shopwise" in prompt
    assert all(k in prompt for k in sop.strategies)
    strategy, reply = agent.act(obs)
    # The tiny untrained server writes no "STRATEGY:" line: the agent must say so rather than invent one.
    assert strategy == UNRECOGNISED and isinstance(reply, str)
    assert [m["role"] for m in agent.history] == ["user", "assistant"]
