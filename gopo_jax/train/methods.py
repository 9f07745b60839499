"""Training methods as plug-ins of the one run pipeline: a method is its objective plus what it rolls out.

`gopo_jax.train.loop.Run` owns everything shared (world, warm start, rollouts, evaluation, checkpoints, logs);
a `Method` says which agents act (with or without the Expert), which extra parameters it trains (e.g. a value
model), its learning rates, its loss for the one sharded train step, and how a rolled-out batch becomes that
loss's batch. Methods are looked up by name (`config.method`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gopo_jax.algorithms.hierarchical import make_gopo_loss
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Trajectory


class Method:
    """Base: GOPO's choices. Subclasses override what differs."""

    name = "gopo"
    trains = True  # False: the warm-start agents are the result (the SFT baseline)

    def __init__(self, run):
        self.run = run

    @property
    def use_expert(self) -> bool:
        return self.run.hyper.use_expert

    def extra_params(self, key: jax.Array) -> dict[str, Any]:
        """Parameters beyond {"expert", "cs"} (graphdefs kept on the method)."""
        return {}

    def learning_rates(self) -> dict[str, float]:
        t = self.run.config.train
        return {"expert": t.lr_expert, "cs": t.lr_cs}

    def make_loss(self) -> Callable:
        r = self.run
        return make_gopo_loss(r.expert_gd, r.cs_gd, r.world.layout, r.strategy_ids, r.hyper)

    def init_extras(self) -> dict[str, jax.Array]:
        """The train state's `extras`: arrays the loss updates without gradients (GOPO: the Lagrange multiplier)."""
        return {"mu": jnp.float32(self.run.config.gopo.mu_init)}

    def rollout_params(self, params, ref_params):
        return params

    def acting_params(self, params, extras):
        """What the agents object acts with (rollouts and evaluation), from the parameters that act and the train
        state's extras. Default: the parameters alone; Memento adds its case bank."""
        return params

    def make_agents(self, sampling):
        from gopo_jax.dialogue.rollout import ModelAgents
        r = self.run
        return ModelAgents(r.expert_gd, r.cs_gd, r.world.vocab, r.world.layout, sampling)

    def prepare_batch(self, traj: Trajectory, ref_params, params) -> dict:
        """Called once per rollout, outside the update epochs. Default: GOPO's scores and reference log-probs."""
        scores, _, _ = self.run.scores(traj)
        return {"traj": traj, "scores": scores, **self.run.reference_logps(ref_params, traj)}


METHODS: dict[str, Callable[[Any], Method]] = {"gopo": Method}


def register(name: str):
    def deco(cls):
        METHODS[name] = cls
        cls.name = name
        return cls
    return deco


def get_method(name: str, run) -> Method:
    import gopo_jax.train.baselines  # noqa: F401  (registers the baseline methods)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config.method); choose one of {sorted(METHODS)} (or "
                         "'prompted', which `gopo_jax.train.loop.train` evaluates instead of training)")
    return METHODS[name](run)


def reference_log_probs(run, ref_params, traj: Trajectory, *, expert: bool, cs: bool) -> dict:
    """Frozen-reference log-probs for the KL terms (pure; jit it). Skipped entirely for a part that is off."""
    from flax import nnx
    out = {}
    if expert:
        model = nnx.merge(run.expert_gd, ref_params["expert"])
        out["ref_expert_logp"] = scoring.expert_strategy_log_probs(model, traj, run.world.layout, run.strategy_ids,
                                                                   sop_mask=run.hyper.sop_mask)
    if cs:
        model = nnx.merge(run.cs_gd, ref_params["cs"])
        out["ref_cs_logp"] = scoring.cs_token_log_probs(model, traj)[0]
    return out
