"""Kill points: `kill -9` a short training run at points drawn from a seed, rerun it on its workdir, and check that
every resumed run ends with bitwise the parameters of an uninterrupted run.

    python -m scripts.kill_points --points 10 --seed 0

One uninterrupted run of a tiny config (`TINY`) is the reference: its final parameter hash, its metrics and its
timeline, the events a run's workdir shows in order (each metrics.jsonl line, each checkpoint step's temporary
directory `<step>.orbax-checkpoint-tmp` appearing, each step directory appearing, summary.json) with the time of
each. A kill point is an interval of that timeline and a delay into it: a fresh run of the same command is watched
until it reaches the interval's first event, SIGKILLed the delay later, and the same command is rerun once to
completion. The points cycle through the phases a run spends its time in: SFT (the warm start's step blocks), GOPO
iterations, held-out evaluations, and checkpoint writes (from the temporary directory's appearance to the step
directory's); within its phase each point's interval and delay (a fraction of the reference's interval) come from
`--seed`. The table says, per point, where it aimed (`at`: the interval's index in reference_timeline.txt, written
beside the runs, and the delay), what the run was doing when it was killed (the reference's interval of the events
the killed run had completed), whether the kill landed (the process was still running), what the kill left
in checkpoints/, whether the rerun finished, and its final parameter hash (`report.params_hash` of the final
checkpoint's agents, which must be summary.json's `final_params_sha256`) against the reference's, and how its
metrics.jsonl compares with the reference's (`compare_metrics`). Exit status 1 when a rerun failed or a hash differs.

By default a warm-up run first fills the persistent compilation cache, so that the reference's timing, from which
the delays are drawn, is that of the runs it is compared with (they read their programs from the cache); its hash is
checked against the reference's too (a cold-compiled run against cache-loaded ones).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from gopo_jax import command_line

REPO = pathlib.Path(__file__).resolve().parents[1]
# The run every point repeats: test_resume's tiny model and GOPO, with three SFT blocks (a block is
# `schedule.SFT_HELDOUT_EVERY` = 25 steps; the metrics of a block appear at its end, so blocks 2 and 3 are SFT
# intervals of the timeline), a checkpoint after every iteration and evaluations after iterations 2 and 4.
SFT_STEPS = 75
TINY = ("--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.intermediate_size=64",
        f"--config.sft.steps={SFT_STEPS}", "--config.sft.episodes=32", "--config.sft.batch_size=8",
        "--config.train.steps=4", "--config.train.groups=2", "--config.train.group_size=2",
        "--config.train.minibatches=1", "--config.train.epochs=1", "--config.train.checkpoint_every=1",
        "--config.train.eval_every=2", "--config.eval.episodes=8", "--config.mesh.data=1")
PHASES = ("sft", "gopo", "eval", "checkpoint")  # what the drawn points interrupt, in turn
POLL_S = 0.002  # how often a watched run's workdir is looked at; a checkpoint write of the tiny run takes 0.1-0.5 s
# Intervals shorter than this in the reference (events written in one burst) are not drawn: a kill cannot aim there.
MIN_INTERVAL_S = 0.01
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # orbax 0.12.8's unfinished step directory

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Event:
    """Something a run's workdir shows: a metrics line (kind = its prefix: sft, sft_heldout, train, eval), a step's
    checkpoint write beginning (save) or finished (saved), or summary.json (summary); `time` in s since the start."""

    time: float
    kind: str
    step: int


class Watcher:
    """Polls one run's workdir and keeps its events in the order they happened. Lines of metrics.jsonl come before
    checkpoint changes seen in the same poll (the driver logs a step before it saves it); a step directory seen
    without its temporary directory (a write shorter than a poll) counts as both events."""

    def __init__(self, workdir: pathlib.Path, start: float):
        self.workdir, self.start = workdir, start
        self.events: list[Event] = []
        self._read = 0  # bytes of metrics.jsonl already turned into events
        self._writes: set[int] = set()
        self._saved: set[int] = set()

    def poll(self) -> int:
        """The number of events so far."""
        now = time.monotonic() - self.start
        self._metrics_lines(now)
        self._checkpoint_changes(now)
        if not any(e.kind == "summary" for e in self.events) and (self.workdir / "summary.json").exists():
            self.events.append(Event(now, "summary", 0))
        return len(self.events)

    def _metrics_lines(self, now: float) -> None:
        try:
            with open(self.workdir / "metrics.jsonl", "rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._read += len(complete)
        for line in complete.decode().splitlines():
            record = json.loads(line)
            kind = next((k.split("/")[0] for k in record if "/" in k), "metrics")
            self.events.append(Event(now, kind, record["step"]))

    def _checkpoint_changes(self, now: float) -> None:
        try:
            names = os.listdir(self.workdir / "checkpoints")
        except FileNotFoundError:
            return
        writing = {int(m.group(1)) for m in map(_TMP_STEP.match, names) if m}
        saved = {int(n) for n in names if n.isdigit()}
        for step in sorted((writing | saved) - self._writes):
            self._writes.add(step)
            self.events.append(Event(now, "save", step))
        for step in sorted(saved - self._saved):
            self._saved.add(step)
            self.events.append(Event(now, "saved", step))


@dataclasses.dataclass(frozen=True)
class Reference:
    """The uninterrupted run: final parameter hash, metrics (without times), timeline and wall time (s)."""

    params_hash: str
    metrics: list[dict]
    events: tuple[Event, ...]
    wall: float

    def span(self, i: int) -> tuple[float, float]:
        """Start and end time of interval i: from event i-1 (or the start) to event i (or the exit)."""
        start = self.events[i - 1].time if i > 0 else 0.0
        return start, self.events[i].time if i < len(self.events) else self.wall

    def phase(self, i: int) -> str:
        """What the run spends interval i on: the phase of the event that ends it."""
        if i == 0:
            return "start-up"
        if i == len(self.events):
            return "report"
        end = self.events[i]
        if end.kind in ("sft", "sft_heldout"):
            # A block's lines are written together at its end, after its held-out line: only the interval before
            # a block's first line is SFT steps, the others are the logging of the block.
            first_of_block = any(e.kind == "sft_heldout" and e.step == end.step - 1 for e in self.events[:i])
            return "sft" if first_of_block else "sft-log"
        return {"train": "gopo", "eval": "eval", "save": "pre-save", "saved": "checkpoint",
                "summary": "report"}[end.kind]

    def activity(self, i: int) -> str:
        """Interval i in words."""
        phase = self.phase(i)
        if phase in ("start-up", "sft"):
            block_end = next((e.step for e in self.events[i:] if e.kind == "sft_heldout"), SFT_STEPS)
            first = "start-up, SFT steps 1" if phase == "start-up" else f"SFT steps {self.events[i].step}"
            return f"{first}-{block_end}"
        if phase == "report":
            return "summary.json" if i < len(self.events) else "samples, plots, exit"
        step = self.events[i].step
        return {"sft-log": f"logging SFT step {step}", "gopo": f"GOPO iteration {step - SFT_STEPS} (step {step})",
                "eval": f"evaluation at step {step}", "pre-save": f"before checkpoint {step}",
                "checkpoint": f"writing checkpoint {step}"}[phase]

    def timeline(self) -> str:
        """One line per interval: its index (a point's `at`), start and length, phase and activity."""
        lines = []
        for i in range(len(self.events) + 1):
            start, end = self.span(i)
            lines.append(f"{i:>4}  {start:9.3f}s  +{end - start:.3f}s  {self.phase(i):<10}  {self.activity(i)}\n")
        return "".join(lines)

    def intervals(self, phase: str) -> list[int]:
        """The intervals of `phase` long enough to aim a kill at."""
        return [i for i in range(len(self.events) + 1)
                if self.phase(i) == phase and self.span(i)[1] - self.span(i)[0] >= MIN_INTERVAL_S]


@dataclasses.dataclass(frozen=True)
class Point:
    """Kill a fresh run `delay` s after it has shown `after` events (the start of the reference's interval
    `after`), meant to interrupt `phase`."""

    phase: str
    after: int
    delay: float


@dataclasses.dataclass(frozen=True)
class Outcome:
    point: Point
    landed: bool  # the process was still running when SIGKILL was sent
    killed_during: str  # the reference's interval of the events the killed run had completed
    left: str  # checkpoints/ as the kill left it
    resumed: bool  # the rerun finished with status 0 and a summary.json
    params_hash: str | None
    metrics: str | None  # metrics.jsonl of the resumed run against the reference's (`compare_metrics`)
    error: str = ""  # the rerun's error output, when it failed


def command(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "experiments.mgshop", "--config", "configs/mgshop.py", "--workdir", str(workdir),
            *TINY]


def environment(jax_cache: str) -> dict[str, str]:
    """The runs' environment: one CPU device (the tiny run's mesh), the repository importable and, unless
    `jax_cache` is "", a persistent compilation cache there (a warm cache cuts a tiny run from minutes to tens of
    seconds on 2 cores)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO))
    if jax_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(jax_cache).resolve()),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(workdir: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
    # The run's console output goes beside its workdir, for a post-mortem.
    with open(workdir.with_suffix(".log"), "a") as log:
        return subprocess.Popen(command(workdir), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    """Waits for `proc` to end; kills it when it outlives `timeout` or the wait is interrupted."""
    try:
        proc.wait(timeout=timeout)
    finally:
        _stop(proc)


def _log_tail(workdir: pathlib.Path, lines: int = 6) -> str:
    return "\n".join(workdir.with_suffix(".log").read_text(errors="replace").splitlines()[-lines:])


def final_params_hash(workdir: pathlib.Path) -> str:
    """`report.params_hash` of the agents' parameters in the run's newest checkpoint, read as stored (no world is
    built, so any process reads it, whatever its devices); it must equal summary.json's `final_params_sha256` (the
    hash of the parameters in memory at the end of the run), else the checkpoint and the summary disagree and this
    raises."""
    import orbax.checkpoint as ocp  # noqa: PLC0415  (JAX: only once a run has finished)

    from gopo_jax.train import checkpoint  # noqa: PLC0415
    from gopo_jax.train.report import params_hash  # noqa: PLC0415

    step = checkpoint.latest_step(workdir / "checkpoints")
    # The step's `state` item holds the driver's payload {"state": TrainState, "ref": ..., "iteration": ...}.
    stored = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").resolve())
    restored = params_hash(stored["state"]["params"])
    summarised = json.loads((workdir / "summary.json").read_text())["final_params_sha256"]
    if restored != summarised:
        raise RuntimeError(f"{workdir}: checkpoint {step}'s parameters hash to {restored[:12]}, summary.json says "
                           f"{summarised[:12]}")
    return restored


def compare_metrics(resumed: list[dict], reference: list[dict]) -> str:
    """"equal" (record for record, times aside); "+N dup" when the values are equal but N records are logged twice
    (later lines of a step and prefix replace earlier ones, as a reader of the log takes them); else "DIFFER"."""
    if resumed == reference:
        return "equal"

    def latest(records: list[dict]) -> dict:
        return {(r["step"], *sorted({k.split("/")[0] for k in r if "/" in k})): r for r in records}

    return f"+{len(resumed) - len(reference)} dup" if latest(resumed) == latest(reference) else "DIFFER"


def metrics_records(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's records without their times (what a resumed run must log again exactly)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines if line.strip()]


def reference_run(workdir: pathlib.Path, env: dict[str, str], timeout: float) -> Reference:
    """Runs the command uninterrupted on a fresh `workdir`, watching its timeline."""
    start = time.monotonic()
    proc = _start(workdir, env)
    watcher = Watcher(workdir, start)
    try:
        while proc.poll() is None:
            watcher.poll()
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the reference run took over {timeout:.0f} s")
            time.sleep(POLL_S)
    finally:
        _stop(proc)
    wall = time.monotonic() - start
    watcher.poll()
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (status {proc.returncode}):\n{_log_tail(workdir)}")
    return Reference(final_params_hash(workdir), metrics_records(workdir), tuple(watcher.events), wall)


def draw_points(reference: Reference, n: int, seed: int) -> list[Point]:
    """`n` points through `PHASES` in turn, each an interval of its phase and a delay into it drawn from `seed`."""
    rng = random.Random(seed)
    points = []
    for k in range(n):
        phase = PHASES[k % len(PHASES)]
        candidates = reference.intervals(phase)
        if not candidates:
            raise RuntimeError(f"the reference timeline has no {phase} interval of {MIN_INTERVAL_S} s or more")
        i = rng.choice(candidates)
        start, end = reference.span(i)
        points.append(Point(phase, after=i, delay=rng.random() * (end - start)))
    return points


def point_at(reference: Reference, phase: str, which: int = -1, fraction: float = 0.5) -> Point:
    """The point `fraction` into the `which`-th interval of `phase` (default: the last, which even a reference run
    with a cold compilation cache ran with its programs compiled already)."""
    i = reference.intervals(phase)[which]
    start, end = reference.span(i)
    return Point(phase, after=i, delay=fraction * (end - start))


def checkpoint_listing(workdir: pathlib.Path) -> str:
    """checkpoints/ in one line: finished steps, and each unfinished write with how many files it holds."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return "(none)"
    entries = []
    for name in sorted(os.listdir(folder), key=lambda n: (int(re.match(r"\d*", n).group() or -1), n)):
        path = folder / name
        if name.isdigit():
            entries.append(name)
        else:
            files = sum(len(f) for _, _, f in os.walk(path)) if path.is_dir() else 0
            entries.append(f"{name}[{files} files]")
    return " ".join(entries) or "(empty)"


