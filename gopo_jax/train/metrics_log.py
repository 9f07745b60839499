"""What a training run leaves in its workdir besides checkpoints: metrics, progress, summary, plots, config.

- `MetricsLogger`: one JSON object per `log` call appended to `metrics.jsonl` (`step`, `time`, `<prefix>/<name>`
  metrics), TensorBoard scalars under `tb/`, and a console progress line with rate, ETA and headline numbers on
  stderr. A resumed run calls `truncate_after(restored_step)` so the log holds each step once.
- `write_summary` -> `summary.json`; `plot_curves` -> PNG learning curves read back from `metrics.jsonl`;
  `save_config` -> `config.json` plus `config.py`, a `get_config()` that rebuilds the resolved config.

Non-finite metric values are written as JSON null (with one warning per key), never as NaN/Infinity, so every
line stays standard JSON. Files other than the append-only log are replaced atomically.
"""

import datetime
import json
import math
import os
import pprint
import sys
import time
import warnings
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
# Headline numbers shown on the console line when the caller does not choose them.
_DEFAULT_HEADLINE_COUNT = 4


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _scalar(name: str, value: Any) -> int | float:
    """A metric as a Python number; numpy/jax scalars and 0-d or size-1 arrays are accepted."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001  (anything not array-like is reported below)
        array = None
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"metric {name!r} must be a number, got {type(value).__name__} {value!r:.80}; log scalars only "
            "(reduce arrays first, e.g. with .mean())."
        )
    if np.issubdtype(array.dtype, np.integer):
        return int(array.reshape(()))
    return float(array.reshape(()))


def _read_records(path: str) -> list[dict[str, Any]]:
    """The parseable lines of a metrics log; a torn last line (a kill mid-write) is dropped with a warning."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: unreadable line dropped: {line[:80]!r}")
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                warnings.warn(f"{path}:{number}: line without an integer 'step' dropped.")
    return records


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class MetricsLogger:
    """Writes `metrics.jsonl`, TensorBoard scalars and a console progress line for one run in `workdir`.

    `headline`: names shown on the console line (`"tse"` matches `train/tse` and `eval/tse`; `"eval/tse"` only
    itself); default: the first few metrics of each call.
    """

    def __init__(
        self,
        workdir: os.PathLike | str,
        *,
        total_steps: int,
        tensorboard: bool = True,
        console: bool = True,
        headline: Sequence[str] | None = None,
    ):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.total_steps = int(total_steps)
        self._console = console
        self._headline = None if headline is None else tuple(headline)
        self._tensorboard = tensorboard
        # Opened at the first scalar, so a resumed run's truncate_after does not leave an empty extra event file.
        self._writer = None
        self._file = open(self.path, "a")
        self._warned: set[str] = set()
        # Rate and ETA come from this process's own progress, so a resumed run's clock starts at its first log.
        self._first: tuple[int, float] | None = None
        self._progress_pending = False

    def _open_writer(self, purge_step: int | None = None):
        import tensorboardX  # noqa: PLC0415  (only runs that ask for TensorBoard pay for the import)

        # Event files are named by the second; the suffix keeps a quickly restarted run from overwriting the last one.
        return tensorboardX.SummaryWriter(
            os.path.join(self.workdir, TB_DIR), purge_step=purge_step, filename_suffix=f".{time.time_ns()}"
        )

    def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        """Appends `{"step", "time", "<prefix>/<name>": value, ...}` to metrics.jsonl, TensorBoard and the console."""
        step = int(step)
        now = time.time()
        record: dict[str, Any] = {"step": step, "time": now}
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            number = _scalar(name, value)
            if not math.isfinite(number):
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"metric {name} is {number} at step {step}; logged as null (not warned again for this key)."
                    )
                number = None
            record[name] = number
            if number is not None and self._tensorboard:
                if self._writer is None:
                    self._writer = self._open_writer()
                self._writer.add_scalar(name, number, step)
        self._file.write(json.dumps(record) + "\n")
        # Flushed per line so a killed run loses at most the line being written.
        self._file.flush()
        if self._first is None:
            self._first = (step, now)
        if self._console:
            self._print(step, now, record, train=prefix == "train")

    def _headline_items(self, record: Mapping[str, Any]) -> list[tuple[str, Any]]:
        names = [k for k in record if k not in ("step", "time")]
        if self._headline is None:
            return [(k, record[k]) for k in names[:_DEFAULT_HEADLINE_COUNT]]
        return [(k, record[k]) for k in names if any(k == h or k.endswith("/" + h) for h in self._headline)]

    def _print(self, step: int, now: float, record: Mapping[str, Any], *, train: bool) -> None:
        first_step, first_time = self._first
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.0f}%)"]
        if step > first_step and now > first_time:
            rate = (step - first_step) / (now - first_time)
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"ETA {_format_duration(max(self.total_steps - step, 0) / rate)}")
        for name, value in self._headline_items(record):
            parts.append(f"{name} {'nan' if value is None else format(value, '.4g')}")
        line = " | ".join(parts)
        stream = sys.stderr
        if stream.isatty() and train:
            # One progress line rewritten in place; other prefixes (eval) print below it and stay visible.
            stream.write("\r" + line + "\x1b[K")
            self._progress_pending = True
        else:
            if self._progress_pending:
                stream.write("\n")
                self._progress_pending = False
            stream.write(line + "\n")
        stream.flush()

    def records(self, up_to: int) -> list[dict[str, Any]]:
        """The logged records with step <= `up_to`, as written to metrics.jsonl."""
        self._file.flush()
        return [r for r in _read_records(self.path) if r["step"] <= up_to]

    def truncate_after(self, step: int) -> None:
        """Drops logged lines with step > `step` (a resumed run restarts there) and TensorBoard events past it."""
        self._file.close()
        kept = [r for r in _read_records(self.path) if r["step"] <= step]
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        if self._tensorboard:
            if self._writer is not None:
                self._writer.close()
            # tensorboardX's purge_step makes TensorBoard discard earlier events with step >= purge_step.
            self._writer = self._open_writer(purge_step=step + 1)

    def close(self) -> None:
        """Flushes and closes the log and TensorBoard files and ends the console line."""
        if self._progress_pending:
            sys.stderr.write("\n")
            self._progress_pending = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _jsonable(value: Any, where: str) -> Any:
    """Nested dicts/lists of numbers (numpy/jax included) as plain JSON; non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if hasattr(value, "shape") and np.ndim(value) > 0:
        return _jsonable(np.asarray(value).tolist(), where)
    number = _scalar(where, value)
    if not math.isfinite(number):
        warnings.warn(f"summary value {where} is {number}; written as null.")
        return None
    return number


def write_summary(workdir: os.PathLike | str, summary: Mapping[str, Any]) -> str:
    """Writes the final evaluation `summary` (nested dicts of numbers/strings/arrays) as workdir/summary.json."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.fspath(workdir), SUMMARY_FILE)
    _write_atomic(path, json.dumps(_jsonable(summary, "summary"), indent=2) + "\n")
    return path


