"""gopo_jax.dialogue.scoring: the used-rows scoring equals the full-vocabulary computation it replaced.

The reference below is the pre-`heads` code path kept verbatim as an independent check: full [B, L, V] logits
from `model(...)`, a log-softmax at every slot, the Expert's strategy columns gathered at its decision slots."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.sop import masked_strategy_log_softmax
from gopo_jax.models import qwen3

LAYOUT = Layout(context_len=3, customer_len=3, header_len=2, reply_len=4, max_turns=3)
STRATEGY_IDS = (40, 41, 42, 43)


def _naive_cs(model, traj):
    logits, _ = model(traj.tokens, qwen3.positions_from_valid(traj.valid), traj.valid)
    prev, has_prev = qwen3.previous_valid_slot(traj.valid)
    rows = jnp.arange(traj.tokens.shape[0])[:, None]
    pred = jax.nn.log_softmax(logits[rows, prev], axis=-1)  # [B, L, V]
    logp = jnp.take_along_axis(pred, traj.tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(pred) * pred, axis=-1)
    return jnp.where(has_prev, logp, 0.0), jnp.where(has_prev, entropy, 0.0)


def _naive_expert(model, traj, layout, strategy_ids):
    logits, _ = model(traj.tokens, qwen3.positions_from_valid(traj.valid), traj.valid)
    at_decisions = logits[:, scoring.decision_logit_positions(layout), :][..., jnp.asarray(strategy_ids)]
    return masked_strategy_log_softmax(at_decisions, traj.allowed & traj.turn_mask[..., None])


def _model(tie=True, dtype="float32"):
    cfg = qwen3.get_config("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=tie, dtype=dtype,
                           logits_chunk=5)  # several chunks, the last one padded
    return qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))


def _trajectory(seed=0, b=3):
    """Random tokens with pads scattered through every role (leading pads, pads before a reply, empty turns)."""
    k_tok, k_valid, k_allowed, k_strat = jax.random.split(jax.random.key(seed), 4)
    length, t = LAYOUT.length, LAYOUT.max_turns
    tokens = jax.random.randint(k_tok, (b, length), 1, 64)
    valid = jax.random.uniform(k_valid, (b, length)) < 0.7
    valid = valid.at[:, 0].set(False).at[0, LAYOUT.reply_start(0) - 2:LAYOUT.reply_start(0)].set(False)
    turn_of = LAYOUT.turn_of_position()
    turn_mask = jnp.asarray([[True, True, False], [True, False, False], [True, True, True]])[:b]
    valid = valid & ((turn_of < 0) | turn_mask[:, jnp.clip(turn_of, 0)])
    roles = LAYOUT.role_template()
    cs_mask = valid & (roles == 5)[None]
    ea_mask = valid & (roles == 4)[None]
    for i in range(t):  # the header's stage token is valid on an active turn
        valid = valid.at[:, LAYOUT.decision_pos(i) - 1].set(turn_mask[:, i])
    zf = jnp.zeros((b, t), jnp.float32)
    allowed = (jax.random.uniform(k_allowed, (b, t, len(STRATEGY_IDS))) < 0.6).at[..., 0].set(True)
    return Trajectory(tokens=tokens, valid=valid, ea_mask=ea_mask, cs_mask=cs_mask,
                      cs_logprob=jnp.zeros((b, length), jnp.float32),
                      strategy=jax.random.randint(k_strat, (b, t), 0, len(STRATEGY_IDS)), allowed=allowed,
                      ea_logprob=zf, realised=jnp.zeros((b, t), jnp.int32), aligned=zf, sop_valid=zf, gain=zf,
                      cont=zf, rel=zf, rel_realised=zf, quality=zf, turn_mask=turn_mask, outcome=jnp.zeros(b),
                      satisfaction=jnp.zeros(b), fcr=jnp.zeros(b))


class ScoringTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_cs_log_probs_and_entropy_equal_full_logits(self):
        traj = _trajectory()
        for tie in (True, False):
            model = _model(tie)
            gd, state = nnx.split(model)
            logp, ent = self.variant(lambda s, tr, gd=gd: scoring.cs_token_log_probs(nnx.merge(gd, s), tr, LAYOUT))(
                state, traj)
            ref_logp, ref_ent = _naive_cs(model, traj)
            reply = np.zeros(LAYOUT.length, bool)
            reply[scoring.reply_positions(LAYOUT)] = True
            m = np.asarray(traj.cs_mask)
            assert m.sum() > 10 and (m <= reply[None]).all()
            # every reply slot (a superset of cs_mask) equals the full computation; every other slot is 0
            np.testing.assert_allclose(np.asarray(logp)[:, reply], np.asarray(ref_logp)[:, reply], atol=1e-5)
            np.testing.assert_allclose(np.asarray(ent)[:, reply], np.asarray(ref_ent)[:, reply], atol=1e-5)
            assert not np.asarray(logp)[:, ~reply].any() and not np.asarray(ent)[:, ~reply].any()

    def test_cs_gradients_equal_full_logits(self):
        traj = _trajectory(seed=1)
        model = _model()
        gd, state = nnx.split(model, nnx.Param)
        m = traj.cs_mask

        def objective(score):
            def f(params):
                logp, ent = score(nnx.merge(gd, params), traj)
                return jnp.sum(jnp.where(m, logp, 0.0)) + 0.3 * jnp.sum(jnp.where(m, ent, 0.0))
            return f

        got = jax.grad(objective(lambda mdl, tr: scoring.cs_token_log_probs(mdl, tr, LAYOUT)))(state)
        ref = jax.grad(objective(_naive_cs))(state)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4), got, ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_expert_strategy_log_probs_equal_full_logits(self):
        traj = _trajectory(seed=2)
        for tie in (True, False):
            model = _model(tie)
            gd, state = nnx.split(model)
            got = self.variant(lambda s, tr, gd=gd: scoring.expert_strategy_log_probs(
                nnx.merge(gd, s), tr, LAYOUT, STRATEGY_IDS))(state, traj)
            ref = _naive_expert(model, traj, LAYOUT, STRATEGY_IDS)
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_cs_scoring_never_builds_full_vocabulary_logits_at_every_slot():
    """The compiled CS scoring's temporaries stay below one fp32 [B, L, V] buffer (the naive path's least)."""
    model = _model()
    model_big_vocab = qwen3.Qwen3(model.config.replace(vocab_size=4096, logits_chunk=16), rngs=nnx.Rngs(0))
    gd, state = nnx.split(model_big_vocab)
    traj = _trajectory(b=3)

    def temp_bytes(score):
        return jax.jit(lambda s, tr: score(nnx.merge(gd, s), tr)).lower(state, traj).compile(
        ).memory_analysis().temp_size_in_bytes

    full = 3 * LAYOUT.length * 4096 * 4
    assert temp_bytes(_naive_cs) >= full
    assert temp_bytes(lambda mdl, tr: scoring.cs_token_log_probs(mdl, tr, LAYOUT)) < full // 4
