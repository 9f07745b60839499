"""The OpenAI-compatible server on a live loopback socket, through the official `openai` SDK: SOP-masked strategies,
stage tracking, log-probs, `n`, seeds, streaming, micro-batching, API keys, errors; and a replay of held-out
evaluation dialogues that must give exactly the evaluation rollout's strategies and replies.

Most tests serve a tiny untrained run (serving needs a run's files, not a good model); the replay test trains one
briefly, because an untrained CS writes no words to replay.
"""
import concurrent.futures
import json

import httpx
import jax
import numpy as np
import openai
import pytest

from gopo_jax.serve import build_api, start_server
from gopo_jax.serve.engine import Sampling
from tests.helpers import checkpointed_run, tiny_run_config

OPENING = [{"role": "system", "content": "welcome to shopwise promo yes"},
           {"role": "user", "content": "hi i need some help"}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return checkpointed_run(tiny_run_config(), tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(workdir):
    served = build_api(workdir, model_name="tiny-gopo", batch_buckets=[1, 4], max_wait_s=0.05)
    running = start_server(served)
    running.served = served
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def raw(server, method, path, **kwargs):
    response = httpx.request(method, server.url + path, timeout=120, **kwargs)
    return response.status_code, response.json()


def test_health_models_and_the_default_context(server, client):
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "model": "tiny-gopo", "iteration": 0})
    [model] = client.models.list().data
    assert model.id == "tiny-gopo"
    assert model.gopo["default_context"] == server.served.engine.default_context_text() != ""
    # Without a system message the run's default business context is used, and the response says so.
    reply = client.chat.completions.create(model="tiny-gopo", messages=OPENING[1:], temperature=0, max_tokens=3)
    assert reply.gopo["default_context"] is True


def test_opening_turn_is_sop_masked_and_greedy_logprobs_are_the_top(server, client):
    sop = server.served.engine.sop
    allowed = [k for k, ok in zip(sop.strategies, sop.allowed[sop.initial]) if ok]
    body = client.chat.completions.create(model="tiny-gopo", messages=OPENING, temperature=0, max_tokens=4, n=2,
                                          logprobs=True, top_logprobs=3)
    assert body.gopo["stage"] == sop.stages[sop.initial] and body.gopo["allowed"] == allowed
    assert body.gopo["default_context"] is False
    assert len(body.choices) == 2
    for choice in body.choices:
        assert choice.gopo["strategy"] in allowed  # disallowed strategies have probability 0
        entries = choice.logprobs.content
        assert 1 <= len(entries) <= 4 and len(entries) == body.usage.completion_tokens // 2
        for e in entries:  # greedy: the emitted token is the most likely one, with the same log-prob
            assert len(e.top_logprobs) == 3
            assert e.token == e.top_logprobs[0].token
            assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)  # two passes, two roundings
            tops = [t.logprob for t in e.top_logprobs]
            assert tops == sorted(tops, reverse=True) and tops[0] <= 0.0
    # Greedy decoding is deterministic: both choices agree.
    assert body.choices[0].message.content == body.choices[1].message.content


def test_alternatives_are_read_at_the_slot_each_token_was_drawn_at(server):
    """Every written token's log-prob is the one it was drawn with (finite, <= 0), and its alternatives are those of
    its own slot: in a nucleus of one token (top_p 1e-6) the single alternative is the written token at log-prob 0;
    without a filter, a written token among its alternatives has its own log-prob there. (The alternatives were once
    read one slot early, each token's from the previous token's distribution: a written token's log-prob was off by
    up to 0.6 nats, and at top_p 1e-6 -inf, a 500, for a reply whose tokens were not all the same. This untrained
    model repeats one token under a nucleus of one, so here the unfiltered half is the one that catches it.)"""
    engine = server.served.engine
    texts = ["hi i need some help", "where is my order", "i want a discount on shoes", "refund please", "ok thanks",
             "do you ship to france", "the price is too high", "yes"]
    conversations = [engine.encode([OPENING[0], {"role": "user", "content": t}]) for t in texts]
    nucleus = engine.answer(conversations, Sampling(temperature=1.0, top_p=1e-6, top_logprobs=3), jax.random.key(1))
    # 4 draws per conversation: at T 1 this near-uniform model lists ~3% of drawn tokens among their top 20 (14 of
    # 435 on the machine this was written on), so `found` is not left to one CPU's rounding of a handful of tokens.
    sampled = engine.answer(conversations * 4, Sampling(temperature=1.0, top_logprobs=20), jax.random.key(2))
    for reply in nucleus:
        for token, logprob, alternatives in zip(reply.token_ids, reply.token_logprobs, reply.top_logprobs):
            assert alternatives[0][0] == token and logprob == pytest.approx(0.0, abs=1e-6)
            assert alternatives[0][1] == pytest.approx(0.0, abs=1e-6) and alternatives[1][1] == -np.inf
    found = 0
    for reply in sampled:
        for token, logprob, alternatives in zip(reply.token_ids, reply.token_logprobs, reply.top_logprobs):
            assert np.isfinite(logprob) and logprob <= 0.0
            listed = dict(alternatives)
            if token in listed:
                found += 1
                assert listed[token] == pytest.approx(logprob, abs=1e-5)
    assert found >= 5


