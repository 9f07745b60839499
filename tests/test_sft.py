"""Tests for gopo_jax.algorithms.sft: target alignment across pads, token-mean aggregation, metrics."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax.algorithms.sft import make_sft_loss_fn, sft_loss
from gopo_jax.models.qwen3 import positions_from_valid
from gopo_jax.models import qwen3

# Row 0: a pad in the middle (slot 2), so token 3 is predicted from slot 1. Row 1: a leading pad, so its first
# valid token (slot 1) has no predictor and is not a target even though the mask says so.
TOKENS = np.array([[5, 7, 0, 9, 11, 3], [0, 4, 8, 15, 16, 23]], np.int32)
VALID = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], bool)
LOSS_MASK = np.array([[0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], bool)
# (row, target slot, predicting slot) of every real target, worked out by hand from the arrays above.
TARGETS = [(0, 1, 0), (0, 3, 1), (0, 5, 4), (1, 2, 1), (1, 4, 3)]


@pytest.fixture(scope="module")
def tiny():
    return nnx.split(qwen3.Qwen3(qwen3.get_config("tiny"), rngs=nnx.Rngs(0)), nnx.Param)


class PositionsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pads_do_not_advance_positions(self):
        got = self.variant(positions_from_valid)(jnp.asarray(VALID))
        np.testing.assert_array_equal(got, [[0, 1, 1, 2, 3, 4], [0, 0, 1, 2, 3, 3]])


@pytest.mark.parametrize("jit", [False, True])
def test_sft_loss_matches_hand_aligned_cross_entropy(tiny, jit):
    graphdef, params = tiny
    batch = {"tokens": jnp.asarray(TOKENS), "valid": jnp.asarray(VALID), "loss_mask": jnp.asarray(LOSS_MASK)}
    fn = functools.partial(sft_loss, graphdef)
    loss, metrics = (jax.jit(fn) if jit else fn)(params, batch)

    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["tokens"], positions_from_valid(batch["valid"]), batch["valid"])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    nll = [-logp[r, src, TOKENS[r, t]] for r, t, src in TARGETS]
    hits = [np.argmax(logp[r, src]) == TOKENS[r, t] for r, t, src in TARGETS]
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(hits), atol=1e-7)
    assert float(metrics["num_tokens"]) == len(TARGETS)
    # Same alignment rule as the model's own per-token log-probs.
    ref = qwen3.forward_logprobs(model, batch["tokens"], positions_from_valid(batch["valid"]), batch["valid"])
    np.testing.assert_allclose(loss, -np.sum(np.asarray(ref) * LOSS_MASK) / len(TARGETS), rtol=1e-6)


def test_sft_loss_empty_mask_is_zero_not_nan(tiny):
    graphdef, params = tiny
    batch = {"tokens": jnp.asarray(TOKENS), "valid": jnp.asarray(VALID),
             "loss_mask": jnp.zeros(TOKENS.shape, bool)}
    loss, metrics = sft_loss(graphdef, params, batch)
    assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0


def test_sft_loss_rejects_bad_batches(tiny):
    graphdef, params = tiny
    with pytest.raises(KeyError, match="loss_mask"):
        sft_loss(graphdef, params, {"tokens": jnp.asarray(TOKENS), "valid": jnp.asarray(VALID)})
    with pytest.raises(AssertionError):
        sft_loss(graphdef, params, {"tokens": jnp.asarray(TOKENS), "valid": jnp.asarray(VALID),
                                    "loss_mask": jnp.asarray(LOSS_MASK, jnp.int32)})


def test_make_sft_loss_fn_passes_extras_through(tiny):
    graphdef, params = tiny
    batch = {"tokens": jnp.asarray(TOKENS), "valid": jnp.asarray(VALID), "loss_mask": jnp.asarray(LOSS_MASK)}
    extras = {"mu": jnp.float32(0.5)}
    loss, (metrics, new_extras) = make_sft_loss_fn(graphdef)(params, extras, batch, jax.random.key(0))
    assert new_extras is extras
    np.testing.assert_allclose(loss, sft_loss(graphdef, params, batch)[0])
