"""What a training run leaves in its workdir besides checkpoints: metrics, progress, summary, plots, config.

- `MetricsLogger`: one JSON object per `log` call appended to `metrics.jsonl` (`step`, `time`, `<prefix>/<name>`
  metrics), TensorBoard scalars under `tb/`, optionally the same scalars in a Weights & Biases run
  (`WandbSettings`), and progress on stderr: on a terminal one rich progress bar per phase of the run with its
  rate, ETA and headline numbers; elsewhere (a pipe, a CI log, pytest's capture) plain lines, never cursor
  movement. A resumed run calls `truncate_after(restored_step)` so the log holds each step once.
- `write_summary` -> `summary.json`; `plot_curves` -> PNG learning curves read back from `metrics.jsonl`;
  `save_config` -> `config.json` plus `config.py`, a `get_config()` that rebuilds the resolved config.

Non-finite metric values are written as JSON null (with one warning per key), never as NaN/Infinity, so every
line stays standard JSON. Files other than the append-only log are replaced atomically.
"""

import dataclasses
import datetime
import json
import logging
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
# The W&B run id of a workdir, so that a resumed run keeps logging to the same W&B run.
WANDB_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline")
# Headline numbers shown on the console when the caller does not choose them.
_DEFAULT_HEADLINE_COUNT = 4
# Without a terminal, a phase's progress is printed at its first and last step and at most this often in between:
# a CI log gets a heartbeat, not a line per step.
PLAIN_LINE_EVERY_S = 30.0
# Log calls this close to the first of a burst count as one progress sample (see `_Rate`).
_BURST_S = 0.05


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


