"""The run's phases as pure functions of (state, reference, seed, step): one definition for every driver.

* `demonstrations(seed)`: scripted dialogues, split into the warm start's train and held-out sets.
* `sft_block(state, train_demo, seed, steps, batch_size)`: a `lax.scan` of warm-start updates over `steps`.
* `update(state, ref, traj, seed, it)`: method iteration `it` after its rollout — the method's `prepare_batch`,
  then a `lax.scan` over epochs of a `lax.scan` over minibatches (whole groups) of the pure train step.
* `iteration(state, ref, seed, it)`: rollout → `update`, the whole iteration as one traced function.
* `evaluate(params, extras, seed)` / `reference_eval(seed)`: the held-out customers' episode metrics.

All keys come from `gopo_jax.train.schedule`. The single-seed driver jits these functions with the mesh's
layouts (`mesh=`: the state keeps its parameter sharding and every minibatch is split over ("data", "fsdp"));
the seed-parallel driver jits `jax.vmap` of the same functions. On a host world (a Python turn loop) the functions
that roll out are not traceable: the driver rolls out on the host and calls the same jitted `update`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gopo_jax.algorithms.sft import DemoBatch
from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.metrics.episode import episode_metrics
from gopo_jax.parallel import batch_sharding, param_shardings
from gopo_jax.train import schedule
from gopo_jax.train.build import Components, demo_split
from gopo_jax.train.state import TrainState, create_train_state
from gopo_jax.train.step import pure_train_step


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

    # --- layouts (identity without a mesh) ---
    def _constrain_state(self, state):
        if self.mesh is None:
            return state
        return jax.tree.map(jax.lax.with_sharding_constraint, state, param_shardings(state, self.mesh))

    def _constrain_batch(self, batch):
        if self.mesh is None:
            return batch
        sharding = batch_sharding(self.mesh)
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)

    def _step(self, loss, tx):
        update = pure_train_step(loss, tx)

        def step(state, batch):
            state, metrics = update(self._constrain_state(state), self._constrain_batch(batch))
            return self._constrain_state(state), metrics

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
        method = self.c.method
        traj = self.c.eval_rollout(method.acting_params(params, extras), self.c.eval_episodes(),
                                   schedule.eval_key(seed))
        return self.metrics(traj), self.head(traj)

    def reference_eval(self, seed) -> dict[str, jax.Array]:
        return self.metrics(self.c.reference_rollout({}, self.c.eval_episodes(), schedule.reference_eval_key(seed)))

    # --- warm start ---
    def demonstrations(self, seed) -> tuple[Trajectory, Trajectory]:
        """(train, held-out) demonstrations (`demo_split`)."""
        episodes_key, agents_key = schedule.demo_keys(seed)
        traj = self.c.demo_rollout({}, self.c.world.episodes(episodes_key, self.c.config.sft.episodes), agents_key)
        n_held = demo_split(self.c.config)[1]
        return jax.tree.map(lambda x: x[n_held:], traj), jax.tree.map(lambda x: x[:n_held], traj)

    def sft_block(self, state: TrainState, train_demo: Trajectory, seed, steps: jax.Array, batch_size: int):
        """Warm-start updates for the SFT steps `steps` (int32[n]); each draws `batch_size` demonstrations."""
        n_train = jax.tree.leaves(train_demo)[0].shape[0]
        step = self._step(self.c.warm_start_loss, self.c.sft_tx)

        def one(state, i):
            perm = jax.random.permutation(schedule.sft_batch_key(seed, i), n_train)[:batch_size]
            return step(state, DemoBatch(traj=jax.tree.map(lambda x: x[perm], train_demo)))

        return jax.lax.scan(one, state, steps)

    def sft_heldout(self, params, held_demo: Trajectory) -> dict[str, jax.Array]:
        _, (metrics, _) = self.c.warm_start_loss(params, {}, DemoBatch(traj=held_demo), None)
        return metrics

    # --- method iterations ---
    def rollout_inputs(self, state: TrainState, ref_params, seed, it):
        """(acting params, customers, agents' key) of iteration `it`'s rollout."""
        t, method = self.c.config.train, self.c.method
        episodes_key, agents_key = schedule.iteration_keys(seed, it)
        acting = method.acting_params(method.rollout_params(state.params, ref_params), state.extras)
        return acting, self.c.world.group_episodes(episodes_key, t.groups, t.group_size), agents_key

    def update(self, state: TrainState, ref_params, traj: Trajectory, seed, it):
        """(state, per-update stats [epochs, minibatches], the rollout's episode metrics)."""
        t, method = self.c.config.train, self.c.method
        batch = method.prepare_batch(traj, ref_params, state.params)
        step = self._step(method.loss, self.c.tx)

        def epoch(state, e):
            perm = jax.random.permutation(schedule.epoch_key(seed, it, e), t.groups)
            return jax.lax.scan(step, state, group_minibatches(batch, perm, t.group_size, t.minibatches))

        state, stats = jax.lax.scan(epoch, self._constrain_state(state), jnp.arange(t.epochs))
        return state, stats, self.metrics(traj)

    def iteration(self, state: TrainState, ref_params, seed, it):
        acting, episodes, agents_key = self.rollout_inputs(state, ref_params, seed, it)
        return self.update(state, ref_params, self.c.rollout(acting, episodes, agents_key), seed, it)
