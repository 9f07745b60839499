"""Tests for gopo_jax/train/metrics_log.py: metrics.jsonl, resume truncation, TensorBoard events, console line,
summary.json, PNG curves, saved config."""

import json
import math
import os
import struct
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

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


def test_console_line_has_progress_eta_and_headline(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr(gl.time, "time", lambda: next(clock))
    with gl.MetricsLogger(tmp_path, total_steps=10, tensorboard=False, headline=["tse"]) as logger:
        logger.log(2, {"loss": 1.0, "tse": 0.5})
        logger.log(6, {"loss": 1.0, "tse": 0.75})
        logger.log(6, {"tse": 0.625}, prefix="eval")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "step 2/10 (20%) | train/tse 0.5"
    # 4 steps in 2 s -> 2 steps/s, 4 steps left -> 2 s.
    assert err[1] == "step 6/10 (60%) | 2.00 steps/s | ETA 0:00:02 | train/tse 0.75"
    assert err[2].endswith("| eval/tse 0.625")


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
