"""Memento baseline: soft-Q targets, the ring-buffer case bank, retrieval and the Q loss (hand-computed values)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.algorithms import memento


def _bank(emb, strategy, ret, valid, ptr=0):
    return memento.CaseBank(emb=jnp.asarray(emb, jnp.float32), strategy=jnp.asarray(strategy, jnp.int32),
                            ret=jnp.asarray(ret, jnp.float32), valid=jnp.asarray(valid, bool),
                            ptr=jnp.asarray(ptr, jnp.int32))


HYPER = memento.MementoHyper(num_strategies=2, num_stages=2, max_turns=3, top_k=2, retrieval_temperature=1.0)


class MementoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_soft_q_targets(self):
        fn = self.variant(lambda r, lp, m: memento.soft_q_targets(r, lp, m, gamma=0.9, alpha=0.1))
        y = fn(jnp.array([0.0, 1.0, 5.0]), jnp.array([-0.5, -1.0, -2.0]), jnp.array([True, True, False]))
        # y1 = 1; y0 = 0 + 0.9 * (1 - 0.1 * (-1)) = 0.99; the padded turn counts for nothing.
        np.testing.assert_allclose(y, [0.99, 1.0, 0.0], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_write_cases_ring_buffer(self):
        fn = self.variant(memento.write_cases)
        bank = memento.CaseBank.empty(3, 1)
        bank = fn(bank, jnp.array([[1.0], [2.0], [3.0]]), jnp.array([1, 2, 3]), jnp.array([10.0, 20.0, 30.0]),
                  jnp.array([True, False, True]))
        np.testing.assert_array_equal(bank.strategy, [1, 3, 0])
        np.testing.assert_array_equal(bank.valid, [True, True, False])
        assert int(bank.ptr) == 2
        bank = fn(bank, jnp.array([[4.0], [5.0]]), jnp.array([4, 5]), jnp.array([40.0, 50.0]),
                  jnp.array([True, True]))
        # Slot 2, then wraps onto the oldest case at slot 0.
        np.testing.assert_array_equal(bank.strategy, [5, 3, 4])
        np.testing.assert_allclose(bank.ret, [50.0, 30.0, 40.0])
        np.testing.assert_array_equal(bank.valid, [True, True, True])
        assert int(bank.ptr) == 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_retrieve(self):
        fn = self.variant(lambda q, b, e: memento.retrieve(q, b, e, top_k=2, temperature=1.0))
        bank = _bank([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [1, 2, 3], [True, True, False])
        idx, w = fn(jnp.array([2.0, 0.0]), bank, jnp.asarray(-1))
        # Cosines 1 and 0 (case 2 is not valid): softmax weights e/(e+1), 1/(e+1).
        np.testing.assert_array_equal(idx, [0, 1])
        np.testing.assert_allclose(w, [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-6)
        idx, w = fn(jnp.array([2.0, 0.0]), bank, jnp.asarray(0))  # leave case 0 out
        assert int(idx[0]) == 1
        np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-7)
        _, w = fn(jnp.array([1.0, 0.0]), memento.CaseBank.empty(3, 2), jnp.asarray(-1))
        np.testing.assert_array_equal(w, [0.0, 0.0])  # empty bank: no case, no NaN

    @chex.variants(with_jit=True, without_jit=True)
    def test_memory_features(self):
        fn = self.variant(lambda i, w, b: memento.memory_features(i, w, b, 2))
        bank = _bank(np.zeros((3, 1)), [0, 1, 0], [1.0, 2.0, 3.0], [True] * 3)
        out = fn(jnp.array([0, 2]), jnp.array([0.25, 0.75]), bank)
        # Strategy 0: mean return 0.25*1 + 0.75*3, mass 1; strategy 1: not retrieved.
        np.testing.assert_allclose(out, [2.5, 0.0, 1.0, 0.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_state_embedding(self):
        table = jnp.array([[9.0, 9.0], [3.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
        fn = self.variant(lambda c, v, s, t: memento.state_embedding(c, v, s, t, embed_table=table, num_stages=2,
                                                                     max_turns=3))
        out = fn(jnp.array([1, 3, 0]), jnp.array([True, True, False]), jnp.asarray(1), jnp.asarray(1))
        # Mean of rows 1 and 3 = [1.5, 2] -> unit norm [0.6, 0.8]; stage one-hot; turn 1 / (3 - 1).
        np.testing.assert_allclose(out, [0.6, 0.8, 0.0, 1.0, 0.5], rtol=1e-6)

    def test_stage_index(self):
        np.testing.assert_array_equal(memento.stage_index(jnp.array([7, 9, 0]), (9, 7)), [1, 0, 0])

    def test_q_loss_with_constant_q(self):
        params = memento.init_q_params(jax.random.key(0), 2 + 4, 3, 2)
        params["b2"] = jnp.array([1.0, 2.0])  # w2 starts at zero: Q(s, ·) = b2 for every state
        bank = _bank([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [1.0, 5.0, 9.0], [True, True, False])
        loss, m = memento.q_loss(params, bank, HYPER)
        np.testing.assert_allclose(loss, 0.5 * ((1 - 1) ** 2 + (2 - 5) ** 2) / 2, rtol=1e-6)
        np.testing.assert_allclose(m["q_mean"], 1.5, rtol=1e-6)

    def test_memento_loss_writes_only_in_first_epoch(self):
        hyper = memento.MementoHyper(num_strategies=2, num_stages=2, max_turns=2, top_k=2, steps_per_iteration=2,
                                     write_steps=1)
        loss_fn = memento.make_memento_loss(hyper)
        extras = {"mu": jnp.float32(0), **memento.CaseBank.empty(8, 2).to_extras(),
                  "memento_updates": jnp.zeros((), jnp.int32)}
        batch = memento.MementoBatch(emb=jnp.ones((1, 2, 2)), strategy=jnp.array([[0, 1]]),
                                     target=jnp.array([[1.0, 2.0]]), turn_mask=jnp.array([[True, False]]))
        params = {"q": memento.init_q_params(jax.random.key(0), 2 + 4, 3, 2)}
        _, (m1, extras) = loss_fn(params, extras, batch, None)
        _, (m2, extras) = loss_fn(params, extras, batch, None)  # epoch 2 of the same rollout: no duplicate
        assert int(extras["memento_valid"].sum()) == 1 and int(extras["memento_updates"]) == 2
        np.testing.assert_allclose(m1["bank_fill"], 1 / 8)
        _, (_, extras) = loss_fn(params, extras, batch, None)  # the next rollout writes again
        assert int(extras["memento_valid"].sum()) == 2

