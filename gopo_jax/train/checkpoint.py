"""Checkpoints of a training run: orbax-checkpoint behind `save_checkpoint` / `restore_checkpoint`.

A checkpoint is one step directory `<directory>/<step>/` with two items: `state` (any pytree of jax/numpy arrays and
Python scalars: both agents' parameters, optimiser state, multiplier, step, PRNG keys, data position) and
`metadata` (a JSON dict: model configs, config fingerprint, ...). Orbax writes each step into
`<step>.orbax-checkpoint-tmp-*` and renames it into place only when complete, so a crash or `kill -9` mid-save
leaves a temporary directory that is never listed or restored (and is removed by the next save); `keep` bounds
how many finished steps stay on disk.

Restoring goes INTO a target pytree (concrete arrays or `jax.ShapeDtypeStruct`s with shardings), so arrays come
back with the target's structure, dtypes and shardings. Before orbax touches the data, the stored metadata and
tree are compared with what the caller expects, so a different model config or a changed state layout raises one
`CheckpointMismatchError` that names the differing keys / leaves and the fix, not an orbax traceback.

Corrupted checkpoints: a finished step whose files cannot be read raises `CheckpointCorruptError` naming the step
directory, the steps that remain and the fix. There is deliberately no silent fall-back to an older step: that
would hide a disk fault and make the resumed run diverge from the metrics already logged for the lost steps.

Typed PRNG keys (`jax.random.key`) are stored as their raw key data and re-wrapped with the target's key
implementation on restore.

`install_sigterm_handler` turns SIGTERM into a flag the train loop polls, so the loop itself saves and exits.
"""

import contextlib
import json
import os
import signal
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
# How many differing leaves an error message lists before summarising the rest.
_MAX_LISTED = 8


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says which and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a different config or for a differently shaped state."""


class CheckpointCorruptError(CheckpointError):
    """A finished checkpoint step whose files cannot be read."""


def _manager(directory: os.PathLike | str, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # Synchronous: when save_checkpoint returns, the step is final on disk (the loop may exit right after).
        enable_async_checkpointing=False,
        # Leftovers of a save killed mid-way are never restored; this only reclaims their space.
        cleanup_tmp_directories=True,
        create=keep is not None,
    )
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> Any:
    """The PRNG implementation of a typed key array or of an abstract key (`ShapeDtypeStruct`)."""
    if isinstance(leaf, jax.Array):
        return jax.random.key_impl(leaf)
    # key_impl only accepts arrays; tracing the abstract key is the public way to read its implementation.
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), leaf)
    return found[0]


def _path_str(path: tuple[Any, ...]) -> str:
    """`params/ea/w`-style name of a leaf, the same for a live pytree and for orbax's stored metadata tree."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _check_json(metadata: Mapping[str, Any]) -> None:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"save_checkpoint: metadata must be a dict, got {type(metadata).__name__}.")
    for key, value in metadata.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"save_checkpoint: metadata[{key!r}] is not plain JSON ({e}); pass dicts/lists of str, int, finite float, "
                "bool or None (e.g. config.to_dict() for an ml_collections config)."
            ) from None


def latest_step(directory: os.PathLike | str) -> int | None:
    """The newest finished step in `directory`, or None when there is none (or the directory does not exist)."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def save_checkpoint(
    directory: os.PathLike | str,
    step: int,
    state: PyTree,
    *,
    metadata: Mapping[str, Any],
    keep: int = 3,
) -> str:
    """Saves `state` and the JSON `metadata` as step `step`, keeping the newest `keep` steps; returns the step dir.

    Blocks until the step is final on disk. A step that is already saved is not rewritten (orbax refuses; the loop
    is deterministic, so the state of a step is a function of the step) and its path is returned.
    """
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}.")
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}.")
    _check_json(metadata)
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    with _manager(directory, keep) as manager:
        manager.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(state),
                    _METADATA: ocp.args.JsonSave(dict(metadata)),
                }
            ),
        )
    return os.path.join(os.path.abspath(directory), str(int(step)))


def flatten_json(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one flat dict with dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    if isinstance(tree, Mapping) and (tree or not prefix):
        out = {}
        for key, value in tree.items():
            out.update(flatten_json(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _check_metadata(stored: Mapping[str, Any], expected: Mapping[str, Any], step_dir: str) -> None:
    """Every key of `expected` (nested dicts compared entry by entry) must equal the stored value."""
    # A JSON round trip makes tuples lists etc., as they were stored.
    want = flatten_json(json.loads(json.dumps(dict(expected))))
    have = flatten_json(dict(stored))
    missing = object()
    diffs = []
    for key, value in want.items():
        got = have.get(key, missing)
        if got != value:
            shown = "<absent>" if got is missing else json.dumps(got)
            diffs.append(f"  {key}: checkpoint has {shown}, this run has {json.dumps(value)}")
    if diffs:
        listed = _listed(diffs)
        raise CheckpointMismatchError(
            f"Checkpoint {step_dir} was written by a different configuration:\n{listed}\n"
            "Fix: use a fresh --workdir for this config, or rerun with the config that wrote this workdir."
        )


def _listed(lines: list[str]) -> str:
    """The first `_MAX_LISTED` problem lines, and how many more there are."""
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return "\n".join(lines[:_MAX_LISTED]) + more


def _restore_target(leaf: Any) -> Any:
    """What orbax restores one leaf into: arrays keep their sharding, typed keys become their raw key data."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, np.generic):
        # orbax restores numpy scalars only as 0-d arrays.
        return np.asarray(leaf)
    return leaf