def test_stage_is_tracked_through_realised_assistant_turns(client, server):
    sop = server.served.engine.sop
    greet = sop.strategies.index("greet")
    expected = sop.stages[int(sop.transition[sop.initial, greet])]
    assert expected != sop.stages[sop.initial]
    messages = OPENING + [{"role": "assistant", "content": "hello and welcome to shopwise how can i help you today"},
                          {"role": "user", "content": "hi thanks i am shopping today"}]
    body = client.chat.completions.create(model="tiny-gopo", messages=messages, max_tokens=2, seed=0)
    assert body.gopo["stage"] == expected
    # An explicit stage wins.
    body = client.chat.completions.create(model="tiny-gopo", messages=messages, max_tokens=2, seed=0,
                                          extra_body={"gopo_stage": sop.stages[sop.initial]})
    assert body.gopo["stage"] == sop.stages[sop.initial]


def test_seed_reproduces_a_sampled_completion(client):
    def draw():
        return client.chat.completions.create(model="tiny-gopo", messages=OPENING, temperature=1.0, top_p=0.9,
                                              seed=7, n=3).choices

    a, b = draw(), draw()
    assert [c.message.content for c in a] == [c.message.content for c in b]
    assert [c.gopo["strategy"] for c in a] == [c.gopo["strategy"] for c in b]


def test_streaming_sends_the_completion_token_by_token(client):
    whole = client.chat.completions.create(model="tiny-gopo", messages=OPENING, temperature=0)
    stream = client.chat.completions.create(model="tiny-gopo", messages=OPENING, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) >= 2 or len(whole.choices[0].message.content.split()) <= 1
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [whole.choices[0].finish_reason]
    assert finish[0].choices[0].gopo["strategy"] == whole.choices[0].gopo["strategy"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_share_device_batches_and_answer_as_alone(server, client):
    """Eight greedy conversations at once: fewer device calls than requests, and each reply is the one it gets
    alone."""
    conversations = [[OPENING[0], {"role": "user", "content": f"hi i want item {i} please"}] for i in range(8)]

    def ask(messages):
        reply = client.chat.completions.create(model="tiny-gopo", messages=messages, temperature=0)
        return reply.choices[0].message.content, reply.choices[0].gopo["strategy"]

    alone = [ask(m) for m in conversations]
    batcher = server.served.batcher
    batches_before, rows_before = batcher.device_calls, batcher.rows_served
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, conversations))
    assert together == alone
    assert batcher.rows_served - rows_before == 8 and batcher.device_calls - batches_before < 8


