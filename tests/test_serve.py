"""The OpenAI-compatible server on a live loopback socket: routes, SOP-masked strategies, stage tracking,
log-probs, `n`, seeds, errors; and the G-Eval endpoint judge scoring through it.

The workdir is a tiny untrained run (components built, initial state checkpointed with save_checkpoint): serving needs a
run's files, not a good model.
"""
import json
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.metrics import geval
from gopo_jax.serve import make_server


def build_workdir(path):
    from configs import mgshop
    from gopo_jax.train import checkpoint
    from gopo_jax.train.build import build
    from gopo_jax.train.metrics_log import save_config
    from gopo_jax.train.state import create_train_state

    c = mgshop.get_config()
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    components = build(c, path)
    params = components.init_params(c.seed)
    state = create_train_state(params, components.tx, extras={"mu": jnp.float32(0.0)}, rng=jax.random.key(1))
    save_config(path, c)
    payload = {"state": state, "ref": params, "iteration": np.int64(3)}
    checkpoint.save_checkpoint(path / "checkpoints", 3, payload, metadata=components.fingerprint())
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = make_server(build_workdir(tmp_path_factory.mktemp("served")), "127.0.0.1", 0, model_name="tiny-gopo")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, path):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def call(srv, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url(srv, path), data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


OPENING = [{"role": "system", "content": "welcome to shopwise promo yes"},
           {"role": "user", "content": "hi i need some help"}]


def test_health_and_models(server):
    assert call(server, "/health") == (200, {"status": "ok", "model": "tiny-gopo", "iteration": 3})
    status, body = call(server, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-gopo"]


def test_opening_turn_is_sop_masked_and_greedy_logprobs_are_the_top(server):
    sop = server.served.sop
    allowed = [k for k, ok in zip(sop.strategies, sop.allowed[sop.initial]) if ok]
    status, body = call(server, "/v1/chat/completions", dict(model="tiny-gopo", messages=OPENING, temperature=0,
                                                             max_tokens=4, n=2, logprobs=True, top_logprobs=3))
    assert status == 200, body
    assert body["gopo"]["stage"] == sop.stages[sop.initial] and body["gopo"]["allowed"] == allowed
    assert len(body["choices"]) == 2
    for choice in body["choices"]:
        assert choice["gopo"]["strategy"] in allowed  # disallowed strategies have probability 0
        entries = choice["logprobs"]["content"]
        assert 1 <= len(entries) <= 4 and len(entries) == body["usage"]["completion_tokens"] // 2
        for e in entries:  # greedy: the emitted token is the most likely one, with the same log-prob
            assert len(e["top_logprobs"]) == 3
            assert e["token"] == e["top_logprobs"][0]["token"]
            assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"], abs=1e-5)
            tops = [t["logprob"] for t in e["top_logprobs"]]
            assert tops == sorted(tops, reverse=True) and tops[0] <= 0.0
    # Greedy decoding is deterministic: both choices agree.
    assert body["choices"][0]["message"] == body["choices"][1]["message"]


def test_stage_is_tracked_through_realised_assistant_turns(server):
    sop = server.served.sop
    greet = sop.strategies.index("greet")
    expected = sop.stages[int(sop.transition[sop.initial, greet])]
    assert expected != sop.stages[sop.initial]
    messages = OPENING + [{"role": "assistant", "content": "hello and welcome to shopwise how can i help you today"},
                          {"role": "user", "content": "hi thanks i am shopping today"}]
    status, body = call(server, "/v1/chat/completions", dict(messages=messages, max_tokens=2, seed=0))
    assert status == 200 and body["gopo"]["stage"] == expected
    # An explicit stage wins.
    status, body = call(server, "/v1/chat/completions", dict(messages=messages, max_tokens=2, seed=0,
                                                             gopo_stage=sop.stages[sop.initial]))
    assert body["gopo"]["stage"] == sop.stages[sop.initial]


def test_seed_reproduces_a_sampled_completion(server):
    req = dict(messages=OPENING, max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    a, b = call(server, "/v1/chat/completions", req)[1], call(server, "/v1/chat/completions", req)[1]
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


@pytest.mark.parametrize("body,status,param", [
    (dict(model="other", messages=OPENING), 404, "model"),
    (dict(messages=OPENING, stream=True), 400, "stream"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0]"),
    (dict(messages=OPENING, temperature=3), 400, "temperature"),
    (dict(messages=OPENING, n=0), 400, "n"),
    (dict(messages=OPENING, gopo_stage="nowhere"), 400, "gopo_stage"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, param):
    got, reply = call(server, "/v1/chat/completions", body)
    assert got == status and reply["error"]["param"] == param and reply["error"]["message"]


def test_bad_json_and_unknown_routes(server):
    assert call(server, "/v1/chat/completions", raw=b"{not json")[0] == 400
    assert call(server, "/v1/nothing")[0] == 404
    assert call(server, "/v1/chat/completions")[0] == 405


def test_endpoint_judge_reads_the_served_score_distribution(server):
    """The judge's G-Eval score equals Σ p(s)·s computed from the served CS's own next-token distribution."""
    served = server.served
    judge = geval.EndpointJudge(url(server, ""), "tiny-gopo", top_logprobs=served.vocab_size)
    sample = geval.Sample(context="customer: hi", response="hello", strategy="greet")
    prompt = geval.build_prompt("fluency", sample)
    [score] = judge.score_prompts([prompt])

    ids, stage = served.encode_messages([{"role": "user", "content": prompt}])
    logits = served._expert_logits(served.params["expert"], jnp.asarray([ids]), jnp.ones((1, len(ids)), bool))
    allowed = jnp.asarray(served.sop.allowed[stage])
    k = int(jnp.argmax(jnp.where(allowed, logits, -jnp.inf)))
    tokens = jnp.asarray([ids + [served.vocab.strategy_ids[k]]])
    last, _, _ = served._cs_prefill(served.params["cs"], tokens, jnp.ones(tokens.shape, bool),
                                    cache_len=tokens.shape[1] + 1)
    expected, _ = geval.score_from_logits(last[0], jnp.asarray(geval.score_token_ids(served.tokenizer)))
    assert score == pytest.approx(float(expected), abs=1e-4)
    assert 1.0 <= score <= 5.0
    result = geval.geval(judge, [sample], criteria=("fluency", "coherence"))
    assert result.available and set(result.scores) == {"fluency", "coherence"}
    assert np.isfinite(list(result.scores.values())).all()
