"""Pure functions over the LoRA adapters of a Qwen3's parameters (`qwen3.LoRALinear`, built when lora_rank > 0).

An agent's parameters are the `nnx.State` of `nnx.split(model, nnx.Param)` (the trainer keeps a dict of them,
`{"expert": State, "cs": State, ...}`); every function here takes any pytree holding such states, finds a
projection's adapter by its leaf names (`<projection>.lora_a`, `<projection>.lora_b` next to `<projection>.kernel`)
and the row deltas of the trainable rows (`row_delta` next to `embed_tokens.embedding`, `head_row_delta` next to
`lm_head.kernel`; `Qwen3Config.trainable_rows`) and returns the same structure:

* `adapters_off`: B = 0 and the row deltas zero, so every adapter adds nothing: the base model. It is the reference
  policy of a LoRA run, and it shares the base's arrays (no second copy of the weights is made).
* `merge_adapters`: W + (alpha / r) A B folded into the kernels, the row deltas into the embedding (head), and the
  adapters started afresh (A random, B = 0, deltas zero): after the SFT warm start this makes the SFT policy the new
  base, so the reference (adapters off) is the SFT policy while the model's output does not change.
* `merged_model`: the plain model (lora_rank = 0) with the adapters folded in, for export (`hf_io.save_pretrained`).
* `adapter_mask` / `is_adapter`: which leaves a LoRA run trains (`gopo_jax.train.step.make_optimizer`).
"""
from __future__ import annotations

import zlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.models import qwen3

ADAPTER_NAMES = ("lora_a", "lora_b")
# Row delta leaf -> (the module path of its table, the table's vocabulary axis), relative to the delta's parent.
ROW_DELTA_TABLES = {"row_delta": (("embed_tokens", "embedding"), 0), "head_row_delta": (("lm_head", "kernel"), 1)}
# The leaves that are zero in a fresh adapter: zeroing them switches the adapter off.
_ZERO_WHEN_FRESH = ("lora_b", *ROW_DELTA_TABLES)


def _path_names(path) -> tuple[str, ...]:
    """The names along a path: a jax key path (DictKey / GetAttrKey / SequenceKey) or an nnx flat path of strings,
    without the `value` attribute that holds an `nnx.Variable`'s array."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def is_adapter(path) -> bool:
    """Whether the leaf at `path` (a jax key path or an nnx flat path) is a LoRA A or B matrix or a row delta."""
    names = _path_names(path)
    return bool(names) and names[-1] in (*ADAPTER_NAMES, *ROW_DELTA_TABLES)


def adapter_mask(tree: Any) -> Any:
    """The same structure as `tree` with True at the adapter leaves and False at every other one."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter(path), tree)


