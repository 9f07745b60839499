"""Metrics and rewards (GOPO.md §2): pure JAX per-dialogue functions (TSE, ESNDCG, R_B/GRE, group statistics);
host-side reporting (`reporting`), the G-Eval judge (`geval`) and the MultiWOZ scorer (`multiwoz_eval`) are
imported from their modules."""
from gopo_jax.metrics.business import BusinessWeights, business_reward, gre
from gopo_jax.metrics.esndcg import esndcg, esndcg_monte_carlo, esndcg_ranked
from gopo_jax.metrics.group import group_normalise, pairwise_preference_weights, zero_variance
from gopo_jax.metrics.tse import ntse, tse

__all__ = [
    "BusinessWeights", "business_reward", "gre", "esndcg", "esndcg_monte_carlo", "esndcg_ranked",
    "group_normalise", "pairwise_preference_weights", "zero_variance", "ntse", "tse",
]
