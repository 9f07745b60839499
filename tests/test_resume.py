"""Exact resumption: a run killed with SIGKILL mid-training and rerun on its workdir ends with bitwise the same
parameters and the same metrics as an uninterrupted run; a checkpoint of another model config is refused."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.intermediate_size=64",
        "--config.sft.steps=6", "--config.sft.episodes=32", "--config.sft.batch_size=8", "--config.train.steps=4",
        "--config.train.groups=2", "--config.train.group_size=2", "--config.train.minibatches=1",
        "--config.train.epochs=1", "--config.train.checkpoint_every=1", "--config.train.eval_every=2",
        "--config.eval.episodes=8", "--config.mesh.data=1"]
SFT_STEPS = 6


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "experiments.mgshop", "--config", "configs/mgshop.py", "--workdir", str(workdir),
            *TINY, *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(workdir, *extra, check=True):
    return subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
                          check=check)


def _final_eval(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["step"] for r in rows)
    return {k: v for r in rows if r["step"] == last for k, v in r.items() if k.startswith("eval/")}


@pytest.mark.slow
def test_kill9_resume_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight)
    proc = subprocess.Popen(_cmd(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / str(SFT_STEPS + 2)
    deadline = time.time() + 900
    try:
        while not target.exists():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline, "no checkpoint appeared in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "summary.json").exists()
    _run(killed)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    print(f"final params sha256: uninterrupted {a['final_params_sha256']}  killed+resumed {b['final_params_sha256']}")
    assert a["final_params_sha256"] == b["final_params_sha256"]
    assert _final_eval(straight) == _final_eval(killed)
    for name in ("sft", "gopo"):
        assert a[name]["tse"]["mean"] == b[name]["tse"]["mean"]


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path):
    wd = tmp_path / "run"
    _run(wd, "--config.train.steps=1")
    result = _run(wd, "--config.train.steps=2", "--config.model.hidden_size=48", check=False)
    assert result.returncode == 2
    assert "hidden_size" in result.stderr and "Traceback" not in result.stderr