def kill_and_resume(point: Point, workdir: pathlib.Path, reference: Reference, env: dict[str, str],
                    timeout: float) -> Outcome:
    """Runs the command on a fresh `workdir`, SIGKILLs it at `point`, reruns it to completion and compares."""
    start = time.monotonic()
    proc = _start(workdir, env)
    watcher = Watcher(workdir, start)
    try:
        while watcher.poll() < point.after and proc.poll() is None:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{workdir}: the run did not reach event {point.after} in {timeout:.0f} s")
            time.sleep(POLL_S)
        time.sleep(point.delay)
        landed = proc.poll() is None
        if landed:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        _stop(proc)
    killed_during = reference.activity(min(watcher.poll(), len(reference.events)))
    left = checkpoint_listing(workdir)
    rerun = _start(workdir, env)
    _wait(rerun, timeout)
    if rerun.returncode != 0 or not (workdir / "summary.json").exists():
        return Outcome(point, landed, killed_during, left, False, None, None,
                       f"rerun status {rerun.returncode}:\n{_log_tail(workdir)}")
    try:
        params_hash = final_params_hash(workdir)
    except Exception as e:  # noqa: BLE001  (an unreadable or disagreeing final checkpoint is this point's finding)
        return Outcome(point, landed, killed_during, left, True, None, None, f"{type(e).__name__}: {e}")
    return Outcome(point, landed, killed_during, left, True, params_hash,
                   compare_metrics(metrics_records(workdir), reference.metrics))


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def table_row(k: int, o: Outcome, reference: Reference) -> str:
    aim = f"{o.point.after}+{o.point.delay:.3f}s"
    equal = o.params_hash == reference.params_hash
    return (f"{k:>5}  {o.point.phase:<10}  {aim:<11}  {o.killed_during:<32}  {_yes(o.landed):<6}  "
            f"{_yes(o.resumed):<6}  {(o.params_hash or '-')[:12]:<12}  {_yes(equal):<5}  "
            f"{o.metrics or '-':<8}  {o.left}")


