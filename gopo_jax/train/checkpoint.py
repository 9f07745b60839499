"""Checkpoints of a training run: orbax-checkpoint behind `save_checkpoint` / `restore_checkpoint`.

A checkpoint is one step directory `<directory>/<step>/` with two items: `state` (any pytree of jax/numpy arrays and
Python scalars: both agents' parameters, optimiser state, multiplier, step, PRNG keys, data position) and
`metadata` (a JSON dict: model configs, config fingerprint, ...). Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it into place only when complete, so a crash or `kill -9` mid-save
leaves a temporary directory that is never listed or restored (and is removed by the next save); `keep` bounds
how many finished steps stay on disk.

Restoring goes INTO a target pytree (concrete arrays or `jax.ShapeDtypeStruct`s with shardings), so arrays come
back with the target's structure, dtypes and shardings. Before orbax touches the data, the stored metadata and
tree are compared with what the caller expects, so a different model config or a changed state layout raises one
`CheckpointMismatchError` that names the differing keys / leaves and the fix, not an orbax traceback.

Damaged checkpoints: a finished step whose files cannot be read (truncated, zeroed or garbled files, a missing
item, a step directory copied only in part) is skipped when resuming (no `step` given): each skipped step is
logged as a warning naming its directory and the cause, the newest readable older step is restored, and the
skipped directories are renamed to `<step>.corrupt-<time>`. The resumed run repeats the lost steps exactly (the
driver truncates its metric log to the restored step), so only their compute is lost. An explicitly requested
step that is unreadable, or a directory where no step is readable, raises `CheckpointCorruptError` and moves
nothing. Not detected: a flipped bit inside compressed array data (orbax stores array chunks without checksums).

A save that fails on the filesystem (full disk or quota, permissions) raises `CheckpointWriteError`; its
unfinished temporary directory is removed and the steps saved before stay as they were.

Typed PRNG keys (`jax.random.key`) are stored as their raw key data and re-wrapped with the target's key
implementation on restore.

`install_sigterm_handler` turns SIGTERM into a flag the train loop polls, so the loop itself saves and exits.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_log = logging.getLogger(__name__)

_STATE = "state"
_METADATA = "metadata"
# How many differing leaves an error message lists before summarising the rest.
_MAX_LISTED = 8
# What a write fails with when the filesystem has no room for it (EFBIG: a file-size limit, `ulimit -f`).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# tensorstore raises ValueError, not OSError, and names the OS error only in its message.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says which and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a different config or for a differently shaped state."""


class CheckpointCorruptError(CheckpointError):
    """A finished checkpoint step whose files cannot be read."""


class CheckpointWriteError(CheckpointError):
    """A save failed on the filesystem (no room, no permission); the steps saved before it are untouched."""


class _UnreadableStep(Exception):
    """One step's files cannot be read; the message is the cause in one line, `__cause__` the original error."""


def _manager(directory: os.PathLike | str, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # Synchronous: when save_checkpoint returns, the step is final on disk (the loop may exit right after).
        enable_async_checkpointing=False,
        # Leftovers of a save killed mid-way are never restored; removing them only reclaims space. Only the saving
        # manager does it: a reader (a server, an export) next to a running trainer would delete its save in progress.
        cleanup_tmp_directories=keep is not None,
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
    is deterministic, so the state of a step is a function of the step) and its path is returned. A failure to write
    (full disk or quota, permissions) raises `CheckpointWriteError`, with the steps saved before left intact.
    """
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}.")
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}.")
    _check_json(metadata)
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    previous = None
    try:
        with _manager(directory, keep) as manager:
            previous = manager.latest_step()
            manager.save(
                int(step),
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _METADATA: ocp.args.JsonSave(dict(metadata)),
                    }
                ),
            )
    except Exception as e:  # noqa: BLE001  (filesystem failures become one clear error; anything else is a bug)
        code = _os_error_code(e)
        if code is None:
            raise
        raise _write_error(directory, int(step), previous, code) from e
    return os.path.join(os.path.abspath(directory), str(int(step)))


def _os_error_code(error: BaseException | None) -> int | None:
    """The errno behind a failed save: of an OSError in the exception chain, or as tensorstore's message gives it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        if match := _TENSORSTORE_OS_ERROR.search(str(error)):
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _write_error(directory: os.PathLike | str, step: int, previous: int | None, code: int) -> CheckpointWriteError:
    directory = os.path.abspath(directory)
    # The half-written step is never restored, but on a full disk its space is what the run needs to write its
    # logs on the way out; the next save would delete it anyway.
    if jax.process_index() == 0:
        for unfinished in ocp.path.step.all_temporary_paths(directory):
            shutil.rmtree(unfinished.get(), ignore_errors=True)
    if code in _NO_ROOM:
        cause = f"the disk or quota is full ({os.strerror(code)})"
        fix = "free space on that disk (or raise the quota / `ulimit -f`)"
    else:
        cause = os.strerror(code)
        fix = f"make {directory} writable"
    if previous is None:
        kept = "No earlier checkpoint was saved there"
        resume = "it starts afresh"
    else:
        kept = f"The previous checkpoint, step {previous}, is intact"
        resume = f"it resumes from step {previous}"
    return CheckpointWriteError(
        f"Checkpoint step {step} could not be written to {directory}: {cause}. {kept}; the unfinished save was "
        f"removed. Fix: {fix}, then rerun the same command ({resume})."
    )


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


