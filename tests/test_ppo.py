"""PPO baseline pieces: GAE, reward placement, value loss, value model alignment (hand-computed values)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.algorithms import ppo
from gopo_jax.models import qwen3


class PPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_gae_skips_unmasked_slots(self):
        fn = self.variant(lambda r, v, m: ppo.gae(r, v, m, gamma=0.9, lam=0.5))
        # Slot 1 is a customer token: its reward and value must not count.
        adv, ret = fn(jnp.array([0.0, 9.0, 0.0, 1.0]), jnp.array([0.5, 7.0, 0.5, 0.5]),
                      jnp.array([True, False, True, True]))
        # t=3: δ = 1 - .5 = .5; t=2: δ = .9*.5 - .5 = -.05, A = -.05 + .45*.5 = .175;
        # t=0: δ = -.05, A = -.05 + .45*.175 = .02875.
        np.testing.assert_allclose(adv, [0.02875, 0.0, 0.175, 0.5], atol=1e-6)
        np.testing.assert_allclose(ret, [0.52875, 0.0, 0.675, 1.0], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gae_monte_carlo_limit(self):
        fn = self.variant(lambda r, v, m: ppo.gae(r, v, m, gamma=1.0, lam=1.0))
        adv, ret = fn(jnp.array([0.0, 0.0, 1.0]), jnp.array([0.2, 0.4, 0.6]), jnp.ones(3, bool))
        np.testing.assert_allclose(ret, [1.0, 1.0, 1.0], atol=1e-6)
        np.testing.assert_allclose(adv, [0.8, 0.6, 0.4], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_shaped_turn_rewards(self):
        fn = self.variant(lambda g, m, f: ppo.shaped_turn_rewards(g, m, f, shaping=0.5))
        r = fn(jnp.array([0.2, 0.3, 0.4]), jnp.array([True, True, False]), jnp.float32(2.0))
        np.testing.assert_allclose(r, [0.1, 2.15, 0.0], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_turn_rewards_land_on_last_action_token(self):
        fn = self.variant(ppo.turn_rewards_to_tokens)
        token_turn = jnp.array([-1, 0, 0, 0, 1, 1, 1, 1])
        both = fn(jnp.array([1.0, 2.0]), jnp.array([0, 1, 1, 0, 0, 1, 1, 0], bool), token_turn)
        np.testing.assert_allclose(both, [0, 0, 1, 0, 0, 0, 2, 0])
        # Turn 1 has no reply token: its reward moves to turn 0's last one instead of being dropped.
        empty = fn(jnp.array([1.0, 2.0]), jnp.array([0, 1, 1, 0, 0, 0, 0, 0], bool), token_turn)
        np.testing.assert_allclose(empty, [0, 0, 3, 0, 0, 0, 0, 0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_clipped_value_loss(self):
        fn = self.variant(lambda v, o, r, m: ppo.clipped_value_loss(v, o, r, m, clip=0.2))
        # Unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24: the max is taken. Masked entry ignored.
        loss = fn(jnp.array([1.0, 5.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, 0.0]), jnp.array([True, False]))
        np.testing.assert_allclose(loss, 1.62, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_action_values_read_previous_valid_slot(self):
        fn = self.variant(ppo.action_values)
        out = fn(jnp.array([[10.0, 11.0, 12.0, 13.0]]), jnp.array([[True, False, True, True]]))
        np.testing.assert_allclose(out, [[0.0, 0.0, 10.0, 12.0]])

    def test_whiten(self):
        out = ppo.whiten(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False]))
        np.testing.assert_allclose(out, [-1.0, 1.0, 0.0], atol=1e-6)

    def test_value_model_ignores_pads(self):
        cfg = qwen3.get_config("tiny", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                               num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=32)
        model = ppo.ValueModel(cfg, rngs=nnx.Rngs(0))
        model.value_head.kernel[...] = jax.random.normal(jax.random.key(1), model.value_head.kernel[...].shape)
        tokens = jnp.array([[3, 5, 0, 7]])
        valid = jnp.array([[True, True, False, True]])
        padded = model(tokens, jnp.array([[0, 1, 1, 2]]), valid)
        compact = model(jnp.array([[3, 5, 7]]), jnp.array([[0, 1, 2]]), jnp.ones((1, 3), bool))
        assert padded.shape == (1, 4)
        np.testing.assert_allclose(padded[0, jnp.array([0, 1, 3])], compact[0], rtol=1e-5, atol=1e-6)
