"""Tests for gopo_jax.sampling: filters, greedy/top-k, stop handling, log-prob consistency, compile counts."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax import sampling
from gopo_jax.models import heads, qwen3

TINY = qwen3.get_config("tiny")
PAD = 0


@pytest.fixture(scope="module")
def model():
    return qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))


def _prompt():
    # Row 0: pad block in the middle; row 1: leading pads; row 2: no pads.
    tokens = np.array([[11, 12, 0, 0, 13, 14], [0, 0, 21, 22, 23, 24], [31, 32, 33, 34, 35, 36]], np.int32)
    valid = tokens != 0
    return jnp.asarray(tokens), jnp.asarray(valid)


class FilterLogitsTest(chex.TestCase):

    @chex.all_variants
    def test_top_p_by_hand(self):
        # probs 0.5, 0.25, 0.15, 0.1: mass above = 0, .5, .75, .9.
        logits = jnp.log(jnp.array([[0.15, 0.5, 0.1, 0.25]]))
        f = self.variant(lambda x: heads.filter_logits(x, top_p=0.7))
        np.testing.assert_array_equal(np.isfinite(f(logits)), [[False, True, False, True]])
        f = self.variant(lambda x: heads.filter_logits(x, top_p=0.8))
        np.testing.assert_array_equal(np.isfinite(f(logits)), [[True, True, False, True]])
        f = self.variant(lambda x: heads.filter_logits(x, top_p=0.3))  # the top token is always kept
        np.testing.assert_array_equal(np.isfinite(f(logits)), [[False, True, False, False]])

    def test_a_traced_top_p_filters_as_the_same_static_one(self):
        # A server passes each request's top_p into one compiled program.
        logits = jax.random.normal(jax.random.key(3), (4, 50)) * 3
        traced = jax.jit(lambda x, p: heads.filter_logits(x, top_p=p))
        for p in (0.05, 0.3, 0.7, 0.95):
            np.testing.assert_array_equal(np.asarray(traced(logits, jnp.float32(p))),
                                          np.asarray(heads.filter_logits(logits, top_p=p)))

    @chex.all_variants
    def test_top_k_by_hand(self):
        logits = jnp.array([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 6.0]])
        out = self.variant(lambda x: heads.filter_logits(x, top_k=2))(logits)
        np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, False], [False, False, True, True]])
        np.testing.assert_array_equal(np.asarray(out)[np.isfinite(out)], [4.0, 3.0, 5.0, 6.0])

    @chex.all_variants
    def test_sample_token(self):
        logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 0.0]])
        policy = np.asarray(jax.nn.log_softmax(logits))
        ids, lp = self.variant(lambda k, x: sampling.sample_token(k, x, temperature=0.0))(jax.random.key(0), logits)
        np.testing.assert_array_equal(ids, [1, 0])
        np.testing.assert_allclose(lp, policy[[0, 1], [1, 0]], rtol=1e-6)
        # top_k=1 is greedy at any temperature; the log-prob is that of the distribution sampled from (one token).
        ids, lp = self.variant(lambda k, x: sampling.sample_token(k, x, temperature=2.0, top_k=1))(
            jax.random.key(1), logits)
        np.testing.assert_array_equal(ids, [1, 0])
        np.testing.assert_allclose(lp, [0.0, 0.0], atol=1e-6)
        # top_p keeping only {0, 2} in row 1 (probs ~.72, .27): the sample never leaves the nucleus.
        keys = jax.random.split(jax.random.key(2), 64)
        many = jax.vmap(lambda k: sampling.sample_token(k, logits, temperature=1.0, top_p=0.9)[0])(keys)
        assert set(np.asarray(many[:, 1]).tolist()) == {0, 2}


def test_filter_argument_errors():
    with pytest.raises(ValueError, match="top_p"):
        heads.filter_logits(jnp.zeros((1, 3)), top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        heads.filter_logits(jnp.zeros((1, 3)), top_k=-1)


def test_greedy_generate_matches_argmax_and_forward_logprobs(model):
    tokens, valid = _prompt()
    out = sampling.generate(model, tokens, valid, jax.random.key(0), max_new_tokens=5, temperature=0.0)
    chex.assert_shape([out.tokens, out.logprobs], (3, 5))
    np.testing.assert_array_equal(out.lengths, [5, 5, 5])
    full = jnp.concatenate([tokens, out.tokens], 1)
    full_valid = jnp.concatenate([valid, jnp.ones((3, 5), bool)], 1)
    positions = jnp.maximum(jnp.cumsum(full_valid, 1) - 1, 0)
    logits, _ = model(full, positions, full_valid)
    # Greedy: each generated token is the argmax of the full forward at the slot before it.
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 5:10], -1)), np.asarray(out.tokens))
    lp = qwen3.forward_logprobs(model, full, positions, full_valid)[:, 6:]
    assert np.abs(np.asarray(lp - out.logprobs)).max() < 2e-5


def test_sampled_logprobs_match_forward_and_compile_once(model):
    tokens, valid = _prompt()
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9, stop_tokens=[7, 9])
    before = sampling._generate_jit._cache_size()
    out = sampling.generate(model, tokens, valid, jax.random.key(3), **kw)
    # Different data, same bucket: no recompilation.
    out2 = sampling.generate(model, tokens[::-1], valid[::-1], jax.random.key(4), **{**kw, "temperature": 0.7})
    assert sampling._generate_jit._cache_size() == before + 1
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(out2.tokens))
    gen_valid = jnp.arange(6)[None, :] < out.lengths[:, None]
    full = jnp.concatenate([tokens, out.tokens], 1)
    full_valid = jnp.concatenate([valid, gen_valid], 1)
    positions = jnp.maximum(jnp.cumsum(full_valid, 1) - 1, 0)
    # The recorded log-probs are the filtered distribution's (top-k 50, top-p 0.9 at temperature 1), recomputed
    # here from one forward pass over the whole sequence.
    logits, _ = model(full, positions, full_valid)
    dist_logp = jax.nn.log_softmax(heads.SamplingDist(top_k=50, top_p=0.9).logits(logits), axis=-1)
    prev, _ = qwen3.previous_valid_slot(full_valid)
    lp = jnp.take_along_axis(dist_logp, prev[:, :, None], axis=1)
    lp = jnp.take_along_axis(lp, full[:, :, None], axis=2)[:, 6:, 0]
    diff = np.abs(np.asarray(jnp.where(gen_valid, lp - out.logprobs, 0.0))).max()
    assert diff < 2e-5, diff
    assert (np.asarray(out.logprobs)[~np.asarray(gen_valid)] == 0).all()


def test_stop_tokens_and_max_lengths(model):
    tokens, valid = _prompt()
    free = sampling.generate(model, tokens, valid, jax.random.key(0), max_new_tokens=6, temperature=0.0)
    # Use row 0's third greedy token as the stop token: row 0 must stop right after emitting it.
    stop = int(free.tokens[0, 2])
    out = sampling.generate(model, tokens, valid, jax.random.key(0), max_new_tokens=6, temperature=0.0,
                            stop_tokens=[stop], pad_id=PAD, max_lengths=jnp.array([6, 2, 0]))
    first_stop = int(np.argmax(np.asarray(free.tokens[0]) == stop))
    assert int(out.lengths[0]) == first_stop + 1
    np.testing.assert_array_equal(out.tokens[0, :first_stop + 1], free.tokens[0, :first_stop + 1])
    assert (np.asarray(out.tokens[0, first_stop + 1:]) == PAD).all()
    # Row 1 capped at 2 tokens (unless it hit the stop token earlier), row 2 at 0.
    row1 = np.asarray(free.tokens[1])
    expect1 = min(2, int(np.argmax(row1 == stop)) + 1 if (row1 == stop).any() else 6)
    assert int(out.lengths[1]) == expect1 and (np.asarray(out.tokens[1, expect1:]) == PAD).all()
    assert int(out.lengths[2]) == 0 and (np.asarray(out.tokens[2]) == PAD).all()
    assert (np.asarray(out.logprobs[2]) == 0).all()


def test_decode_inside_jit_and_scan_over_turns(model):
    """Two turns decoded into one cache inside one jitted lax.scan: the second turn sees the first's reply."""
    graphdef, state = nnx.split(model)
    tokens, valid = _prompt()

    @jax.jit
    def rollout(state, key):
        m = nnx.merge(graphdef, state)
        cache = qwen3.init_cache(TINY, 3, 6 + 2 * (1 + 3))
        _, pos, cache = sampling.prefill(m, cache, tokens, valid)

        def turn(carry, key):
            cache, pos = carry
            # A one-token turn separator (id 1) is prefilled before each reply; its logits start the decode.
            m = nnx.merge(graphdef, state)
            last, pos, cache = sampling.prefill(m, cache, jnp.ones((3, 1), jnp.int32), jnp.ones((3, 1), bool), pos)
            out_tokens, logp, lengths, cache = sampling.decode(
                m, cache, last, key, max_new_tokens=3, stop_tokens=jnp.array([5], jnp.int32), pad_id=PAD,
                temperature=1.0, start_positions=pos)
            return (cache, pos + lengths), (out_tokens, logp)

        (cache, _), (toks, logps) = jax.lax.scan(turn, (cache, pos), jax.random.split(key, 2))
        return cache, toks, logps

    cache, toks, logps = rollout(state, jax.random.key(7))
    assert int(cache.index) == 6 + 2 * 4
    # Rebuild the dialogue buffer slot by slot and recompute every log-prob with one full forward.
    reply_valid = np.asarray(cache.valid[:, 6:]).reshape(3, 2, 4)[:, :, 1:]
    buf = np.concatenate([np.asarray(tokens)] + sum(
        ([np.ones((3, 1), np.int32), np.asarray(toks[t])] for t in range(2)), []), 1)
    buf_valid = np.asarray(cache.valid)
    positions = np.maximum(np.cumsum(buf_valid, 1) - 1, 0)
    lp = np.asarray(qwen3.forward_logprobs(model, jnp.asarray(buf), jnp.asarray(positions), jnp.asarray(buf_valid)))
    for t in range(2):
        got = np.asarray(logps[t])
        want = lp[:, 6 + 4 * t + 1: 6 + 4 * t + 4]
        assert np.abs(np.where(reply_valid[:, t], want - got, 0)).max() < 2e-5


