"""The run's phases as pure functions of (state, reference, seed, step): one definition for every driver.

* `demonstrations(seed)`: scripted dialogues, split into the warm start's train and held-out sets.
* `sft_block(state, train_demo, seed, steps, batch_size)`: a `lax.scan` of warm-start updates over `steps`.
* `rollout(state, ref, seed, it)`: method iteration `it`'s rollout (pure-JAX worlds).
* `prepare(traj, ref, params)`: the method's `prepare_batch` — the reference pass and scoring over the rollout.
* `update(state, ref, traj, seed, it)`: method iteration `it` after its rollout — `prepare`, then a `lax.scan` over
  epochs of a `lax.scan` over minibatches (whole groups) of the pure train step (`train_step`).
* `iteration(state, ref, seed, it)`: `rollout` → `update`, the whole iteration as one traced function.
* `evaluate(params, extras, seed)` / `reference_eval(seed)`: the held-out customers' episode metrics.

All keys come from `gopo_jax.train.schedule`. The single-seed driver jits these functions with the mesh's
layouts (`mesh=`): parameters (the state's, the reference's, the evaluated ones) keep their training sharding, and
every batch — the rollout's episode keys and trajectory, the prepared batch of the reference pass and scoring, each
minibatch, the evaluation and demonstration rollouts — is split over ("data", "fsdp"), so no phase runs replicated
on every device. A batch whose size data*fsdp does not divide falls back to the larger single axis that divides
it, else to replication (`gopo_jax.parallel.batch_split_axes`); `Phases` logs each such batch once, with the config
key to change (`batch_axes` lists the layout of every batch). The seed-parallel driver jits `jax.vmap` of the same
functions without layouts. On a host world (a Python turn loop) the functions that roll out are not traceable: the
driver rolls out on the host and calls the same jitted `update`, which lays the trajectory out on entry.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from gopo_jax.algorithms.sft import DemoBatch
from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.metrics.episode import episode_metrics
from gopo_jax.models import lora
from gopo_jax.parallel import BATCH_AXES, batch_split_axes, constrain_rows, param_shardings
from gopo_jax.train import schedule
from gopo_jax.train.build import Components, demo_split
from gopo_jax.train.state import TrainState, create_train_state
from gopo_jax.train.step import pure_train_step

_log = logging.getLogger(__name__)


def group_minibatches(batch, perm: jax.Array, group_size: int, num: int):
    """[B, ...] -> [num, B / num, ...] minibatches of whole groups (a group's rows stay contiguous), with the groups
    shuffled by `perm`: minibatch k holds groups perm[k], perm[k + num], ..."""
    per_mb = perm.reshape(perm.shape[0] // num, num).T
    rows = (per_mb[..., None] * group_size + jnp.arange(group_size)).reshape(num, -1)
    return jax.tree.map(lambda x: x[rows], batch)


@dataclasses.dataclass(frozen=True)
class Phases:
    """The pure phase functions of one run's components (see the module docstring)."""

    c: Components
    mesh: Any = None  # None: no layout constraints (vmapped seeds)

    def __post_init__(self):
        if self.mesh is None:
            return
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        for what, axes in self.batch_axes().items():
            if shards > 1 and axes != BATCH_AXES:
                rows, key = self._batch_rows()[what]
                _log.warning("%s: %d rows do not divide data*fsdp = %d, so they are split over %s only; make %s a "
                             "multiple of %d to use every device", what, rows, shards,
                             axes or "no axis (replicated on every device)", key, shards)

    # --- layouts (identity without a mesh) ---
    def _batch_rows(self) -> dict[str, tuple[int, str]]:
        """Each batch the phases lay out: (rows, the config key that sets them)."""
        cfg, t = self.c.config, self.c.config.train
        n_train, n_held = demo_split(cfg)
        return {"rollout": (t.groups * t.group_size, "train.groups * train.group_size"),
                "minibatch": (t.groups * t.group_size // t.minibatches,
                              "train.groups * train.group_size / train.minibatches"),
                "evaluation": (cfg.eval.episodes, "eval.episodes"),
                "demonstrations": (cfg.sft.episodes, "sft.episodes"),
                "sft_batch": (self.c.sft_batch_size(n_train), "sft.batch_size"),
                "sft_heldout": (n_held, "sft.episodes * sft.heldout_fraction")}

    def batch_axes(self) -> dict[str, tuple[str, ...]]:
        """The mesh axes each batch is split over ({} without a mesh): what the warning at construction reports."""
        if self.mesh is None:
            return {}
        return {what: batch_split_axes(self.mesh, rows) for what, (rows, _) in self._batch_rows().items()}

    def _constrain_params(self, tree):
        """Parameters (a params dict, or a whole TrainState) in their training sharding."""
        if self.mesh is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings(tree, self.mesh))

    def _constrain_batch(self, batch):
        """Every leaf's leading axis split over the batch axes (traced code only)."""
        if self.mesh is None:
            return batch
        return constrain_rows(batch, self.mesh)

    def _constrain_rollout(self, tree):
        """A rollout's episodes or trajectory: laid out where the rollout is traced (a pure-JAX world). A host
        world's rollout runs eagerly on host seeds; its trajectory is laid out when `update` takes it."""
        return self._constrain_batch(tree) if self.c.pure_world else tree

    def _rollout(self, rollout, params, episodes, agents_key) -> Trajectory:
        """`rollout` with the acting parameters in their training sharding and the episodes split over the batch
        axes (a pure-JAX world), so the whole scan runs split: GSPMD carries the episodes' layout through it."""
        if not self.c.pure_world:
            return rollout(params, episodes, agents_key)
        traj = rollout(self._constrain_params(params), self._constrain_batch(episodes), agents_key)
        return self._constrain_batch(traj)

    def _step(self, loss, tx):
        update = pure_train_step(loss, tx, lora_groups=self.c.lora_agents)

        def step(state, batch):
            state, metrics = update(self._constrain_params(state), self._constrain_batch(batch))
            return self._constrain_params(state), metrics

        return step

    # --- states ---
    def sft_state(self, params, extras, seed) -> TrainState:
        return create_train_state(params, self.c.sft_tx, extras=extras, rng=schedule.state_key(seed, schedule.SFT))

    def method_state(self, params, extras, seed) -> TrainState:
        """The method starts from the warm-start agents with a fresh optimizer and its own key."""
        return create_train_state(params, self.c.tx, extras=extras, rng=schedule.state_key(seed, schedule.METHOD))

    # --- metrics and evaluation ---
    def metrics(self, traj: Trajectory) -> dict[str, jax.Array]:
        return episode_metrics(traj, self.c.metric_settings)

    def head(self, traj: Trajectory) -> Trajectory:
        """The first held-out dialogues: what samples.md and judge_samples.jsonl show."""
        n = min(max(schedule.SAMPLE_DIALOGUES, self.c.config.eval.judge_dialogues), self.c.config.eval.episodes)
        return jax.tree.map(lambda x: x[:n], traj)

    def evaluate(self, params, extras, seed) -> tuple[dict[str, jax.Array], Trajectory]:
        acting = self.c.method.acting_params(params, extras)
        traj = self._rollout(self.c.eval_rollout, acting, self.c.eval_episodes(), schedule.eval_key(seed))
        return self.eval_metrics(traj), self.head(traj)

    def eval_metrics(self, traj: Trajectory) -> dict[str, jax.Array]:
        """The episode metrics, and with the n-candidate filter (`eval.n_candidates` > 1) each dialogue's
        filter_rescue_rate: the share of its turns whose greedy reply failed the realisation check (aligned and
        SOP-valid) and a later candidate passed it."""
        metrics = self.metrics(traj)
        if traj.filter_rescued is not None:
            m = traj.turn_mask
            metrics["filter_rescue_rate"] = jnp.sum(traj.filter_rescued * m, -1) / jnp.maximum(jnp.sum(m, -1), 1)
        return metrics

    def reference_eval(self, seed) -> dict[str, jax.Array]:
        return self.metrics(self._rollout(self.c.reference_rollout, {}, self.c.eval_episodes(),
                                          schedule.reference_eval_key(seed)))

    # --- warm start ---
    def demonstrations(self, seed) -> tuple[Trajectory, Trajectory]:
        """(train, held-out) demonstrations (`demo_split`)."""
        episodes_key, agents_key = schedule.demo_keys(seed)
        traj = self._rollout(self.c.demo_rollout, {},
                             self.c.world.episodes(episodes_key, self.c.config.sft.episodes), agents_key)
        n_held = demo_split(self.c.config)[1]
        return (self._constrain_rollout(jax.tree.map(lambda x: x[n_held:], traj)),
                self._constrain_rollout(jax.tree.map(lambda x: x[:n_held], traj)))

    def sft_block(self, state: TrainState, train_demo: Trajectory, seed, steps: jax.Array, batch_size: int):
        """Warm-start updates for the SFT steps `steps` (int32[n]); each draws `batch_size` demonstrations."""
        n_train = jax.tree.leaves(train_demo)[0].shape[0]
        step = self._step(self.c.warm_start_loss, self.c.sft_tx)

        def one(state, i):
            perm = jax.random.permutation(schedule.sft_batch_key(seed, i), n_train)[:batch_size]
            return step(state, DemoBatch(traj=jax.tree.map(lambda x: x[perm], train_demo)))

        state, metrics = jax.lax.scan(one, self._constrain_params(state), steps)
        # The scan's carry leaves in whatever layout XLA gave the loop; pinning it keeps the next call's input layout
        # the same as this one's (else the jit would trace and compile a second time for the second block).
        return self._constrain_params(state), metrics

    def sft_heldout(self, params, held_demo: Trajectory) -> dict[str, jax.Array]:
        batch = DemoBatch(traj=self._constrain_batch(held_demo))
        _, (metrics, _) = self.c.warm_start_loss(self._constrain_params(params), {}, batch, None)
        return metrics

    # --- the reference policy ---
    def start_method(self, sft_params, seed):
        """(the method's initial parameters, the reference to keep) after the warm start. The reference policy is
        the SFT policy: a kept copy for fully fine-tuned agents; a LoRA agent merges its warm-start adapters into
        its base and starts with fresh adapters (B = 0: the same policy), so its reference is that base with the
        adapters off and no copy is kept (`reference`)."""
        params = dict(sft_params)
        for i, agent in enumerate(self.c.lora_agents):
            params[agent] = lora.merge_adapters(params[agent], self.c.world.agent_config(agent),
                                                schedule.fresh_adapters_key(seed, i))
        return params, self.kept_reference(params)

    def kept_reference(self, params):
        """What of `params` a run stores as its reference: all but the LoRA agents."""
        return {k: v for k, v in params.items() if k not in self.c.lora_agents}

    def reference(self, kept, params):
        """The reference policy's parameters: the kept ones and each LoRA agent's base with its adapters off."""
        return {**kept, **{agent: lora.adapters_off(params[agent]) for agent in self.c.lora_agents}}

    # --- method iterations ---
    def rollout_inputs(self, state: TrainState, ref_params, seed, it):
        """(acting params, customers, agents' key) of iteration `it`'s rollout."""
        t, method = self.c.config.train, self.c.method
        episodes_key, agents_key = schedule.iteration_keys(seed, it)
        reference = self.reference(ref_params, state.params)
        acting = method.acting_params(method.rollout_params(state.params, reference), state.extras)
        return acting, self.c.world.group_episodes(episodes_key, t.groups, t.group_size), agents_key

    def rollout(self, state: TrainState, ref_params, seed, it) -> Trajectory:
        """Iteration `it`'s rollout (pure-JAX worlds), split over the batch axes from the episode keys on."""
        return self._rollout(self.c.rollout, *self.rollout_inputs(state, ref_params, seed, it))

    def prepare(self, traj: Trajectory, ref_params, params):
        """The method's batch of a rollout — the reference pass and the scoring over the whole rollout — with the
        trajectory, the parameters and the result in their layouts."""
        reference = self.reference(ref_params, params)
        batch = self.c.method.prepare_batch(self._constrain_batch(traj), self._constrain_params(reference),
                                            self._constrain_params(params))
        return self._constrain_batch(batch)

    def train_step(self):
        """The method's update on one minibatch of its batch: `(state, batch) -> (state, stats)`, laid out."""
        return self._step(self.c.method.loss, self.c.tx)

    def update(self, state: TrainState, ref_params, traj: Trajectory, seed, it):
        """(state, per-update stats [epochs, minibatches], the rollout's episode metrics)."""
        t = self.c.config.train
        state = self._constrain_params(state)
        batch = self.prepare(traj, ref_params, state.params)
        step = self.train_step()

        def epoch(state, e):
            perm = jax.random.permutation(schedule.epoch_key(seed, it, e), t.groups)
            return jax.lax.scan(step, state, group_minibatches(batch, perm, t.group_size, t.minibatches))

        state, stats = jax.lax.scan(epoch, state, jnp.arange(t.epochs))
        state = state.replace(extras=self.c.method.end_iteration(state.extras, traj))
        return self._constrain_params(state), stats, self.metrics(self._constrain_batch(traj))  # (see sft_block)

    def iteration(self, state: TrainState, ref_params, seed, it):
        return self.update(state, ref_params, self.rollout(state, ref_params, seed, it), seed, it)
