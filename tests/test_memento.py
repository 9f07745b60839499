"""Memento baseline: soft-Q targets, the ring-buffer case bank, retrieval and the Q loss (hand-computed values)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.algorithms import memento
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from tests.helpers import tiny_run_config, world_and_agents


def _bank(emb, strategy, ret, valid, ptr=0, feat=None, stamp=None):
    n = len(strategy)
    return memento.CaseBank(emb=jnp.asarray(emb, jnp.float32),
                            feat=jnp.zeros((n, 4), jnp.float32) if feat is None else jnp.asarray(feat, jnp.float32),
                            strategy=jnp.asarray(strategy, jnp.int32), ret=jnp.asarray(ret, jnp.float32),
                            stamp=jnp.zeros((n,), jnp.int32) if stamp is None else jnp.asarray(stamp, jnp.int32),
                            valid=jnp.asarray(valid, bool), ptr=jnp.asarray(ptr, jnp.int32))


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
        bank = memento.CaseBank.empty(3, 1, 2)
        bank = fn(bank, jnp.array([[1.0], [2.0], [3.0]]), jnp.ones((3, 4)), jnp.array([1, 2, 3]),
                  jnp.array([10.0, 20.0, 30.0]), jnp.array([True, False, True]), jnp.asarray(7))
        np.testing.assert_array_equal(bank.strategy, [1, 3, 0])
        np.testing.assert_array_equal(bank.stamp, [7, 7, 0])
        np.testing.assert_array_equal(bank.feat.sum(-1), [4.0, 4.0, 0.0])
        np.testing.assert_array_equal(bank.valid, [True, True, False])
        assert int(bank.ptr) == 2
        bank = fn(bank, jnp.array([[4.0], [5.0]]), jnp.zeros((2, 4)), jnp.array([4, 5]), jnp.array([40.0, 50.0]),
                  jnp.array([True, True]), jnp.asarray(8))
        # Slot 2, then wraps onto the oldest case at slot 0.
        np.testing.assert_array_equal(bank.strategy, [5, 3, 4])
        np.testing.assert_allclose(bank.ret, [50.0, 30.0, 40.0])
        np.testing.assert_array_equal(bank.valid, [True, True, True])
        assert int(bank.ptr) == 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_retrieve(self):
        fn = self.variant(lambda q, b, e: memento.retrieve(q, b, e, top_k=2, temperature=1.0))
        bank = _bank([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [1, 2, 3], [True, True, False])
        everything = jnp.ones(3, bool)
        idx, w = fn(jnp.array([2.0, 0.0]), bank, everything)
        # Cosines 1 and 0 (case 2 is not valid): softmax weights e/(e+1), 1/(e+1).
        np.testing.assert_array_equal(idx, [0, 1])
        np.testing.assert_allclose(w, [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-6)
        idx, w = fn(jnp.array([2.0, 0.0]), bank, jnp.array([False, True, True]))  # case 0 not visible
        assert int(idx[0]) == 1
        np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-7)
        _, w = fn(jnp.array([1.0, 0.0]), memento.CaseBank.empty(3, 2, 2), everything)
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
        loss, m = memento.q_loss(params, bank)
        np.testing.assert_allclose(loss, 0.5 * ((1 - 1) ** 2 + (2 - 5) ** 2) / 2, rtol=1e-6)
        np.testing.assert_allclose(m["q_mean"], 1.5, rtol=1e-6)

    def test_q_loss_reads_the_stored_features(self):
        params = memento.init_q_params(jax.random.key(0), 1 + 4, 3, 2)
        params["w2"] = jnp.ones((3, 2))
        bank = _bank([[1.0], [1.0]], [0, 0], [0.0, 0.0], [True, True], feat=[[0, 0, 0, 0], [5, 0, 1, 0]])
        q = jax.vmap(lambda e, f: memento.q_values(params, e, f))(bank.emb, bank.feat)
        _, m = memento.q_loss(params, bank)
        np.testing.assert_allclose(m["q_mean"], q[:, 0].mean(), rtol=1e-6)
        assert float(q[0, 0]) != float(q[1, 0])

    def test_memento_loss_writes_only_in_first_epoch(self):
        hyper = memento.MementoHyper(num_strategies=2, num_stages=2, max_turns=2, top_k=2, steps_per_iteration=2,
                                     write_steps=1)
        loss_fn = memento.make_memento_loss(hyper)
        extras = {"mu": jnp.float32(0), **memento.CaseBank.empty(8, 2, 2).to_extras(),
                  "memento_updates": jnp.zeros((), jnp.int32)}
        batch = memento.MementoBatch(emb=jnp.ones((1, 2, 2)), strategy=jnp.array([[0, 1]]),
                                     target=jnp.array([[1.0, 2.0]]), turn_mask=jnp.array([[True, False]]))
        params = {"q": memento.init_q_params(jax.random.key(0), 2 + 4, 3, 2)}
        _, (m1, extras) = loss_fn(params, extras, batch, None)
        _, (_, extras) = loss_fn(params, extras, batch, None)  # epoch 2 of the same rollout: no duplicate
        assert int(extras["memento_valid"].sum()) == 1 and int(extras["memento_updates"]) == 2
        np.testing.assert_allclose(m1["bank_fill"], 1 / 8)
        _, (_, extras) = loss_fn(params, extras, batch, None)  # the next rollout writes again
        assert int(extras["memento_valid"].sum()) == 2
        np.testing.assert_array_equal(extras["memento_stamp"][:2], [0, 1])

    def test_no_sibling_leakage(self):
        """A case's memory features are those its agent saw when acting: cases of earlier iterations only. Two
        minibatches of one iteration (siblings of the same customers) never see each other's cases, and the same
        dialogues acted one iteration later do."""
        hyper = memento.MementoHyper(num_strategies=2, num_stages=2, max_turns=1, top_k=4, steps_per_iteration=2,
                                     write_steps=2)
        loss_fn = memento.make_memento_loss(hyper)
        extras = {**memento.CaseBank.empty(8, 2, 2).to_extras(), "memento_updates": jnp.zeros((), jnp.int32)}
        params = {"q": memento.init_q_params(jax.random.key(0), 2 + 4, 3, 2)}

        def minibatch(strategy, target):  # two sibling dialogues of one customer: the same state
            return memento.MementoBatch(emb=jnp.ones((2, 1, 2)), strategy=jnp.array([[strategy]] * 2),
                                        target=jnp.full((2, 1), target), turn_mask=jnp.ones((2, 1), bool))

        _, (_, extras) = loss_fn(params, extras, minibatch(0, 1.0), None)
        _, (_, extras) = loss_fn(params, extras, minibatch(1, 3.0), None)  # iteration 0, minibatch 2
        np.testing.assert_array_equal(extras["memento_feat"][:4], np.zeros((4, 4)))  # an empty bank was all they saw
        _, (_, extras) = loss_fn(params, extras, minibatch(1, 5.0), None)  # iteration 1 sees iteration 0's cases
        np.testing.assert_allclose(extras["memento_feat"][4], [1.0, 3.0, 0.5, 0.5], rtol=1e-6)
        np.testing.assert_array_equal(extras["memento_stamp"][:6], [0, 0, 0, 0, 1, 1])


def test_untrained_memento_acts_exactly_as_the_sft_expert(tmp_path):
    """Q ≡ 0 before training (the output layer starts at zero), whatever the bank holds: Memento's rollouts are the
    SFT agents', bit for bit, sampled and greedy."""
    world, expert_gd, cs_gd, params = world_and_agents(tiny_run_config(), tmp_path)
    sop = world.spec.sop
    hyper = memento.MementoHyper(num_strategies=sop.num_strategies, num_stages=len(sop.stages),
                                 max_turns=world.layout.max_turns)
    dim = world.expert_config.hidden_size + hyper.num_stages + 1
    bank = memento.write_cases(memento.CaseBank.empty(16, dim, hyper.num_strategies),
                               jax.random.normal(jax.random.key(1), (16, dim)),
                               jnp.ones((16, 2 * hyper.num_strategies)), jnp.arange(16) % hyper.num_strategies,
                               jnp.linspace(-1.0, 2.0, 16), jnp.ones(16, bool), jnp.asarray(0))
    q = memento.init_q_params(jax.random.key(2), dim + 2 * hyper.num_strategies, 8, hyper.num_strategies)
    keys = world.episodes(jax.random.key(3), 4)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.0, expert_greedy=True)):
        sft_agents = ModelAgents(expert_gd, cs_gd, world.vocab, world.layout, sampling)
        mem_agents = memento.MementoAgents(inner=sft_agents, hyper=hyper, stage_ids=world.vocab.stage_ids)
        sft = world.make_rollout(sft_agents)(params, keys, jax.random.key(4))
        mem = world.make_rollout(mem_agents)(params | {"q": q, "bank": bank.to_extras()}, keys, jax.random.key(4))
        assert int(sft.turn_mask.sum()) > 0
        chex.assert_trees_all_equal(sft, mem)
    # A trained Q moves the choice, within the SOP mask: a large Q for strategy 0 picks it wherever it is allowed,
    # and never where it is not.
    biased = q | {"b2": jnp.zeros(hyper.num_strategies).at[0].set(50.0 * hyper.alpha)}
    moved = world.make_rollout(mem_agents)(params | {"q": biased, "bank": bank.to_extras()}, keys, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(moved.strategy == 0)[np.asarray(moved.turn_mask)],
                                  np.asarray(moved.allowed[..., 0])[np.asarray(moved.turn_mask)])
