"""The per-dialogue metrics of a rolled-out batch: the one function that training, evaluation, scripted-policy
reports and the comparison tables all read TSE, ESNDCG, R_B (GRE), alignment, SOP validity and the outcome from.

`episode_metrics(traj, settings)` takes any batch with the turn arrays of `gopo_jax.dialogue.layout.Trajectory`
(gain, cont, rel, rel_realised, aligned, sop_valid, turn_mask f32/bool[B, T]; realised int32[B, T]; outcome,
satisfaction, fcr f32[B]); it does not import the layout, so this module stays below dialogue/ in the layering.
Pure and jit-able; `host_episode_metrics` is the same as float64 host arrays (what means and intervals are taken
over).

One meaning per metric for every method (docs/metrics.md "One meaning per column"): `esndcg` scores the realised
strategies (what the customer got), so methods with and without an Expert are compared on the same thing;
`esndcg_chosen` scores the Expert's choices (GOPO's training score S_i). `alignment` is only meaningful where an
Expert chose (the report layer leaves it out otherwise); `recognised` is defined for every method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.metrics.business import BusinessWeights, business_reward
from gopo_jax.metrics.esndcg import esndcg
from gopo_jax.metrics.tse import tse


@dataclasses.dataclass(frozen=True)
class EpisodeMetricSettings:
    """What the metrics need besides the trajectories: R (the largest relevance), T_max, the R_B weights and
    ESNDCG's continuation probability p."""

    max_relevance: float
    t_max: int
    weights: BusinessWeights = BusinessWeights()
    esndcg_p: float = 0.8

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, spec_max_relevance: float, t_max: int
                    ) -> "EpisodeMetricSettings":
        """From a run config: `env.max_relevance` when > 0 (else the world's own R), `business.*`, `gopo.esndcg_p`."""
        max_rel = config["env"]["max_relevance"] if config["env"]["max_relevance"] > 0 else spec_max_relevance
        return cls(max_relevance=float(max_rel), t_max=int(t_max),
                   weights=BusinessWeights.from_config(dict(config["business"])),
                   esndcg_p=float(config["gopo"]["esndcg_p"]))


def _turn_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1)


def episode_metrics(traj: Any, settings: EpisodeMetricSettings) -> dict[str, jax.Array]:
    """f32[B] each: tse, esndcg (of the realised strategies), esndcg_chosen (of the chosen ones), gre (the
    dialogue's R_B), alignment, recognised (share of replies the realisation check maps to a strategy),
    sop_validity, outcome, turns."""
    m = traj.turn_mask
    s = settings
    dialogue_esndcg = jax.vmap(lambda r, mm: esndcg(r, mm, p=s.esndcg_p, max_rel=s.max_relevance))
    return {
        "tse": jax.vmap(tse)(traj.gain, traj.cont, m),
        "esndcg": dialogue_esndcg(traj.rel_realised, m),
        "esndcg_chosen": dialogue_esndcg(traj.rel, m),
        "gre": jax.vmap(lambda o, sat, f, v, mm: business_reward(o, sat, f, v, mm, t_max=s.t_max, weights=s.weights))(
            traj.outcome, traj.satisfaction, traj.fcr, traj.sop_valid, m),
        "alignment": _turn_mean(traj.aligned, m),
        "recognised": _turn_mean((traj.realised >= 0).astype(jnp.float32), m),
        "sop_validity": _turn_mean(traj.sop_valid, m),
        "outcome": jnp.asarray(traj.outcome, jnp.float32),
        "turns": jnp.sum(m, -1).astype(jnp.float32),
    }


def host_episode_metrics(traj: Any, settings: EpisodeMetricSettings) -> dict[str, np.ndarray]:
    """`episode_metrics` as float64 host arrays."""
    return {k: np.asarray(v, np.float64) for k, v in episode_metrics(traj, settings).items()}
