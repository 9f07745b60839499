"""GRPO baseline: group-relative advantages and the loss wiring (hand-computed values)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.algorithms import grpo
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.models import qwen3


class GRPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_advantages_are_normalised_within_groups(self):
        fn = self.variant(lambda r: grpo.grpo_advantages(r, 2))
        adv = fn(jnp.array([1.0, 3.0, 2.0, 2.0]))
        # Group 1: mean 2, std 1; group 2 has no spread, so no signal.
        np.testing.assert_allclose(adv, [-1.0, 1.0, 0.0, 0.0], atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_to_tokens(self):
        fn = self.variant(grpo.sequence_to_tokens)
        out = fn(jnp.array([2.0, -1.0]), jnp.array([[True, False, True], [False, True, False]]))
        np.testing.assert_allclose(out, [[2.0, 0.0, 2.0], [0.0, -1.0, 0.0]])


def _trajectory(cs_mask, tokens):
    b, length = tokens.shape
    t = 2
    zf = jnp.zeros((b, t), jnp.float32)
    return Trajectory(tokens=tokens, valid=jnp.ones((b, length), bool), ea_mask=jnp.zeros((b, length), bool),
                      cs_mask=cs_mask, cs_logprob=jnp.zeros((b, length), jnp.float32),
                      strategy=jnp.zeros((b, t), jnp.int32), allowed=jnp.ones((b, t, 3), bool), ea_logprob=zf,
                      realised=jnp.zeros((b, t), jnp.int32), aligned=zf, sop_valid=zf, gain=zf, cont=zf, rel=zf,
                      rel_realised=zf, quality=zf, turn_mask=jnp.ones((b, t), bool), outcome=jnp.zeros(b),
                      satisfaction=jnp.zeros(b), fcr=jnp.zeros(b))


def test_grpo_loss_token_mean_at_ratio_one():
    cfg = qwen3.get_config("tiny", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=8, max_position_embeddings=32)
    gd, params = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    # Two turns of [decision | reply x 2]; dialogue 0 has 1 reply token, dialogue 1 has 3.
    layout = Layout(context_len=0, customer_len=0, header_len=0, reply_len=2, max_turns=2)
    cs_mask = jnp.array([[0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 1, 0]], bool)
    traj = _trajectory(cs_mask, tokens)
    logp, _ = scoring.cs_token_log_probs(nnx.merge(gd, params), traj, layout)
    traj = traj.replace(cs_logprob=logp)  # rollout policy = current policy: ratio 1
    loss_fn = grpo.make_grpo_loss(gd, layout, grpo.GRPOHyper(group_size=2, beta=0.0, aggregation="token-mean"))
    loss, (metrics, extras) = loss_fn({"cs": params}, {"mu": jnp.float32(0)}, grpo.GRPOBatch(
        traj=traj, rewards=jnp.array([1.0, 3.0])), None)
    # Advantages [-1, 1]; token-mean of -A over 4 tokens: -(-1 * 1 + 1 * 3) / 4.
    np.testing.assert_allclose(loss, -0.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_std"], 1.0)
    assert float(metrics["zero_variance_groups"]) == 0.0 and set(extras) == {"mu"}