def _series(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every logged column that is `key` or ends in `/key`, as (steps, values); a re-logged step keeps its last value."""
    columns = sorted(
        {c for r in records for c in r if c not in ("step", "time") and (c == key or c.endswith("/" + key))}
    )
    out = {}
    for column in columns:
        points = {r["step"]: r[column] for r in records if r.get(column) is not None}
        if points:
            steps = sorted(points)
            out[column] = (steps, [points[s] for s in steps])
    return out


def plot_curves(
    workdir: os.PathLike | str,
    keys: Sequence[str] | Mapping[str, Sequence[str]],
) -> list[str]:
    """PNG learning curves from workdir/metrics.jsonl; returns the paths written.

    `keys`: metric names, one subplot each, drawn into `curves.png`; every prefix logged under a name becomes one
    line in its subplot (`"kl"` draws `train/kl` and `eval/kl`). A mapping `{"file_stem": [names]}` writes one PNG
    per group. Names never logged are skipped with a warning.
    """
    # The Agg canvas is used directly, so plotting neither needs a display nor changes pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415  (matplotlib is slow to import)
    from matplotlib.figure import Figure  # noqa: PLC0415

    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"plot_curves: no {path}; log metrics with MetricsLogger({os.fspath(workdir)!r}) first."
        )
    records = _read_records(path)
    groups = {"curves": list(keys)} if not isinstance(keys, Mapping) else {k: list(v) for k, v in keys.items()}
    written = []
    for stem, names in groups.items():
        panels = []
        for name in names:
            series = _series(records, name)
            if series:
                panels.append((name, series))
            else:
                warnings.warn(f"plot_curves: no logged values for {name!r} in {path}; its plot is skipped.")
        if not panels:
            continue
        ncols = min(2, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(5.5 * ncols, 3.5 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (name, series) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            for column, (steps, values) in series.items():
                label = column[: -len(name) - 1] if column.endswith("/" + name) else column
                # Evaluations are sparse, so their points are marked.
                ax.plot(steps, values, label=label or column, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        out = os.path.join(os.fspath(workdir), f"{stem}.png")
        fig.savefig(out, dpi=100)
        written.append(out)
    return written


class _Literal:
    """A value whose repr is the given Python source (for non-finite floats in config.py)."""

    def __init__(self, source: str):
        self.source = source

    def __repr__(self) -> str:
        return self.source


def _py_literal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _py_literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_py_literal(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return _Literal(f"float({str(value)!r})")
    return value


def save_config(workdir: os.PathLike | str, config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """Writes the resolved run config as workdir/config.json and workdir/config.py; returns the JSON path.

    config.py defines `get_config()`, so `--config <workdir>/config.py` reruns with exactly this config (when the
    values are Python literals, as in this codebase's configs).
    """
    if isinstance(config, ml_collections.FrozenConfigDict):
        config = config.as_configdict()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(os.fspath(workdir), "config.json")
    _write_atomic(json_path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    source = (
        '"""Resolved config of this run, written by gopo_jax.train.metrics_log.save_config."""\n'
        "import ml_collections\n\n\n"
        "def get_config():\n"
        "  return ml_collections.ConfigDict(\n"
        + "\n".join("      " + line for line in pprint.pformat(_py_literal(config.to_dict()), width=100).splitlines())
        + ")\n"
    )
    _write_atomic(os.path.join(os.fspath(workdir), "config.py"), source)
    return json_path
