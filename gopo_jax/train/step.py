"""The one sharded train step, shared by SFT, GOPO and the baselines, and the optimizer that goes with it.

An algorithm supplies only a pure loss,

    loss_fn(params, extras, batch, rng) -> (loss f32[], (metrics: dict[str, f32[]], new_extras: dict))

and `make_train_step` turns it into a single `jax.jit` that differentiates it, applies the optax update and
returns the new `TrainState`, with the state donated and laid out on the mesh by the parameters' partition
annotations (`gopo_jax.parallel.param_shardings`) and the batch split over ("data", "fsdp"). `params` may hold
several models (a dict `{"expert": ..., "cs": ...}`); `extras` carries values the loss updates itself
without gradients (GOPO's Lagrange multiplier), returned through `new_extras`.

Non-finite guard: if the loss, the global gradient norm or a floating-point leaf of the new extras is NaN/inf, the
step keeps the old params, optimizer state and extras (the step counter and rng still advance, so the next batch is
tried with a fresh key) and reports `nonfinite = 1`. One bad batch therefore costs one skipped update instead of NaN
parameters (or a NaN Lagrange multiplier) for the rest of the run. The losses make a non-finite reward show as a
non-finite loss rather than a silently zero advantage (`gopo_jax.algorithms`), so the guard covers NaN rewards too;
the driver stops a run after `train.max_nonfinite_updates` consecutive skips.

LoRA: agents named in `lora_groups` (built with lora_rank > 0) train their adapters only. Give the same names to
`make_optimizer` (no update and no optimizer state for their base) and to the step (their base sits behind
`stop_gradient`, so its gradients are never computed and `grad_norm` is the adapters').
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gopo_jax.models import lora
from gopo_jax.parallel import batch_sharding, param_shardings
from gopo_jax.train.state import TrainState

LossFn = Callable[[Any, dict, Any, jax.Array], tuple[jax.Array, tuple[dict, dict]]]

_ADAMW_DEFAULTS = dict(weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)


def _constrain(tree, shardings):
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def _is_frozen(path, lora_groups: Collection[str]) -> bool:
    """A base (non-adapter) leaf of a LoRA group of the params dict; `path` is its jax key path."""
    return path[0].key in lora_groups and not lora.is_adapter(path)


def _all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is free of NaN and inf (True without such leaves)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def pure_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, lora_groups: Collection[str] = ()):
    """The update of `make_train_step` as a plain function `step(state, batch) -> (new_state, metrics)`: no jit, no
    layout constraints, so callers can vmap it (one update per seed, `gopo_jax.train.phases`) or scan it.
    `lora_groups`: the agents whose base is frozen (the same as `make_optimizer`'s), differentiated through their
    adapters only."""

    def loss_with_frozen_base(params, extras, batch, rng):
        # The base's gradient is a symbolic zero: XLA never computes the [in, out] weight gradients of a frozen
        # base (measured: the temp bytes of a LoRA step fall to a third, tests/test_lora.py), only what flows on to
        # the adapters.
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.lax.stop_gradient(x) if _is_frozen(path, lora_groups) else x, params)
        return loss_fn(params, extras, batch, rng)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, loss_rng = jax.random.split(state.rng)
        (loss, (metrics, new_extras)), grads = jax.value_and_grad(
            loss_with_frozen_base if lora_groups else loss_fn, has_aux=True)(state.params, state.extras, batch,
                                                                             loss_rng)
        if jax.tree.structure(new_extras) != jax.tree.structure(state.extras):
            raise ValueError(f"loss_fn returned new_extras with structure {jax.tree.structure(new_extras)} but "
                             f"state.extras has {jax.tree.structure(state.extras)}; return the same keys "
                             "(pass unchanged ones through)")
        grad_norm = optax.global_norm(grads)
        # The extras outlive the update in the state: a NaN there (GOPO's μ from a NaN alignment signal) would stay.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_extras)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            extras=keep_if_finite(new_extras, state.extras),
            step=state.step + 1,
            rng=rng,
        )
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
        return new_state, metrics

    return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: TrainState | None = None, donate: bool = True,
                    lora_groups: Collection[str] = ()):
    """Returns the jitted `step(state, batch) -> (new_state, metrics)`.

    `state_shardings` (e.g. `param_shardings(state, mesh)`) pins the jit's input and output layouts. Without
    it the layouts are derived inside the trace from the same annotations, so the step also accepts a state
    that has not been placed yet (it is resharded on entry). Metrics add `loss`, `grad_norm` (global, before
    any clipping in `tx`) and `nonfinite` (int32 0/1: the update was skipped, see the module docstring) to the
    loss's own. `lora_groups`: see `pure_train_step`.
    """
    data_sharding = batch_sharding(mesh)
    update = pure_train_step(loss_fn, tx, lora_groups=lora_groups)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        shardings = param_shardings(state, mesh)
        state = _constrain(state, shardings)
        batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, data_sharding), batch)
        new_state, metrics = update(state, batch)
        return _constrain(new_state, shardings), metrics

    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, data_sharding), out_shardings=(state_shardings, replicated),
                   donate_argnums=donate_argnums)


def _group_tx(name: str, cfg: Any) -> optax.GradientTransformation:
    if callable(cfg) or isinstance(cfg, (int, float)):
        cfg = {"learning_rate": cfg}
    cfg = dict(cfg)
    unknown = set(cfg) - {"learning_rate", *_ADAMW_DEFAULTS}
    if "learning_rate" not in cfg or unknown:
        raise ValueError(f"optimizer group {name!r}: needs 'learning_rate' (float or optax schedule) and only "
                         f"{sorted(_ADAMW_DEFAULTS)} besides; got keys {sorted(cfg)}")
    return optax.adamw(**{**_ADAMW_DEFAULTS, **cfg})


# The optimizer label of the frozen base leaves of a LoRA group (`make_optimizer(lora_groups=...)`).
FROZEN = "frozen"


def make_optimizer(cfg_by_group: Mapping[str, Any], clip_norm: float | None = 1.0, *,
                   lora_groups: Collection[str] = ()) -> optax.GradientTransformation:
    """AdamW with its own settings per top-level group of the params dict, after global-norm clipping.

    `cfg_by_group` maps each top-level key of `params` (e.g. "expert", "cs") to a learning rate (float or optax
    schedule) or a mapping with `learning_rate` and optionally `weight_decay`, `b1`, `b2`, `eps`. Clipping
    is over all groups together, so one agent's exploding gradient scales both updates. `clip_norm=None`
    disables it.

    `lora_groups` names the groups (agents built with lora_rank > 0) of which only the LoRA adapters train
    (`gopo_jax.models.lora.is_adapter`): their base leaves get `optax.set_to_zero()` (no optimizer state) and are
    left out of the clipping norm, so nothing of the update reads their gradients (pass the same `lora_groups` to
    the train step, which then does not compute them).
    """
    if not cfg_by_group:
        raise ValueError("make_optimizer: cfg_by_group is empty; give one entry per top-level params key")
    groups = sorted(cfg_by_group)
    unknown = sorted(set(lora_groups) - set(groups))
    if unknown:
        raise ValueError(f"make_optimizer: lora_groups {unknown} are not optimizer groups {groups}; name agents of "
                         f"the params dict")
    if lora_groups and FROZEN in groups:
        raise ValueError(f"make_optimizer: a group is called {FROZEN!r}, the label of the frozen LoRA base; rename it")

    def labels(params):
        top = set(params) if isinstance(params, Mapping) else None
        if top != set(groups):
            raise ValueError(f"make_optimizer: params top-level keys {sorted(top) if top else type(params)} must "
                             f"equal the optimizer groups {groups}; wrap a single model as {{'policy': params}}")
        bare = [g for g in lora_groups if not any(jax.tree.leaves(lora.adapter_mask(params[g])))]
        if bare:
            raise ValueError(f"make_optimizer: lora_groups {bare} have no LoRA adapter leaves; build those agents "
                             f"with lora_rank > 0 or leave them out of lora_groups")

        def label(path, _):
            return FROZEN if _is_frozen(path, lora_groups) else path[0].key

        return jax.tree_util.tree_map_with_path(label, params)

    def trainable(params):
        return jax.tree.map(lambda name: name != FROZEN, labels(params))

    txs = {name: _group_tx(name, cfg_by_group[name]) for name in groups}
    tx = optax.multi_transform({**txs, FROZEN: optax.set_to_zero()} if lora_groups else txs, labels)
    if clip_norm is None:
        return tx
    clip = optax.clip_by_global_norm(clip_norm)
    return optax.chain(optax.masked(clip, trainable) if lora_groups else clip, tx)


def split_minibatches(batch: Any, num: int) -> Any:
    """[B, ...] leaves -> [num, B // num, ...]; minibatch k holds rows k, k + num, k + 2 num, ...

    Strided rather than contiguous on purpose: the batch axis is split over devices in contiguous blocks, so a
    strided minibatch draws rows from every device's block and stays evenly sharded (a contiguous one would
    sit on B/num of the devices).
    """
    def one(x):
        if np.ndim(x) == 0 or x.shape[0] % num:
            raise ValueError(f"split_minibatches: leading size {np.shape(x)[:1]} is not divisible into {num} "
                             "minibatches; choose a batch size that is a multiple of the number of minibatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

    if num < 1:
        raise ValueError(f"split_minibatches: num must be >= 1, got {num}")
    return jax.tree.map(one, batch)