def _check_structure(stored_tree: PyTree, target: PyTree, step_dir: str) -> None:
    stored = {
        _path_str(p): tuple(getattr(m, "shape", ()) or ())
        for p, m in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
    }
    wanted = {_path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"  {k}: in this run's state, not in the checkpoint" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"  {k}: in the checkpoint, not in this run's state" for k in sorted(stored.keys() - wanted.keys())]
    problems += [
        f"  {k}: checkpoint shape {stored[k]}, this run's shape {wanted[k]}"
        for k in sorted(wanted.keys() & stored.keys())
        if stored[k] != wanted[k]
    ]
    if problems:
        listed = _listed(problems)
        raise CheckpointMismatchError(
            f"Checkpoint {step_dir} does not fit this run's state (different model or optimiser layout):\n{listed}\n"
            "Fix: use a fresh --workdir for this config, or rerun with the config that wrote this workdir."
        )


def _corrupt(step_dir: str, steps: list[int], step: int, error: Exception) -> CheckpointCorruptError:
    others = [s for s in steps if s != step]
    fallback = (
        f"move or delete {step_dir} to resume from step {max(others)}"
        if others
        else "delete the checkpoint directory to start afresh"
    )
    # tensorstore appends a multi-kilobyte spec to its errors; the head says what failed.
    detail = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
    return CheckpointCorruptError(
        f"Checkpoint {step_dir} is unreadable ({type(error).__name__}: {detail}). Fix: {fallback}, or use a fresh --workdir."
    )


def restore_checkpoint(
    directory: os.PathLike | str,
    target: PyTree,
    *,
    expected_metadata: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> tuple[PyTree, dict[str, Any]] | None:
    """Restores step `step` (default: the newest) into the structure, dtypes and shardings of `target`.

    Returns `(state, metadata)`, or None when `directory` holds no checkpoint at all. `expected_metadata`: every key
    given (nested dicts compared entry by entry) must equal the stored metadata, else `CheckpointMismatchError`;
    keys it omits are not compared. A requested `step` that does not exist raises `CheckpointError`.
    """
    if not os.path.isdir(directory):
        if step is None:
            return None
        raise CheckpointError(f"No checkpoint directory {os.path.abspath(directory)} (asked for step {step}).")
    with _manager(directory) as manager:
        steps = list(manager.all_steps())
        if step is None:
            if not steps:
                return None
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(
                f"No checkpoint step {step} in {os.path.abspath(directory)}; available steps: {sorted(steps) or 'none'}."
            )
        step_dir = os.path.join(os.path.abspath(directory), str(step))
        try:
            stored_metadata = manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[
                _METADATA
            ]
            stored_tree = manager.item_metadata(step)[_STATE].tree
        except Exception as e:  # noqa: BLE001  (any failure to read a finished step is reported as corruption)
            raise _corrupt(step_dir, steps, step, e) from e
        if not isinstance(stored_metadata, dict) or stored_tree is None:
            raise _corrupt(step_dir, steps, step, ValueError("metadata or state tree missing"))
        if expected_metadata is not None:
            _check_metadata(stored_metadata, expected_metadata, step_dir)
        restore_target = jax.tree.map(_restore_target, target)
        _check_structure(stored_tree, restore_target, step_dir)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(restore_target)})
            )[_STATE]
        except Exception as e:  # noqa: BLE001
            raise _corrupt(step_dir, steps, step, e) from e

    def rewrap(target_leaf: Any, leaf: Any) -> Any:
        if _is_key(target_leaf):
            return jax.random.wrap_key_data(leaf, impl=_key_impl(target_leaf))
        if isinstance(target_leaf, np.generic):
            return type(target_leaf)(leaf)
        return leaf

    return jax.tree.map(rewrap, target, restored), stored_metadata


@contextlib.contextmanager
def install_sigterm_handler(callback: Callable[[int], None] | None = None) -> Iterator[Callable[[], bool]]:
    """Within the block SIGTERM only sets a flag; yields `should_stop()`, which the loop polls to save and exit.

    `callback(signum)`, if given, runs inside the signal handler: keep it trivial (e.g. a log line) and never save a
    checkpoint from it, since the handler can interrupt the loop in the middle of an update. The previous handler
    is restored on exit. Must be entered from the main thread (a Python rule for signal handlers).
    """
    stop = False

    def handler(signum: int, frame: Any) -> None:
        del frame
        nonlocal stop
        stop = True
        if callback is not None:
            callback(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError as e:
        raise RuntimeError(f"install_sigterm_handler must be used from the main thread ({e}).") from None
    try:
        yield lambda: stop
    finally:
        signal.signal(signal.SIGTERM, previous)