TABLE_HEADER = (f"{'point':>5}  {'phase':<10}  {'at':<11}  {'killed during':<32}  {'landed':<6}  {'resume':<6}  "
                f"{'hash':<12}  {'equal':<5}  {'metrics':<8}  checkpoints/ after the kill")


def define_flags() -> None:
    flags.DEFINE_integer("points", 10, "kill points", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "seed of the points' intervals and delays")
    flags.DEFINE_string("workdir", None, "directory for the runs (kept); default: a temporary directory, removed "
                        "when every point resumed exactly")
    flags.DEFINE_string("jax_cache", str(REPO / ".jax_cache"), "persistent compilation cache of the runs; '' for none")
    flags.DEFINE_bool("warmup", True, "fill the compilation cache with one run before the timed reference run")
    flags.DEFINE_float("timeout", 1800, "seconds one run may take", lower_bound=1)


def main(argv) -> None:
    del argv
    command_line.quiet_logging()  # orbax's lines for each restore of a final checkpoint
    t0 = time.monotonic()
    root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="kill_points-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        command_line.fail(f"--workdir {root} is not empty; the points need fresh run directories")
    env = environment(FLAGS.jax_cache)
    warm_hash = reference_run(root / "warmup", env, FLAGS.timeout).params_hash if FLAGS.warmup else None
    reference = reference_run(root / "reference", env, FLAGS.timeout)
    warm_up = "" if warm_hash is None else (", warm-up run equal" if warm_hash == reference.params_hash else
                                             f", warm-up run DIFFERENT: {warm_hash}")
    print(f"reference: {reference.wall:.0f} s, {len(reference.events)} events, params sha256 "
          f"{reference.params_hash}{warm_up}", flush=True)
    (root / "reference_timeline.txt").write_text(reference.timeline())
    print(TABLE_HEADER, flush=True)
    outcomes = []
    for k, point in enumerate(draw_points(reference, FLAGS.points, FLAGS.seed)):
        outcome = kill_and_resume(point, root / f"point{k}", reference, env, FLAGS.timeout)
        outcomes.append(outcome)
        print(table_row(k, outcome, reference), flush=True)
        if outcome.error:
            print("       " + outcome.error.replace("\n", "\n       "), flush=True)
    equal = sum(o.params_hash == reference.params_hash for o in outcomes)
    same = sum(o.metrics == "equal" for o in outcomes)
    exact = equal == len(outcomes) and warm_hash in (None, reference.params_hash)
    if exact and not FLAGS.workdir:
        shutil.rmtree(root)
    kept = f"; the runs are in {root}" if root.exists() else ""
    print(f"metrics.jsonl equal to the reference's (times aside): {same}/{len(outcomes)}; "
          f"{time.monotonic() - t0:.0f} s{kept}")
    print(f"RESULT kill_points equal={equal}/{len(outcomes)}")
    sys.exit(0 if exact else 1)


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
