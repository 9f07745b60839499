"""What a training method is: a frozen bundle of pure functions, built once from a `MethodContext`.

The run pipeline (`gopo_jax.train.build` + `gopo_jax.train.driver`) owns everything methods share: the world, warm
start, rollouts, evaluation, checkpoints and logs. A method says which agents act (with or without the Expert), the
parameters it adds (e.g. PPO's value model), its learning rates, how a rolled-out batch becomes its typed loss batch
(`prepare_batch`, pure: called inside the jitted iteration) and the loss itself. Nothing in a method reaches back
into the trainer; what it needs from the run is in the context it was built from.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from gopo_jax.algorithms.gopo import GOPOHyper, trajectory_scores
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from gopo_jax.metrics.episode import EpisodeMetricSettings, episode_metrics

LossFn = Callable[[Any, dict, Any, jax.Array], tuple[jax.Array, tuple[dict, dict]]]


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method is built from: the run config, the world, the agents' graph definitions, GOPO's static
    hyper-parameters and the metric settings."""

    config: Any
    world: Any
    expert_gd: Any
    cs_gd: Any
    hyper: GOPOHyper
    metric_settings: EpisodeMetricSettings

    def settings(self, name: str):
        """`config.baselines.<name>`, with a clear error when the run config has no baselines section."""
        if "baselines" not in self.config:
            raise ValueError(f"config.method={name!r} needs the config section 'baselines': call "
                             "configs.baselines.add_baseline_config(c) in the run config before it is locked")
        return self.config.baselines[name]

    def scores(self, traj: Trajectory) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(S = ESNDCG + λ_B R_B, ESNDCG, R_B), f32[B] each (pure). The Expert is scored on what it chose (GOPO.md
        §3): ESNDCG of the chosen strategies."""
        m = episode_metrics(traj, self.metric_settings)
        s = trajectory_scores(m["esndcg_chosen"], m["gre"], lambda_b=self.hyper.lambda_b,
                              use_esndcg=self.hyper.use_esndcg)
        return s, m["esndcg_chosen"], m["gre"]

    def business_rewards(self, traj: Trajectory) -> jax.Array:
        """R_B f32[B]: what the single-agent baselines optimise."""
        return episode_metrics(traj, self.metric_settings)["gre"]

    def reference_expert_log_probs(self, ref_params, traj: Trajectory) -> jax.Array:
        """The frozen reference Expert's masked strategy log-probs f32[B, T, n_k] at the Expert's sampling
        temperature, as the trained policy's (pure)."""
        model = nnx.merge(self.expert_gd, ref_params["expert"])
        return scoring.expert_strategy_log_probs(model, traj, self.world.layout, self.world.vocab.strategy_ids,
                                                 sop_mask=self.hyper.sop_mask,
                                                 temperature=self.hyper.expert_temperature)

    def reference_cs_log_probs(self, ref_params, traj: Trajectory) -> jax.Array:
        """The frozen reference CS's token log-probs f32[B, L] under the run's sampling transformation, as the
        trained policy's (pure)."""
        return scoring.cs_token_log_probs(nnx.merge(self.cs_gd, ref_params["cs"]), traj, self.world.layout,
                                          self.hyper.cs_sampling)[0]

    def model_agents(self, sampling: SamplingConfig) -> ModelAgents:
        return ModelAgents(self.expert_gd, self.cs_gd, self.world.vocab, self.world.layout, sampling)


def _own_params(params, ref_params):
    del ref_params
    return params


def _params_alone(params, extras):
    del extras
    return params


def _no_extra_params(key):
    del key
    return {}


def _no_extras():
    return {}


def _extras_unchanged(extras, traj):
    del traj
    return extras


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of the run pipeline. Every field is data or a pure function.

    name: the registry name (`config.method`).
    use_expert: whether the Expert acts (chooses a strategy per turn) in rollouts and evaluation.
    learning_rates: per top-level parameter group ("expert", "cs", and the method's own).
    make_agents(sampling) -> the agents object of the rollouts.
    loss(params, extras, batch, rng) -> (loss, (metrics, new_extras)), over the method's typed batch; None when
      the method does not train after the warm start.
    prepare_batch(traj, ref_params, params) -> the typed batch (pure; once per rollout, outside the epochs).
    init_extra_params(key) -> parameters beyond the two agents.
    init_extras() -> the train state's extras (arrays the loss updates without gradients).
    rollout_params(params, ref_params) -> what the rollout acts with (DPO: the frozen reference).
    acting_params(params, extras) -> the agents' parameters for rollouts and evaluation (Memento adds its bank).
    end_iteration(extras, traj) -> the extras after an iteration's updates, from its rollout (GOPO's μ step).
    """

    name: str
    use_expert: bool
    learning_rates: Mapping[str, float]
    make_agents: Callable[[SamplingConfig], Any]
    loss: LossFn | None = None
    prepare_batch: Callable[[Trajectory, Any, Any], Any] | None = None
    init_extra_params: Callable[[jax.Array], dict] = _no_extra_params
    init_extras: Callable[[], dict] = _no_extras
    rollout_params: Callable[[Any, Any], Any] = _own_params
    acting_params: Callable[[Any, dict], Any] = _params_alone
    end_iteration: Callable[[dict, Trajectory], dict] = _extras_unchanged

    @property
    def trains(self) -> bool:
        return self.loss is not None
