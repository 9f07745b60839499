"""Multi-host for real: the SFT step as 2 processes x 2 CPU devices (jax.distributed, gloo collectives, each
process feeding half the batch) must give the same losses and parameters as 1 process with 4 devices."""
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(out_path: pathlib.Path, log_dir: pathlib.Path) -> None:
    """Runs both workers; kills both if either fails or time runs out, so a dead peer fails fast."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               # Same persistent compilation cache as conftest.py: reruns skip most of the workers' compiles.
               JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        log = open(log_dir / f"worker{pid}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "multihost_worker.py"), str(pid), "2", str(port), str(out_path)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failure = f"worker {bad[0]} exited with code {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S}s"
                break
            time.sleep(0.2)
        else:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failure = f"worker {bad[0]} exited with code {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failure:
        tails = []
        for pid, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- worker {pid} ---\n" + log.read()[-3000:])
        pytest.fail(f"2-process run failed: {failure}\n" + "\n".join(tails))
    for log in logs:
        log.close()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "result.npz"
    start = time.monotonic()
    _launch_two_processes(out, tmp_path)
    wall = time.monotonic() - start
    multi = np.load(out)
    assert int(multi["num_devices"]) == 4

    losses_1, params_1 = multihost_worker.run_sft(jax.devices()[:4], multihost_worker.make_batches())
    loss_diff = float(np.max(np.abs(multi["losses"] - losses_1)))
    param_diff = max(float(np.max(np.abs(multi[f"p{i}"] - p))) for i, p in enumerate(params_1))
    print(f"2 processes x 2 devices vs 1 process x 4 devices: max |loss diff| {loss_diff:.2e}, "
          f"max |param diff| {param_diff:.2e} (2-process wall {wall:.1f}s)")
    assert len(params_1) == sum(1 for k in multi.files if k.startswith("p"))
    assert loss_diff < 1e-5 and param_diff < 1e-5