def _format_items(items: Sequence[tuple[str, Any]]) -> str:
    return " | ".join(f"{name} {'nan' if value is None else format(value, '.4g')}" for name, value in items)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream (pytest's capture at exit)
        return False


class _Rate:
    """Steps per second of one phase in this process, from its progress updates.

    The records of one device call (an SFT block's steps) are logged back to back: measured from the first of them,
    the others would count as done in no time. So updates within `_BURST_S` of the first of a burst are one sample,
    at its end, and the rate is measured from the end of the first burst (which also leaves out the compilation).
    """

    def __init__(self):
        self._burst_start: float | None = None
        self._bursts = 0
        self._first: tuple[float, int] | None = None  # (time, steps done) at the end of the first burst
        self._last: tuple[float, int] | None = None

    def update(self, now: float, done: int) -> None:
        if self._burst_start is None or now - self._burst_start >= _BURST_S:
            self._burst_start = now
            self._bursts += 1
        self._last = (now, done)
        if self._bursts == 1:
            self._first = self._last

    def per_second(self) -> float | None:
        if self._bursts < 2:
            return None
        (t0, done0), (t1, done1) = self._first, self._last
        return (done1 - done0) / (t1 - t0) if t1 > t0 and done1 > done0 else None


@dataclasses.dataclass
class _Phase:
    """Steps (start, end] of the run, shown as one bar."""

    name: str
    start: int
    end: int
    task: int  # its rich task
    rate: _Rate = dataclasses.field(default_factory=_Rate)
    printed: bool = False  # whether a plain line showed its progress yet

    @property
    def steps(self) -> int:
        return self.end - self.start


def _stream_handlers() -> list[logging.StreamHandler]:
    """The root logger's stream handlers, absl's included (it wraps one as `python_handler`)."""
    handlers = (getattr(h, "python_handler", h) for h in logging.getLogger().handlers)
    return [h for h in handlers if isinstance(h, logging.StreamHandler)]


class _ConsoleProgress:
    """The console side of a `MetricsLogger` (stderr): one rich bar per phase on a terminal, plain lines elsewhere.

    Bars are drawn when rich finds an interactive terminal (not TERM=dumb), and only on a real one: FORCE_COLOR, which
    some CI systems set, asks for colour, not for a display redrawn in place. TTY_INTERACTIVE=1 or 0 (rich's switch)
    forces either. Without bars a phase's progress is a plain line at its first and last step and at most every
    `PLAIN_LINE_EVERY_S` in between. Evaluation records print a line that stays (above the bars) in both modes.
    """

    def __init__(self, phases: Sequence[tuple[str, int]], total_steps: int):
        # Only a run that shows progress pays for the import.
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column  # noqa: PLC0415

        self.console = Console(stderr=True)
        if "TTY_INTERACTIVE" not in os.environ:
            self.console.is_interactive = self.console.is_interactive and _isatty(sys.stderr)
        self.live = self.console.is_interactive
        self.total_steps = total_steps
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            # The headline numbers take the width the other columns leave, cut short rather than wrapped.
            TextColumn("{task.fields[headline]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console,
            disable=not self.live,
            refresh_per_second=2,
            expand=True,
        )
        self._phases: list[_Phase] = []
        start = 0
        for name, steps in phases:
            if steps > 0:
                task = self._progress.add_task(name, total=steps, start=False, rate="", eta="", headline="")
                self._phases.append(_Phase(name, start, start + steps, task))
            start += steps
        self._last_line = -math.inf
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []
        self.resume(0)
        if self.live:
            stderr = sys.stderr
            self._progress.start()
            # rich prints what goes to sys.stderr above the bars, but a logging handler writes to the stream it was
            # given (basicConfig's and absl's: the real stderr), which would land inside them; so while the bars show,
            # such handlers write to rich's stream.
            if sys.stderr is not stderr:
                for handler in _stream_handlers():
                    if handler.stream is stderr:
                        handler.setStream(sys.stderr)
                        self._rerouted.append((handler, stderr))

    def _phase_of(self, step: int) -> _Phase | None:
        for phase in self._phases:
            if step <= phase.end:
                return phase
        return self._phases[-1] if self._phases else None

    def resume(self, step: int) -> None:
        """Every bar at `step`: the phases before it full, the one after it started now, its rate measured anew."""
        for phase in self._phases:
            done = min(max(step - phase.start, 0), phase.steps)
            self._progress.reset(phase.task, completed=done, start=phase.start <= step < phase.end, rate="", eta="",
                                 headline="")
            phase.rate, phase.printed = _Rate(), False

    def show(self, step: int, now: float, items: Sequence[tuple[str, Any]], *, evaluation: bool) -> None:
        """An evaluation's line, or `step`'s record on its phase's bar (a plain line now and then without bars)."""
        phase = self._phase_of(step)
        if evaluation or phase is None:
            self._print(" | ".join(filter(None, [f"step {step}/{self.total_steps}", _format_items(items)])))
            return
        done = min(max(step - phase.start, 0), phase.steps)
        phase.rate.update(now, done)
        rate = phase.rate.per_second()
        fields = {"rate": "" if rate is None else f"{rate:.2f} steps/s",
                  "eta": "" if rate is None or done == phase.steps else
                  f"ETA {_format_duration((phase.steps - done) / rate)}",
                  "headline": _format_items(items)}
        self._progress.update(phase.task, completed=done, **fields)
        if done == phase.steps:
            later = self._phases.index(phase) + 1
            if later < len(self._phases):
                self._progress.start_task(self._phases[later].task)
        if not self.live and (not phase.printed or done == phase.steps or now - self._last_line >= PLAIN_LINE_EVERY_S):
            self._print(" | ".join([f"{phase.name} {done}/{phase.steps} ({100 * done // phase.steps}%)",
                                    *filter(None, fields.values())]))
            phase.printed, self._last_line = True, now

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
        self._progress.stop()


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """A Weights & Biases run beside TensorBoard: `project`, `entity` ("" = the account's default), `mode` ("online",
    or "offline": written under the workdir for a later `wandb sync`) and the run `config` it records."""

    project: str
    entity: str = ""
    mode: str = "online"
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"bad config: log.wandb_mode must be one of {WANDB_MODES}, got {self.mode!r}")
        if not self.project:
            raise ValueError("bad config: log.wandb_project is empty; name the W&B project the runs go to")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "WandbSettings | None":
        """The settings of a config's `log.wandb*` keys, recording the whole config; None when `log.wandb` is off."""
        log = config.log
        if not log.wandb:
            return None
        return cls(project=log.wandb_project, entity=log.wandb_entity, mode=log.wandb_mode, config=config.to_dict())


def _import_wandb():
    try:
        import wandb  # noqa: PLC0415  (optional: only runs that ask for W&B import it)
    except ModuleNotFoundError as e:
        if e.name != "wandb":
            raise
        raise ValueError("log.wandb=True needs the wandb package, which is not installed: pip install wandb "
                         "(or set log.wandb=False)") from None
    return wandb


