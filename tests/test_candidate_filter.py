"""The deployment-time n-candidate filter (GOPO.md §1): the CS drafts n replies and keeps the first aligned, SOP-valid
one, else the most likely.

* the selection itself (`ModelAgents._filter`) on hand-made candidates and a hand-made R: first passing candidate,
  fallback to the largest summed log-prob, the kept candidate's own cache rows, no rescue for ended dialogues;
* a tiny synthetic-shop evaluation rollout: n = 1 records no filter; with n = 4 every rescued turn is one the world
  (re-realising the kept reply) finds aligned and SOP-valid, the first turn keeps the greedy reply wherever it
  passed, and alignment is >= n = 1's on the same keys;
* the server: `gopo_n_candidates` within 1..max_candidates is answered, anything else is a 400.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig, TurnInput
from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.models.qwen3 import KVCache
from tests.helpers import checkpointed_run, tiny_run_config


def _first_token_realise(reply, reply_valid):
    """R of the unit test: a reply whose first id is 100 + k realises strategy k; anything else is unrecognised."""
    return jnp.where(reply_valid[0] & (reply[0] >= 100), reply[0] - 100, UNRECOGNISED).astype(jnp.int32)


def _candidates(first_ids, logp, b, lr, offset):
    """(reply, logp, lengths, cache) of len(first_ids) rows; cache row r holds offset + r so a row can be traced."""
    rows = len(first_ids)
    reply = jnp.full((rows, lr), 7, jnp.int32).at[:, 0].set(jnp.asarray(first_ids))
    logps = jnp.zeros((rows, lr), jnp.float32).at[:, 0].set(jnp.asarray(logp, jnp.float32))
    kv = jnp.broadcast_to((offset + jnp.arange(rows, dtype=jnp.float32))[None, :, None, None, None], (1, rows, 3, 1, 1))
    cache = KVCache(k=kv, v=-kv, valid=jnp.ones((rows, 3), bool), index=jnp.int32(3))
    return reply, logps, jnp.full((rows,), 2, jnp.int32), cache


def test_filter_keeps_first_passing_else_most_likely(tiny_world):
    world = tiny_world[0]
    lr, b = world.layout.reply_len, 4
    agents = ModelAgents(None, None, world.vocab, world.layout, SamplingConfig(n_candidates=3),
                         realise=_first_token_realise)
    strategy = jnp.asarray([0, 1, 2, 0])
    allowed = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]], bool)
    allowed = jnp.pad(allowed, ((0, 0), (0, world.spec.num_strategies - 3)))
    inp = TurnInput(customer=None, customer_valid=None, header=None, header_valid=None, allowed=allowed,
                    active=jnp.asarray([True, True, True, False]), env_state=None)
    # row 0: candidate 0 passes; row 1: 0 misaligned, 1 disallowed... 2 passes; row 2: k_t itself is disallowed, so
    # nothing passes and the most likely (candidate 1) is kept; row 3: ended (candidate 2 passes, no rescue recorded).
    first = _candidates([100, 100, 102, 101], [-1.0, -1.0, -5.0, -1.0], b, lr, 0)
    more = _candidates([101, 102, 101, 102, 101, 101, 102, 100],
                       [-1.0, -1.0, -0.5, -1.0, -1.0, -1.0, -9.0, -1.0], b, lr, 10)
    reply, _, _, cache, rescued = agents._filter(first, more, strategy, inp)
    kept = np.asarray([0, 2, 1, 2])
    np.testing.assert_array_equal(np.asarray(reply[:, 0]), [100, 101, 101, 100])
    expected_row = np.where(kept == 0, np.arange(b), 10 + (kept - 1) * b + np.arange(b))
    np.testing.assert_array_equal(np.asarray(cache.k[0, :, 0, 0, 0]), expected_row)
    np.testing.assert_array_equal(np.asarray(rescued), [False, True, False, False])
    assert int(cache.index) == 3


def _eval_rollout(world, ge, gc, params, n, episodes=8):
    sampling = SamplingConfig(temperature=0.0, expert_greedy=True, n_candidates=n, candidate_temperature=1.0)
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, sampling))
    return jax.device_get(rollout(params, world.episodes(jax.random.key(3), episodes), jax.random.key(4)))


def test_filter_in_the_evaluation_rollout(tiny_world):
    world, ge, gc, params = tiny_world
    base = _eval_rollout(world, ge, gc, params, 1)
    filtered = _eval_rollout(world, ge, gc, params, 4)
    assert base.filter_rescued is None
    rescued = filtered.filter_rescued > 0
    assert rescued.any(), "the tiny model's filter never rescued a turn: the test checks nothing"
    # The world re-realises the kept reply in its step: a rescued turn is aligned and SOP-valid there.
    assert np.all(filtered.aligned[rescued] == 1) and np.all(filtered.sop_valid[rescued] == 1)
    # Turn 0 has the same inputs in both: where the greedy reply passed, it is the reply kept.
    passed = (base.aligned[:, 0] == 1) & (base.sop_valid[:, 0] == 1)
    start = world.layout.reply_start(0)
    span = slice(start, start + world.layout.reply_len)
    np.testing.assert_array_equal(filtered.tokens[passed, span], base.tokens[passed, span])
    assert np.all(filtered.aligned[:, 0] >= base.aligned[:, 0])
    mean = lambda t: float((t.aligned * t.turn_mask).sum() / t.turn_mask.sum())
    assert mean(filtered) >= mean(base)


def test_bad_n_candidates_is_a_config_error():
    from gopo_jax.train.build import validate_config  # noqa: PLC0415

    for bad in (0, -1):
        c = tiny_run_config()
        c.unlock()
        c.eval.n_candidates = bad
        with pytest.raises(ValueError, match="eval.n_candidates"):
            validate_config(c)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gopo_jax.export import load_run  # noqa: PLC0415
    from gopo_jax.serve.api import ServedAPI  # noqa: PLC0415
    from gopo_jax.serve.engine import Engine  # noqa: PLC0415

    run = load_run(checkpointed_run(tiny_run_config(), tmp_path_factory.mktemp("served")), None)
    return ServedAPI(Engine(run, batch_buckets=(1,), max_candidates=2), model_name="tiny")


def test_server_accepts_n_candidates_within_its_maximum(served):
    from gopo_jax.serve.api import APIError, ChatRequest  # noqa: PLC0415

    messages = [{"role": "user", "content": "hi i need some help"}]
    for bad in (0, 3):
        with pytest.raises(APIError, match="gopo_n_candidates") as err:
            served.sampling(ChatRequest(messages=messages, temperature=0.0, gopo_n_candidates=bad))
        assert err.value.status == 400
    sampling, _ = served.sampling(ChatRequest(messages=messages, temperature=0.0, gopo_n_candidates=2))
    assert sampling.n_candidates == 2
    assert served.sampling(ChatRequest(messages=messages, temperature=0.0))[0].n_candidates == 1
    conversation = served.engine.encode(messages)
    (reply,) = served.engine.answer([conversation], sampling, jax.random.key(0))
    assert reply.strategy is not None and reply.realised is not None
    assert dataclasses.replace(sampling, n_candidates=1) != sampling  # equal settings only share a device batch
