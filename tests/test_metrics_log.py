"""Tests for gopo_jax/train/metrics_log.py: metrics.jsonl, resume truncation, TensorBoard events, progress on the
console (plain lines without a terminal, rich bars on one), the optional W&B run, summary.json, PNG curves, saved
config."""

import json
import logging
import math
import os
import struct
import sys
import types
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from rich.file_proxy import FileProxy
from tensorboardX.proto import event_pb2

from configs.mgshop import get_config
from gopo_jax.train import metrics_log as gl


def _lines(workdir):
    with open(os.path.join(workdir, gl.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def _tb_events(workdir):
    """Every event in workdir/tb, read from the TFRecord framing of the event files."""
    events = []
    tb = os.path.join(workdir, gl.TB_DIR)
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_log_appends_one_json_object_per_call(tmp_path):
    with gl.MetricsLogger(tmp_path, total_steps=10, console=False, tensorboard=False) as logger:
        logger.log(1, {"loss": np.float32(0.5), "tse": jnp.asarray(1.25), "tokens": np.int64(96)})
        logger.log(2, {"tse": 2.0}, prefix="eval")
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2]
    assert all(isinstance(line["time"], float) for line in lines)
    assert {k: v for k, v in lines[0].items() if k != "time"} == {
        "step": 1,
        "train/loss": 0.5,
        "train/tse": 1.25,
        "train/tokens": 96,
    }
    assert isinstance(lines[0]["train/tokens"], int)
    assert {k: v for k, v in lines[1].items() if k != "time"} == {"step": 2, "eval/tse": 2.0}


def test_non_finite_is_null_with_one_warning(tmp_path):
    logger = gl.MetricsLogger(tmp_path, total_steps=3, console=False, tensorboard=False)
    with pytest.warns(UserWarning, match=r"train/kl is nan at step 1"):
        logger.log(1, {"kl": float("nan"), "loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second non-finite value of the same key is not warned about again
        logger.log(2, {"kl": np.inf, "loss": 2.0})
    logger.close()
    lines = _lines(tmp_path)
    assert [line["train/kl"] for line in lines] == [None, None]
    assert [line["train/loss"] for line in lines] == [1.0, 2.0]


def test_non_scalar_metric_is_a_clear_error(tmp_path):
    with gl.MetricsLogger(tmp_path, total_steps=3, console=False, tensorboard=False) as logger:
        with pytest.raises(TypeError, match=r"metric 'train/adv' must be a number.*reduce arrays first"):
            logger.log(1, {"adv": np.ones(3)})


def test_truncate_after_drops_later_steps_and_torn_lines(tmp_path):
    logger = gl.MetricsLogger(tmp_path, total_steps=10, console=False)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / gl.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "train/lo')  # a kill in the middle of a write
    # The resumed run restored step 3 and logs step 4 again.
    resumed = gl.MetricsLogger(tmp_path, total_steps=10, console=False)
    with pytest.warns(UserWarning, match="unreadable line dropped"):
        resumed.truncate_after(3)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert [(line["step"], line["train/loss"]) for line in _lines(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    events = _tb_events(tmp_path)
    scalars = [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [("train/loss", s, float(s)) for s in range(1, 6)] + [("train/loss", 4, 40.0)]
    # The resumed writer's purge marker tells TensorBoard to drop the first run's events from step 4 on.
    starts = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [4]


class _Clock:
    """time.time as the test sets it."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(gl.time, "time", clock)
    return clock


@pytest.fixture
def plain_console(monkeypatch):
    """stderr as in CI: not a terminal, even with FORCE_COLOR set (some CI systems set it)."""
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")


def _two_phases(tmp_path, **kwargs):
    return gl.MetricsLogger(tmp_path, total_steps=8, phases=[("warm start", 4), ("gopo", 4)], tensorboard=False,
                            evaluation_prefixes=("eval", "sft_heldout"), **kwargs)


def test_plain_lines_without_a_terminal(tmp_path, capsys, clock, plain_console):
    with _two_phases(tmp_path, headline=["loss", "tse"]) as logger:
        for step in range(1, 5):  # one SFT block: its records are logged back to back
            logger.log(step, {"loss": 1.0 / step}, prefix="sft")
        logger.log(4, {"sft_heldout/loss": 0.5}, prefix="")  # as a cached warm start's lines are logged again
        logger.log(4, {"tse": 0.25, "gre": 1.0}, prefix="eval")
        for step in range(5, 9):
            clock.now += 2.0 if step < 8 else gl.PLAIN_LINE_EVERY_S
            logger.log(step, {"loss": 0.1, "tse": 0.5, "kl": 0.01})
        logger.log(8, {"tse": 0.75}, prefix="eval")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert err.splitlines() == [
        "warm start 1/4 (25%) | sft/loss 1",
        "warm start 4/4 (100%) | sft/loss 0.25",
        "step 4/8 | sft_heldout/loss 0.5",
        "step 4/8 | eval/tse 0.25",
        "gopo 1/4 (25%) | train/loss 0.1 | train/tse 0.5",
        # Steps 2 and 3 are within PLAIN_LINE_EVERY_S of the last line; step 4 ends the phase. The rate runs from
        # step 1: 3 steps in 2 + 2 + 30 s.
        f"gopo 4/4 (100%) | {3 / (4 + gl.PLAIN_LINE_EVERY_S):.2f} steps/s | train/loss 0.1 | train/tse 0.5",
        "step 8/8 | eval/tse 0.75",
    ]


def test_plain_line_every_interval_has_rate_and_eta(tmp_path, capsys, clock, plain_console):
    with gl.MetricsLogger(tmp_path, total_steps=10, tensorboard=False, headline=["tse"]) as logger:
        logger.log(2, {"loss": 1.0, "tse": 0.5})
        clock.now += gl.PLAIN_LINE_EVERY_S
        logger.log(6, {"loss": 1.0, "tse": 0.75})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "steps 2/10 (20%) | train/tse 0.5"
    steps_per_s = 4 / gl.PLAIN_LINE_EVERY_S
    eta = gl._format_duration(4 / steps_per_s)
    assert err[1] == f"steps 6/10 (60%) | {steps_per_s:.2f} steps/s | ETA {eta} | train/tse 0.75"


def test_rate_counts_a_burst_of_records_as_one_sample():
    rate = gl._Rate()
    for block in range(3):  # blocks of 25 steps, each logged at once when its 10 s of work end
        for k in range(25):
            rate.update(10.0 * block + 0.001 * k, 25 * block + k + 1)
        if block == 0:
            assert rate.per_second() is None  # the first burst only anchors the measure
    assert rate.per_second() == pytest.approx(50 / 20.0, rel=1e-3)


def _bars(logger):
    return [(t.description, t.completed, t.total, t.started) for t in logger._progress._progress.tasks]


def test_resumed_run_bars_start_at_the_resumed_step(tmp_path, capsys, clock, plain_console):
    with _two_phases(tmp_path) as logger:
        assert _bars(logger) == [("warm start", 0, 4, True), ("gopo", 0, 4, False)]
        for step in range(1, 8):
            clock.now += 1.0
            logger.log(step, {"loss": 1.0}, prefix="sft" if step <= 4 else "train")
        assert _bars(logger)[1][:2] == ("gopo", 3)
    capsys.readouterr()
    with _two_phases(tmp_path) as resumed:
        resumed.truncate_after(6)
        assert _bars(resumed) == [("warm start", 4, 4, False), ("gopo", 2, 4, True)]
        clock.now += 1.0
        resumed.log(7, {"loss": 2.0})
    # Its first line comes at once, with no rate yet: the rate is this process's own.
    assert capsys.readouterr().err.splitlines() == ["gopo 3/4 (75%) | train/loss 2"]


def test_phases_must_add_up_to_the_steps(tmp_path):
    with pytest.raises(ValueError, match=r"add up to total_steps=8"):
        gl.MetricsLogger(tmp_path, total_steps=8, phases=[("warm start", 4), ("gopo", 3)])


def test_bars_on_a_terminal(tmp_path, capsys, clock, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich writes for a terminal ...
    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # ... and draws live bars
    monkeypatch.setenv("COLUMNS", "200")
    handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig makes it before the run
    logging.getLogger().addHandler(handler)
    try:
        with _two_phases(tmp_path) as logger:
            assert logger._progress.live
            # While the bars show, a log record goes through rich, which prints it above them.
            assert isinstance(handler.stream, FileProxy) and handler.stream is sys.stderr
            for step in range(1, 9):
                clock.now += 1.0
                logger.log(step, {"loss": 0.5, "tse": 0.125}, prefix="sft" if step <= 4 else "train")
                if step == 6:
                    gopo = logger._progress._progress.tasks[1]
                    assert (gopo.fields["rate"], gopo.fields["eta"]) == ("1.00 steps/s", "ETA 0:00:02")
            logger.log(8, {"tse": 0.75}, prefix="eval")
            assert _bars(logger) == [("warm start", 4, 4, True), ("gopo", 4, 4, True)]
        restored = handler.stream
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert restored is sys.stderr  # the handler writes where it did before
    assert "\x1b[" in err  # drawn in place
    final = err[err.rindex("step 8/8 | eval/tse 0.75"):]
    assert "warm start" in final and "4/4" in final and "1.00 steps/s" in final
    assert "train/loss 0.5 | train/tse 0.125" in final


class _FakeWandb(types.ModuleType):
    """The part of `wandb` the logger uses, recording calls; runs keep their logged steps across `init`s, as the
    W&B server does."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []
        self.last_step = {}  # run id -> the highest step W&B holds

    def init(self, **kwargs):
        run = _FakeRun(self, kwargs, run_id=kwargs["id"] or f"run{len(self.runs)}")
        self.runs.append(run)
        return run


class _FakeRun:
    def __init__(self, wandb, kwargs, run_id):
        self.wandb, self.kwargs, self.id = wandb, kwargs, run_id
        self.step = wandb.last_step.get(run_id, -1) + 1  # W&B's current step: a resumed run goes on after its steps
        self.logged = []
        self.exit_code = "open"

    def log(self, data, step):
        assert step >= self.step, "W&B would ignore a step below its current one"
        self.logged.append((step, data))
        self.step = step
        self.wandb.last_step[self.id] = step

    def finish(self, exit_code=None):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return wandb


def _wandb_settings(**log):
    config = get_config()
    with config.unlocked():
        config.log.update({"wandb": True, "wandb_mode": "offline"} | log)
    return gl.WandbSettings.from_config(config)


def test_wandb_run_gets_the_config_and_the_scalars(tmp_path, fake_wandb):
    settings = _wandb_settings(wandb_project="shop", wandb_entity="lab")
    with gl.MetricsLogger(tmp_path, total_steps=4, console=False, wandb=settings) as logger:
        with pytest.warns(UserWarning, match="train/kl is nan"):
            logger.log(1, {"loss": np.float32(0.5), "kl": float("nan")})
        logger.log(1, {"tse": 0.25}, prefix="eval")
        logger.log(2, {"loss": 0.25})
    (run,) = fake_wandb.runs
    # The whole run config.
    assert run.kwargs["config"] == settings.config and settings.config["train"] == get_config().train.to_dict()
    assert settings.config["log"]["wandb_project"] == "shop"
    assert {k: run.kwargs[k] for k in ("project", "entity", "mode", "id", "resume", "dir")} == {
        "project": "shop", "entity": "lab", "mode": "offline", "id": None, "resume": "allow", "dir": str(tmp_path)}
    # The scalars TensorBoard gets (the null one left out), at their steps.
    assert run.logged == [(1, {"train/loss": 0.5}), (1, {"eval/tse": 0.25}), (2, {"train/loss": 0.25})]
    assert run.exit_code == 0
    assert (tmp_path / gl.WANDB_ID_FILE).read_text() == "run0\n"


def test_wandb_resumed_workdir_continues_the_same_run(tmp_path, fake_wandb):
    settings = _wandb_settings()
    with gl.MetricsLogger(tmp_path, total_steps=6, console=False, wandb=settings) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": float(step)})
    # Killed after step 4 with its last checkpoint at step 2: the resumed run logs steps 3 and 4 again.
    with gl.MetricsLogger(tmp_path, total_steps=6, console=False, wandb=settings) as resumed:
        resumed.truncate_after(2)
        for step in range(3, 7):
            resumed.log(step, {"loss": float(step)})
    first, second = fake_wandb.runs
    assert second.kwargs["id"] == first.id == "run0" and second.kwargs["resume"] == "allow"
    # W&B already holds steps 3 and 4 (the same values: resumption is exact); step 5 on goes to the same run.
    assert [step for step, _ in second.logged] == [5, 6]
    assert second.exit_code == 0


def test_wandb_run_of_a_failed_run_is_marked_failed(tmp_path, fake_wandb):
    with pytest.raises(RuntimeError, match="boom"):
        with gl.MetricsLogger(tmp_path, total_steps=2, console=False, wandb=_wandb_settings()) as logger:
            logger.log(1, {"loss": 1.0})
            raise RuntimeError("boom")
    assert fake_wandb.runs[0].exit_code == 1


def test_wandb_off_imports_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would fail
    assert gl.WandbSettings.from_config(get_config()) is None  # off by default
    with gl.MetricsLogger(tmp_path, total_steps=2, console=False, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / gl.WANDB_ID_FILE).exists()


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when it is not installed
    with pytest.raises(ValueError, match=r"^log.wandb=True needs the wandb package.*pip install wandb") as info:
        gl.MetricsLogger(tmp_path, total_steps=2, console=False, wandb=_wandb_settings())
    assert "\n" not in str(info.value)
    assert not (tmp_path / gl.METRICS_FILE).exists()  # it failed before opening anything


@pytest.mark.parametrize(("log", "message"), [(dict(wandb_mode="cloud"), r"log.wandb_mode must be one of"),
                                              (dict(wandb_project=""), r"log.wandb_project is empty")])
def test_wandb_settings_are_checked(log, message):
    with pytest.raises(ValueError, match=message):
        _wandb_settings(**log)


def test_write_summary(tmp_path):
    with pytest.warns(UserWarning, match=r"summary.gre.ci is nan"):
        path = gl.write_summary(
            tmp_path,
            {
                "tse": {"mean": np.float32(0.5), "ci": jnp.asarray([0.25, 0.75])},
                "gre": {"mean": 1, "ci": float("nan")},
                "env": "synthetic_shop",
            },
        )
    assert path == str(tmp_path / gl.SUMMARY_FILE)
    with open(path) as f:
        assert json.load(f) == {
            "tse": {"mean": 0.5, "ci": [0.25, 0.75]},
            "gre": {"mean": 1, "ci": None},
            "env": "synthetic_shop",
        }


def test_plot_curves_writes_valid_pngs(tmp_path):
    with gl.MetricsLogger(tmp_path, total_steps=4, console=False, tensorboard=False) as logger:
        for step in range(1, 5):
            logger.log(step, {"tse": 0.1 * step, "gre": 0.2 * step, "kl": 0.01})
            if step % 2 == 0:
                logger.log(step, {"tse": 0.15 * step}, prefix="eval")
    with pytest.warns(UserWarning, match="no logged values for 'alignment'"):
        paths = gl.plot_curves(tmp_path, ["tse", "gre", "alignment", "kl"])
    assert paths == [str(tmp_path / "curves.png")]
    paths = gl.plot_curves(tmp_path, {"rewards": ["tse", "gre"], "kl": ["kl"]})
    assert paths == [str(tmp_path / "rewards.png"), str(tmp_path / "kl.png")]
    for path in paths:
        with open(path, "rb") as f:
            header = f.read(24)
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", header[16:24])
        assert width > 100 and height > 100
    series = gl._series(_lines(tmp_path), "tse")
    assert set(series) == {"train/tse", "eval/tse"} and series["eval/tse"][0] == [2, 4]


def test_plot_curves_draws_one_panel_per_metric_and_one_line_per_prefix(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = []  # the figures as they are saved, to read back through matplotlib's object API
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.append((fig, os.path.basename(path))))
    with gl.MetricsLogger(tmp_path, total_steps=4, console=False, tensorboard=False) as logger:
        for step in range(1, 5):
            logger.log(step, {"tse": 0.1 * step, "kl": 0.01})
            if step % 2 == 0:
                logger.log(step, {"tse": 0.15 * step}, prefix="eval")
    gl.plot_curves(tmp_path, ["tse", "kl"])
    ((fig, name),) = drawn
    assert name == "curves.png"
    tse, kl = fig.axes
    assert (tse.get_title(), kl.get_title(), tse.get_xlabel()) == ("tse", "kl", "step")
    lines = {line.get_label(): line for line in tse.lines}
    assert set(lines) == {"train", "eval"}
    np.testing.assert_array_equal(lines["eval"].get_xdata(), [2, 4])
    np.testing.assert_allclose(lines["eval"].get_ydata(), [0.3, 0.6])
    np.testing.assert_allclose(lines["train"].get_ydata(), [0.1, 0.2, 0.3, 0.4])
    assert [line.get_label() for line in kl.lines] == ["train"]


def test_plot_curves_without_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        gl.plot_curves(tmp_path, ["tse"])


def test_save_config_round_trips(tmp_path):
    config = ml_collections.ConfigDict(
        {"train": {"steps": 50, "lr": 1e-4, "clip": math.inf, "sizes": (1, 2)}, "env": "synthetic_shop"}
    )
    config.lock()
    path = gl.save_config(tmp_path, config)
    with open(path) as f:
        assert json.load(f)["train"] == {"steps": 50, "lr": 1e-4, "clip": math.inf, "sizes": [1, 2]}
    namespace = {}
    exec(open(tmp_path / "config.py").read(), namespace)  # noqa: S102  (the file is meant to be loaded as a config)
    assert namespace["get_config"]().to_dict() == config.to_dict()