class _WandbRun:
    """The workdir's W&B run. Its id is kept in workdir/wandb_run_id, so a resumed workdir continues the same run."""

    def __init__(self, workdir: str, settings: WandbSettings):
        wandb = _import_wandb()
        id_path = os.path.join(workdir, WANDB_ID_FILE)
        run_id = None
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        self._run = wandb.init(project=settings.project, entity=settings.entity or None, mode=settings.mode,
                               config=dict(settings.config), id=run_id, resume="allow", dir=workdir,
                               # the seeds of a vmapped seed group each have a run, open at the same time
                               reinit="create_new")
        if run_id is None:
            _write_atomic(id_path, self._run.id + "\n")
        # A resumed W&B run already holds the steps the stopped process logged after its last checkpoint. W&B ignores
        # steps below its current one (with a warning each time) and the resumed run logs the same values again
        # (resumption is exact), so those steps are skipped here.
        self._first_new_step = self._run.step

    def log(self, step: int, scalars: Mapping[str, int | float]) -> None:
        if step >= self._first_new_step:
            self._run.log(dict(scalars), step=step)

    def finish(self, *, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


class MetricsLogger:
    """Writes `metrics.jsonl`, TensorBoard scalars (and a W&B run) and shows progress for one run in `workdir`.

    `phases`: (name, steps) of the run's phases in order, adding up to `total_steps`, one progress bar each (default:
    one); a phase of 0 steps has none. `headline`: names shown with the progress (`"tse"` matches `train/tse` and
    `eval/tse`; `"eval/tse"` only itself); default: the first few metrics of each call. Records logged under
    `evaluation_prefixes` (for `prefix=""`, their names' first part) print a line that stays; the others move their
    phase's bar. `wandb`: also log the scalars to Weights & Biases (the `wandb` package is imported only then).
    """

    def __init__(
        self,
        workdir: os.PathLike | str,
        *,
        total_steps: int,
        phases: Sequence[tuple[str, int]] | None = None,
        tensorboard: bool = True,
        console: bool = True,
        headline: Sequence[str] | None = None,
        evaluation_prefixes: Sequence[str] = ("eval",),
        wandb: WandbSettings | None = None,
    ):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.total_steps = int(total_steps)
        phases = [("steps", self.total_steps)] if phases is None else [(str(n), int(k)) for n, k in phases]
        if any(k < 0 for _, k in phases) or sum(k for _, k in phases) != self.total_steps:
            raise ValueError(f"MetricsLogger: the phases' steps {phases} must be >= 0 and add up to total_steps="
                             f"{self.total_steps}")
        self._headline = None if headline is None else tuple(headline)
        self._evaluation_prefixes = tuple(evaluation_prefixes)
        self._tensorboard = tensorboard
        # Opened at the first scalar, so a resumed run's truncate_after does not leave an empty extra event file.
        self._writer = None
        self._warned: set[str] = set()
        self._closed = False
        # First: a missing package or a refused login stops the run before anything else is opened.
        self._wandb = None if wandb is None else _WandbRun(self.workdir, wandb)
        self._file = open(self.path, "a")
        self._progress = _ConsoleProgress(phases, self.total_steps) if console else None

    def _open_writer(self, purge_step: int | None = None):
        import tensorboardX  # noqa: PLC0415  (only runs that ask for TensorBoard pay for the import)

        # Event files are named by the second; the suffix keeps a quickly restarted run from overwriting the last one.
        return tensorboardX.SummaryWriter(
            os.path.join(self.workdir, TB_DIR), purge_step=purge_step, filename_suffix=f".{time.time_ns()}"
        )

    def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        """Appends `{"step", "time", "<prefix>/<name>": value, ...}` to metrics.jsonl, TensorBoard, W&B and the
        console."""
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
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and v is not None}
        if scalars and self._tensorboard:
            if self._writer is None:
                self._writer = self._open_writer()
            for name, number in scalars.items():
                self._writer.add_scalar(name, number, step)
        if scalars and self._wandb is not None:
            self._wandb.log(step, scalars)
        self._file.write(json.dumps(record) + "\n")
        # Flushed per line so a killed run loses at most the line being written.
        self._file.flush()
        if self._progress is not None:
            # Records logged without a prefix (a cached warm start's) carry it in their names.
            group = prefix or next((k.split("/")[0] for k in record if k not in ("step", "time")), "")
            self._progress.show(step, now, self._headline_items(record),
                                evaluation=group in self._evaluation_prefixes)

    def _headline_items(self, record: Mapping[str, Any]) -> list[tuple[str, Any]]:
        names = [k for k in record if k not in ("step", "time")]
        if self._headline is None:
            return [(k, record[k]) for k in names[:_DEFAULT_HEADLINE_COUNT]]
        return [(k, record[k]) for k in names if any(k == h or k.endswith("/" + h) for h in self._headline)]

    def records(self, up_to: int) -> list[dict[str, Any]]:
        """The logged records with step <= `up_to`, as written to metrics.jsonl."""
        self._file.flush()
        return [r for r in _read_records(self.path) if r["step"] <= up_to]

    def truncate_after(self, step: int) -> None:
        """Drops logged lines with step > `step` (a resumed run restarts there) and TensorBoard events past it; the
        progress bars restart at `step`."""
        self._file.close()
        kept = [r for r in _read_records(self.path) if r["step"] <= step]
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        if self._tensorboard:
            if self._writer is not None:
                self._writer.close()
            # tensorboardX's purge_step makes TensorBoard discard earlier events with step >= purge_step.
            self._writer = self._open_writer(purge_step=step + 1)
        if self._progress is not None:
            self._progress.resume(step)

    def close(self, *, failed: bool = False) -> None:
        """Ends the progress display, closes the log and TensorBoard files and finishes the W&B run (marked failed
        with `failed`). Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(failed=failed)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, *exc_info: Any) -> None:
        self.close(failed=exc_type is not None)


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