def _sharding(leaf: Any) -> jax.sharding.Sharding:
    # An abstract leaf without a sharding (a `jax.eval_shape` result) lands where a fresh array would, on the
    # default device. Left None, orbax would fall back to the sharding saved with the step, which names the devices
    # of the process that wrote it: a step saved over 8 devices could not be read by a process that has one.
    sharding = getattr(leaf, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _restore_target(leaf: Any) -> Any:
    """What orbax restores one leaf into: arrays keep their sharding, typed keys become their raw key data."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_sharding(leaf))
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding(leaf))
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


def _unreadable(error: Exception, step_dir: str) -> _UnreadableStep:
    # tensorstore appends a multi-kilobyte spec to its errors; the head says what failed. Paths inside the step
    # directory are shown relative to it (the message names the directory already), so the failing file fits.
    detail = (str(error).splitlines() or [""])[0].split(" [tensorstore_spec")[0].replace(step_dir + os.sep, "")
    return _UnreadableStep(f"{type(error).__name__}: {detail[:400]}")


def _restore_step(
    manager: ocp.CheckpointManager,
    step: int,
    step_dir: str,
    target: PyTree,
    expected_metadata: Mapping[str, Any] | None,
) -> tuple[PyTree, dict[str, Any]]:
    """`restore_checkpoint` of one step; `_UnreadableStep` when its files cannot be read."""
    try:
        stored_metadata = manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[
            _METADATA
        ]
        stored_tree = manager.item_metadata(step)[_STATE].tree
    except Exception as e:  # noqa: BLE001  (any failure to read a finished step is reported as corruption)
        raise _unreadable(e, step_dir) from e
    if not isinstance(stored_metadata, dict) or stored_tree is None:
        raise _UnreadableStep("metadata or state tree missing")
    if expected_metadata is not None:
        _check_metadata(stored_metadata, expected_metadata, step_dir)
    restore_target = jax.tree.map(_restore_target, target)
    _check_structure(stored_tree, restore_target, step_dir)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(restore_target)})
        )[_STATE]
    except Exception as e:  # noqa: BLE001
        raise _unreadable(e, step_dir) from e

    def rewrap(target_leaf: Any, leaf: Any) -> Any:
        if _is_key(target_leaf):
            return jax.random.wrap_key_data(leaf, impl=_key_impl(target_leaf))
        if isinstance(target_leaf, np.generic):
            return type(target_leaf)(leaf)
        return leaf

    return jax.tree.map(rewrap, target, restored), stored_metadata


def _set_aside(step_dirs: list[str], restored_step: int) -> None:
    """Renames the unreadable steps skipped on the way to `restored_step` to `<step>.corrupt-<time>`.

    Left in place, an unreadable step would stay the newest one orbax lists, and orbax skips every save at a step
    up to the newest listed one: the resumed run would not checkpoint again until it passed that step, and each
    resume would fall back past it again. Renamed rather than deleted, so the damaged files remain to inspect
    (orbax neither lists nor cleans up the new name). Only after a readable step was found: when every step fails
    the cause may be this process (memory, devices) rather than the files, and nothing is moved.
    """
    if jax.process_index() != 0:  # one process renames; the others read the same shared directory
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step_dir in step_dirs:
        aside = f"{step_dir}.corrupt-{stamp}"
        try:
            os.rename(step_dir, aside)
        except OSError as e:
            _log.warning(
                "Could not move the unreadable checkpoint %s aside (%s); until it is removed, saves at its step "
                "or below are skipped and every resume falls back past it.", step_dir, e,
            )
        else:
            _log.warning("Resumed from step %d; moved the unreadable %s to %s.", restored_step, step_dir, aside)


def restore_checkpoint(
    directory: os.PathLike | str,
    target: PyTree,
    *,
    expected_metadata: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> tuple[PyTree, dict[str, Any]] | None:
    """Restores step `step` (default: the newest readable one) into the structure, dtypes and shardings of `target`.

    Returns `(state, metadata)`, or None when `directory` holds no checkpoint at all. `expected_metadata`: every key
    given (nested dicts compared entry by entry) must equal the stored metadata, else `CheckpointMismatchError`;
    keys it omits are not compared. A requested `step` that does not exist raises `CheckpointError`, one that cannot
    be read `CheckpointCorruptError`. Without `step`, unreadable newer steps are skipped with a warning each and
    moved aside (see the module docstring); `CheckpointCorruptError` when no step is readable.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        if step is None:
            return None
        raise CheckpointError(f"No checkpoint directory {directory} (asked for step {step}).")
    skipped: list[tuple[str, str]] = []
    with _manager(directory) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"No checkpoint step {step} in {directory}; available steps: {sorted(steps) or 'none'}."
                )
            step_dir = os.path.join(directory, str(step))
            try:
                return _restore_step(manager, step, step_dir, target, expected_metadata)
            except _UnreadableStep as e:
                others = sorted(s for s in steps if s != step)
                raise CheckpointCorruptError(
                    f"Checkpoint {step_dir} is unreadable ({e}). Fix: restore one of the other steps "
                    f"({others or 'none'}), or move {step_dir} aside."
                ) from e.__cause__
        if not steps:
            return None
        for candidate in steps:
            step_dir = os.path.join(directory, str(candidate))
            try:
                restored = _restore_step(manager, candidate, step_dir, target, expected_metadata)
                break
            except _UnreadableStep as e:
                _log.warning("Checkpoint %s is unreadable (%s); skipping it.", step_dir, e)
                skipped.append((step_dir, str(e)))
        else:
            listed = _listed([f"  {step_dir}: {cause}" for step_dir, cause in skipped])
            raise CheckpointCorruptError(
                f"No checkpoint in {directory} is readable:\n{listed}\n"
                "Fix: move these step directories aside to start afresh, or use a fresh --workdir."
            )
    _set_aside([step_dir for step_dir, _ in skipped], candidate)
    return restored


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