@pytest.mark.parametrize("body,status,param", [
    (dict(model="other", messages=OPENING), 404, "model"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role"),
    (dict(messages=OPENING, temperature=3), 400, "temperature"),
    (dict(messages=OPENING, n=0), 400, "n"),
    (dict(messages=OPENING, n="2"), 400, "n"),
    (dict(messages=OPENING, max_tokens=10_000), 400, "max_tokens"),
    (dict(messages=OPENING, logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (dict(messages=OPENING, gopo_stage="nowhere"), 400, "gopo_stage"),
    (dict(messages=OPENING + [{"role": "user", "content": "again"}]), 400, "messages"),
    (dict(messages=OPENING, tools=[{"type": "function"}]), 400, "tools"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, param):
    got, reply = raw(server, "POST", "/v1/chat/completions", json=body)
    assert got == status and reply["error"]["param"] == param and reply["error"]["message"]


def test_bad_json_oversized_bodies_and_unknown_routes(server):
    status, body = raw(server, "POST", "/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert raw(server, "POST", "/v1/chat/completions", content=b" " * (2 << 20))[0] == 413
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    # ... and the server still answers.
    assert raw(server, "POST", "/v1/chat/completions", json=dict(messages=OPENING, max_tokens=2))[0] == 200


def test_an_api_key_is_required_when_set(workdir):
    served = build_api(workdir, model_name="keyed", api_key="s3cret", batch_buckets=[1], warmup=False)
    running = start_server(served)
    try:
        denied = openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.chat.completions.create(model="keyed", messages=OPENING, max_tokens=2)
        allowed = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert allowed.chat.completions.create(model="keyed", messages=OPENING, max_tokens=2).choices
        assert httpx.get(running.url + "/health").status_code == 200  # liveness needs no key
    finally:
        running.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run after a short SFT: its CS writes the shop's words and ends its turns."""
    from gopo_jax.train.driver import train_run

    c = tiny_run_config()
    c.unlock()
    c.model.hidden_size, c.model.intermediate_size = 64, 128
    c.sft.steps, c.sft.episodes, c.sft.batch_size = 150, 128, 16
    c.train.steps, c.train.groups, c.train.group_size = 1, 4, 2
    c.train.eval_every = c.train.checkpoint_every = 1
    c.eval.episodes = 16
    c.lock()
    workdir = tmp_path_factory.mktemp("trained")
    train_run(c, workdir)
    return workdir


@pytest.mark.slow
def test_replayed_evaluation_dialogues_get_the_evaluation_rollouts_turns(trained):
    """Every turn of held-out dialogues, sent as a chat request with the dialogue so far (greedy), gets exactly the
    strategy and the reply of the evaluation rollout; the request's slots are the rollout's ids."""
    served = build_api(trained, batch_buckets=[1, 4], warmup=False)
    engine = served.engine
    run, layout, world = engine.run, engine.layout, engine.world
    traj = jax.device_get(run.components.eval_rollout(run.params, run.components.eval_episodes()[:4],
                                                      jax.random.key(0)))
    running = start_server(served)
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=300)

    def content(start, length, role):
        ids, valid = traj.tokens[i, start:start + length], traj.valid[i, start:start + length]
        return world.chat_format.content_text(world.tokenizer, ids[valid], role)

    def ask(messages):
        return client.chat.completions.create(model=served.model_name, messages=messages, temperature=0)

    compared, words = 0, 0
    try:
        for i in range(4):
            messages = [{"role": "system", "content": content(0, layout.context_len, "system")}]
            turns = []
            for t in range(int(traj.turn_mask[i].sum())):
                reply_at = layout.reply_start(t)
                reply = engine.codec.reply_text(traj.tokens[i, reply_at:reply_at + layout.reply_len],
                                                traj.valid[i, reply_at:reply_at + layout.reply_len])
                messages.append({"role": "user", "content": content(layout.turn_start(t), layout.customer_len,
                                                                     "user")})
                conversation = engine.encode(messages)
                np.testing.assert_array_equal(conversation.customer, traj.tokens[
                    i, layout.turn_start(t):layout.turn_start(t) + layout.customer_len])
                strategy = engine.sop.strategies[int(traj.strategy[i, t])]
                turns.append((list(messages), strategy, reply))
                messages.append({"role": "assistant", "content": reply, "gopo": {"strategy": strategy}})
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, [m for m, _, _ in turns]))
            for (_, strategy, reply), answer in zip(turns, answers):
                assert (answer.choices[0].gopo["strategy"], answer.choices[0].message.content) == (strategy, reply)
                compared += 1
                words += len(reply.split())
    finally:
        running.stop()
    assert compared >= 8 and words >= 2 * compared  # real replies, not empty turns


def test_engine_rejects_what_the_layout_cannot_hold(server):
    engine = server.served.engine
    too_long = [OPENING[0]] + [{"role": r, "content": "hi"} for r in ["user", "assistant"] * engine.layout.max_turns]
    with pytest.raises(ValueError, match="at most"):
        engine.encode(too_long + [{"role": "user", "content": "hi"}])
    replies = engine.answer([engine.encode(OPENING)] * 5, Sampling(temperature=0.0), jax.random.key(0))
    assert len(replies) == 5 and len({r.token_ids for r in replies}) == 1  # past the largest bucket: two calls
    assert json.dumps(server.served.models())  # the models listing is plain JSON
