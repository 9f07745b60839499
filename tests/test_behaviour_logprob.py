"""The recorded behaviour log-prob is the log-prob under the distribution actually sampled (GOPO.md §1), and the
trainers recompute exactly it: after temperature, top-k and top-p for the CS, after the Expert's temperature for the
Expert, so every PPO ratio is 1 at θ = θ_old."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax import sampling
from gopo_jax.algorithms.gopo import GOPOBatch, GOPOHyper, make_gopo_loss
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from gopo_jax.models import heads
from gopo_jax.train.build import hyper_from_config
from tests.helpers import tiny_run_config

T, K, P = 0.7, 5, 0.9


def reference_log_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """log π over one row's vocabulary (-inf outside the support), written from the definition: temper, keep the
    top_k largest, then walk down by probability (renormalised over the survivors) keeping each token while the mass
    already kept is below top_p."""
    z = logits.astype(np.float64) / temperature
    survivors = np.argsort(-z, kind="stable")[:top_k]
    p = np.exp(z[survivors] - z[survivors].max())
    p /= p.sum()
    kept, mass = [], 0.0
    for token, prob in zip(survivors, p):
        if mass >= top_p:
            break
        kept.append(token)
        mass += prob
    out = np.full(z.shape, -np.inf)
    out[kept] = z[kept] - np.log(np.sum(np.exp(z[kept] - z[kept].max()))) - z[kept].max()
    return out


def test_sample_token_records_the_log_prob_of_the_distribution_it_draws_from():
    logits = jax.random.normal(jax.random.key(0), (6, 16)) * 2.0
    ids, logp = jax.jit(lambda k, x: sampling.sample_token(k, x, temperature=T, top_k=K, top_p=P))(
        jax.random.key(1), logits)
    ref = np.stack([reference_log_probs(row, T, K, P) for row in np.asarray(logits)])
    np.testing.assert_allclose(np.asarray(logp), ref[np.arange(6), np.asarray(ids)], atol=1e-5)

    # 20k draws of row 0: the empirical frequencies are exp(recorded log-prob), and nothing outside the support.
    n = 20_000
    draw = jax.vmap(lambda k: sampling.sample_token(k, logits[:1], temperature=T, top_k=K, top_p=P))
    draws, draw_logp = jax.jit(draw)(jax.random.split(jax.random.key(2), n))
    draws, draw_logp = np.asarray(draws[:, 0]), np.asarray(draw_logp[:, 0])
    freq = np.bincount(draws, minlength=16) / n
    want = np.exp(ref[0])
    assert freq[want == 0].sum() == 0
    assert 2 <= (want > 0).sum() <= K  # the case is a real filter, not a single token
    np.testing.assert_allclose(freq, want, atol=0.015)  # ~4 binomial standard deviations at n = 20k
    np.testing.assert_allclose(draw_logp, ref[0][draws], atol=1e-5)

    # Greedy (temperature 0) records the model's own log-prob, whatever the filters.
    ids, logp = sampling.sample_token(jax.random.key(3), logits, temperature=0.0, top_k=K, top_p=P)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(logits))[np.arange(6), ids], atol=1e-6)


@pytest.mark.parametrize("chunk", [48, 8])  # one chunk; a rematerialised scan over chunks
def test_chunked_head_scores_the_sampled_distribution_and_keeps_a_dropped_target(chunk):
    h = jax.random.normal(jax.random.key(4), (2, 12, 8))
    table = jax.random.normal(jax.random.key(5), (16, 8))
    targets = jax.random.randint(jax.random.key(6), (2, 12), 0, 16)
    dist = heads.SamplingDist(temperature=T, top_k=K, top_p=P)
    logp, entropy = heads.token_log_probs_and_entropy(h, table, targets, chunk=chunk, dist=dist)
    logits = np.asarray(jnp.einsum("bnd,vd->bnv", h, table))
    ref = np.stack([np.stack([reference_log_probs(row, T, K, P) for row in b]) for b in logits])
    want = np.take_along_axis(ref, np.asarray(targets)[..., None], -1)[..., 0]
    dropped = ~np.isfinite(want)
    assert dropped.any() and (~dropped).any()  # both cases are exercised
    # A target outside the current support is added to it: z_t / T − logsumexp(support ∪ {t}).
    z = logits.astype(np.float64) / T
    z_t = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]
    support_lse = np.log(np.sum(np.where(np.isfinite(ref), np.exp(z), 0.0), -1))
    want = np.where(dropped, z_t - np.logaddexp(support_lse, z_t), want)
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
    p = np.exp(ref)
    np.testing.assert_allclose(np.asarray(entropy), -np.sum(p * np.where(p > 0, ref, 0.0), -1), atol=1e-5)
    # Finite gradients through the filtered head (no -inf · 0 in the backward pass).
    grad = jax.grad(lambda x: jnp.sum(heads.token_log_probs_and_entropy(x, table, targets, chunk=chunk,
                                                                          dist=dist)[0]))(h)
    assert np.isfinite(np.asarray(grad)).all()


def test_hyper_carries_the_run_sampling():
    c = tiny_run_config()
    c.unlock()
    c.sampling.temperature, c.sampling.top_k, c.sampling.top_p, c.sampling.expert_temperature = T, K, P, 0.5
    hyper = hyper_from_config(c)
    assert hyper.cs_sampling == heads.SamplingDist(temperature=T, top_k=K, top_p=P)
    assert hyper.expert_temperature == 0.5
    with pytest.raises(ValueError, match="temperature"):
        heads.SamplingDist(temperature=-1.0)


@pytest.mark.parametrize("cs_dist, expert_temperature", [
    (heads.SamplingDist(temperature=T, top_k=K, top_p=P), 0.7),
    (heads.SamplingDist(), 1.0),  # the default sampling: the model's own distributions
])
def test_trainer_log_probs_equal_the_rollout_record(tiny_world, cs_dist, expert_temperature):
    world, ge, gc, params = tiny_world
    cfg = SamplingConfig(temperature=cs_dist.temperature, top_k=cs_dist.top_k, top_p=cs_dist.top_p,
                         expert_temperature=expert_temperature)
    agents = ModelAgents(ge, gc, world.vocab, world.layout, cfg)
    traj = world.make_rollout(agents)(params, world.episodes(jax.random.key(0), 4), jax.random.key(1))
    cs_mask, turn_mask = np.asarray(traj.cs_mask), np.asarray(traj.turn_mask)
    assert cs_mask.sum() > 0 and turn_mask.sum() > 0

    cs_logp, _ = scoring.cs_token_log_probs(nnx.merge(gc, params["cs"]), traj, world.layout, cs_dist)
    np.testing.assert_allclose(np.asarray(cs_logp)[cs_mask], np.asarray(traj.cs_logprob)[cs_mask], atol=1e-4)
    logp_all = scoring.expert_strategy_log_probs(nnx.merge(ge, params["expert"]), traj, world.layout,
                                                 world.vocab.strategy_ids, temperature=expert_temperature)
    ea = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
    np.testing.assert_allclose(np.asarray(ea)[turn_mask], np.asarray(traj.ea_logprob)[turn_mask], atol=1e-4)

    # Through the GOPO loss as the trainer builds it: both ratios are 1 at the rollout's parameters.
    hyper = GOPOHyper(group_size=4, expert_loss="clipped_pg", beta_cs=0.0, cs_sampling=cs_dist,
                      expert_temperature=expert_temperature)
    loss = make_gopo_loss(ge, gc, world.layout, world.vocab.strategy_ids, hyper)
    _, (metrics, _) = loss(params, {"mu": jnp.float32(0.0)}, GOPOBatch(traj=traj, scores=jnp.arange(4.0)), None)
    np.testing.assert_allclose(float(metrics["cs_ratio_mean"]), 1.0, atol=1e-4)
    np.testing.assert_allclose(float(metrics["expert_ratio_mean"]), 1.0, atol=1e-4)