def fresh_adapter(names: tuple[str, ...], shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    """A new value for the adapter leaf `names` (e.g. ("layers", "self_attn", "q_proj", "lora_a")): A from
    `qwen3.lora_a_init` with `key` folded with the leaf's path (so each A differs and does not depend on which other
    leaves are drawn), B and the row deltas zero."""
    if names[-1] in _ZERO_WHEN_FRESH:
        return jnp.zeros(shape, dtype)
    if names[-1] != "lora_a":
        raise ValueError(f"fresh_adapter: {'.'.join(names)!r} is not a LoRA adapter leaf "
                         f"({', '.join(('lora_a', *_ZERO_WHEN_FRESH))})")
    return qwen3.lora_a_init(jax.random.fold_in(key, zlib.crc32(".".join(names).encode())), shape, dtype)


def _placed_like(new: jax.Array, old) -> jax.Array:
    """`new` on `old`'s devices and layout (eagerly; under a trace the caller's jit lays it out)."""
    sharding = getattr(old, "sharding", None)
    return new if isinstance(old, jax.core.Tracer) or sharding is None else jax.device_put(new, sharding)


def adapters_off(tree: Any) -> Any:
    """`tree` with every B matrix and row delta zero, so the adapters contribute nothing: the base model. Every other
    leaf is the same array as in `tree`."""
    def off(path, x):
        names = _path_names(path)
        return _placed_like(jnp.zeros_like(x), x) if names and names[-1] in _ZERO_WHEN_FRESH else x

    return jax.tree_util.tree_map_with_path(off, tree)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale · A B in float32, returned in W's dtype. Leading axes (the stacked layers) are batch."""
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def _adapted_projections(names_by_leaf: list[tuple[str, ...]]) -> dict[tuple[str, ...], dict[str, int]]:
    """projection path -> {"kernel", "lora_a", "lora_b"} -> leaf index, for the projections that carry an adapter."""
    leaves: dict[tuple[str, ...], dict[str, int]] = {}
    for i, names in enumerate(names_by_leaf):
        if names and names[-1] in ("kernel", *ADAPTER_NAMES):
            leaves.setdefault(names[:-1], {})[names[-1]] = i
    adapted = {p: parts for p, parts in leaves.items() if set(ADAPTER_NAMES) & set(parts)}
    broken = [".".join(p) for p, parts in adapted.items() if set(parts) != {"kernel", *ADAPTER_NAMES}]
    if broken:
        raise ValueError(f"LoRA projections {broken} lack their kernel, lora_a or lora_b leaf; pass whole agent "
                         f"parameter states (nnx.split(model, nnx.Param)[1])")
    return adapted


def _check_rank(config: qwen3.Qwen3Config, leaves: list, projections: dict) -> None:
    ranks = {leaves[parts["lora_a"]].shape[-1] for parts in projections.values()}
    if ranks and ranks != {config.lora_rank}:
        raise ValueError(f"the adapters have rank {sorted(ranks)} but config.lora_rank is {config.lora_rank}; pass "
                         f"the Qwen3Config the model was built with")


def _row_deltas(names_by_leaf: list[tuple[str, ...]]) -> list[tuple[int, int, int]]:
    """(delta leaf index, table leaf index, the table's vocabulary axis) for each row delta."""
    index = {names: i for i, names in enumerate(names_by_leaf)}
    found = []
    for i, names in enumerate(names_by_leaf):
        if names and names[-1] in ROW_DELTA_TABLES:
            table, axis = ROW_DELTA_TABLES[names[-1]]
            if (*names[:-1], *table) not in index:
                raise ValueError(f"the row delta {'.'.join(names)} has no {'.'.join(table)} next to it; pass whole "
                                 f"agent parameter states (nnx.split(model, nnx.Param)[1])")
            found.append((i, index[(*names[:-1], *table)], axis))
    return found


def merged_table(table: jax.Array, delta: jax.Array, rows: tuple[int, ...], axis: int) -> jax.Array:
    """`table` with its entries `rows` along `axis` (the vocabulary axis: 0 for the embedding [V, D], 1 for the head
    kernel [D, V]) replaced by `qwen3.rows_plus_delta` of them and `delta` [n, D]: what the model computed with."""
    chex.assert_shape(delta, (len(rows), table.shape[1 - axis]))
    ids = np.asarray(rows, np.int32)
    if axis == 0:
        return table.at[ids].set(qwen3.rows_plus_delta(table[ids], delta))
    return table.at[:, ids].set(qwen3.rows_plus_delta(table[:, ids].T, delta).T)


def _check_rows(config: qwen3.Qwen3Config, leaves: list, deltas: list) -> None:
    counts = {leaves[d].shape[0] for d, _, _ in deltas}
    if counts and counts != {len(config.trainable_rows)}:
        raise ValueError(f"the row deltas have {sorted(counts)} rows but config.trainable_rows has "
                         f"{len(config.trainable_rows)}; pass the Qwen3Config the model was built with")


def _fold_adapters(tree: Any, config: qwen3.Qwen3Config, fresh_key: jax.Array | None) -> Any:
    """`tree` with each adapted kernel W replaced by W + (alpha / r) A B and each row delta folded into its table; the
    adapters drawn afresh from `fresh_key`, or left as they are when it is None (for a caller that drops them)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_names(path) for path, _ in flat]
    leaves = [x for _, x in flat]
    projections = _adapted_projections(names)
    deltas = _row_deltas(names)
    _check_rank(config, leaves, projections)
    _check_rows(config, leaves, deltas)
    new = list(leaves)
    adapters = []
    for parts in projections.values():
        k, a, b = (parts[n] for n in ("kernel", "lora_a", "lora_b"))
        new[k] = merged_kernel(leaves[k], leaves[a], leaves[b], config.lora_scale)
        adapters += [a, b]
    for d, t, axis in deltas:
        new[t] = _placed_like(merged_table(leaves[t], leaves[d], config.trainable_rows, axis), leaves[t])
        adapters.append(d)
    if fresh_key is not None:
        for i in adapters:
            new[i] = _placed_like(fresh_adapter(names[i], leaves[i].shape, leaves[i].dtype, fresh_key), leaves[i])
    return jax.tree_util.tree_unflatten(treedef, new)


def merge_adapters(tree: Any, config: qwen3.Qwen3Config, key: jax.Array) -> Any:
    """`tree` with each adapted kernel W replaced by W + (alpha / r) A B, each row delta folded into its table, and the
    adapters started afresh (A drawn from `key` as `fresh_adapter` does, B and the deltas zero): the same function of
    the input, with the adapters' work now in the base. Leaves without an adapter are the same arrays as in `tree`."""
    return _fold_adapters(tree, config, key)


def merged_model(model: qwen3.Qwen3) -> qwen3.Qwen3:
    """The plain Qwen3 (lora_rank = 0, no trainable rows) computing what `model` computes: its adapters folded into
    the kernels and its row deltas into the tables. The model itself when it has none. Holds one merged copy of the
    adapted kernels (and tables) next to `model`'s."""
    config = model.config
    if not config.lora_rank:
        return model
    merged = _fold_adapters(nnx.state(model, nnx.Param), config, fresh_key=None)
    values = {path: var.get_value() for path, var in nnx.to_flat_state(merged)}
    plain = config.replace(lora_rank=0, trainable_rows=())
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(plain, rngs=nnx.Rngs(0))))
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