def test_prefill_logits_are_the_full_forward_at_each_rows_last_valid_slot(model):
    tokens, valid = _prompt()
    tokens = tokens.at[2, 5].set(0)
    valid = valid.at[2, 5].set(False)  # row 2 ends in a pad: its last valid slot is 4
    cache = qwen3.init_cache(TINY, 3, 8)
    last, next_pos, cache = jax.jit(sampling.prefill)(model, cache, tokens, valid)
    positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
    full, _ = model(tokens, positions, valid)
    np.testing.assert_allclose(last, np.asarray(full)[[0, 1, 2], [5, 5, 4]], atol=1e-5)
    np.testing.assert_array_equal(next_pos, [4, 4, 5])
    assert int(cache.index) == 6


def _top_level_primitives(jaxpr):
    return {eqn.primitive.name for eqn in jaxpr.eqns}


def test_decode_skips_sampling_and_model_once_every_row_stopped(model):
    tokens, valid = _prompt()
    cache = qwen3.init_cache(TINY, 3, 12)
    last, pos, cache = sampling.prefill(model, cache, tokens, valid)
    args = (cache, last, jax.random.key(0))
    kw = dict(max_new_tokens=6, stop_tokens=jnp.array([5], jnp.int32), pad_id=PAD, temperature=1.0, top_p=0.9,
              start_positions=pos)
    # Every row stopped from the start: pads, log-prob 0, no tokens, invisible slots, the cache index still advanced.
    toks, logp, lengths, out_cache = sampling.decode(model, *args, **kw, max_lengths=jnp.zeros((3,), jnp.int32))
    assert (np.asarray(toks) == PAD).all() and not np.asarray(logp).any() and not np.asarray(lengths).any()
    assert int(out_cache.index) == 12 and not np.asarray(out_cache.valid[:, 6:]).any()
    # The scan body's only work outside its cond is the key split: sampling (random bits, the top-p sort) and
    # the model (dot_general) sit inside the branch an all-stopped step skips.
    jaxpr = jax.make_jaxpr(lambda c, l, k: sampling.decode(model, c, l, k, **kw))(*args)
    scan = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
    body = _top_level_primitives(scan.params["jaxpr"].jaxpr)
    assert "cond" in body and not body & {"random_bits", "sort", "dot_general", "argmax"}, body
