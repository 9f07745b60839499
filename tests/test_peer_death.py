"""A `jax.distributed` peer killed mid-step: the survivor exits non-zero within the configured timeout, with one clear
line, and does not hang (gopo_jax/peer_watch.py, started by gopo_jax.distributed.maybe_initialize_distributed).

The watch's rules are checked on a fake key-value store and clock (fast); the slow tests run the SFT step as two
processes (tests/peer_death_worker.py) and kill one: SIGKILL of process 1 (its sockets close, so the survivor's
collective fails and the survivor waits in JAX's shutdown barrier) and SIGSTOP of process 0, the coordinator (its
sockets stay open, so the survivor's collective and its calls to the coordination service never return).
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gopo_jax import distributed, peer_watch

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER_TIMEOUT_S = 10
STARTUP_S = 240  # both workers compiled and stepping
MARGIN_S = 20  # after the timeout: a beat interval, a check interval, exit, on a loaded machine


class FakeStore:
    """The coordination service's key-value store; `up = False` makes every call fail, `hang` blocks them."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.up = True
        self.hang: threading.Event | None = None

    def _answer(self):
        if self.hang is not None:
            self.hang.wait()
        if not self.up:
            raise ConnectionError("coordination service unreachable")

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self._answer()
        self.values[key] = value

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        self._answer()
        return [(k, v) for k, v in self.values.items() if k.startswith(key + "/")]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watches(store, clock, num_processes=2, timeout_s=10.0):
    return [peer_watch.PeerWatch(lambda: store, p, num_processes, timeout_s, clock=clock) for p in range(num_processes)]


def _message(peer: str, seconds: int, step: str) -> str:
    return (f"error: peer process {peer} stopped answering (no heartbeat for {seconds} s) during {step}; this process "
            "stops too; rerun the command to resume from the last checkpoint")


@pytest.fixture(autouse=True)
def _activity(monkeypatch):
    monkeypatch.setattr(peer_watch, "_activity", "the run")  # restored after each test: doing() sets a global


def test_a_silent_peer_is_named_once_the_timeout_has_passed():
    store, clock = FakeStore(), Clock()
    w0, w1 = _watches(store, clock)
    peer_watch.doing("SFT step 7")
    for t in range(5):
        clock.now = t
        w1.exchange()
        w0.exchange()
        assert w0.lost() is None and w1.lost() is None
    for t in range(5, 15):  # process 1 stops beating after t = 4
        clock.now = t
        w0.exchange()
        assert w0.lost() is None
    clock.now = 15
    w0.exchange()
    assert w0.lost() == _message("1", 11, "SFT step 7")


def test_a_pause_of_this_process_is_not_taken_for_a_silent_peer():
    store, clock = FakeStore(), Clock()
    w0, w1 = _watches(store, clock)
    w0.exchange()
    w1.exchange()
    clock.now = 100.0  # process 0 was paused (swapped out, the GIL held) while process 1 went on beating
    w1.exchange()
    assert w0.lost() is None
    w0.exchange()
    assert w0.lost() is None


def test_a_peer_that_never_beats_is_named_too():
    store, clock = FakeStore(), Clock()
    w0, _ = _watches(store, clock, timeout_s=3.0)
    for t in range(5):
        clock.now = t
        w0.exchange()
    assert w0.lost() == _message("1", 4, "the run")


def test_an_unreachable_coordinator_is_named():
    store, clock = FakeStore(), Clock()
    w0, w1 = _watches(store, clock)
    w0.exchange()
    w1.exchange()
    store.up = False  # process 0, which hosts the service, is gone
    for t in range(1, 11):
        clock.now = t
        w1.exchange()
        assert w1.lost() is None
    clock.now = 11
    assert w1.lost() == _message("0 (the coordinator)", 11, "the run")


def test_a_call_to_the_coordinator_that_never_returns_counts_as_no_answer():
    store, clock = FakeStore(), Clock()
    w0, w1 = _watches(store, clock)
    w1.exchange()
    store.hang = threading.Event()
    caller = threading.Thread(target=w1.exchange, daemon=True)
    caller.start()
    clock.now = 10.5
    time.sleep(0.05)
    assert w1.lost() == _message("0 (the coordinator)", 10, "the run")
    store.hang.set()
    caller.join(5)
    w0.exchange()
    w1.exchange()
    assert w1.lost() is None  # the answer came after all


def test_the_threads_end_the_watch_with_the_message_and_stop_with_jax_distributed():
    store = FakeStore()
    messages: list[str] = []
    alive = threading.Event()
    alive.set()
    w0 = peer_watch.PeerWatch(lambda: store, 0, 2, 0.5, on_lost=messages.append).start()
    w1 = peer_watch.PeerWatch(lambda: store if alive.is_set() else None, 1, 2, 0.5, on_lost=messages.append).start()
    time.sleep(1.5)
    assert messages == []
    alive.clear()  # process 1 shuts jax.distributed down: its watch ends, and it stops beating
    deadline = time.monotonic() + 5
    while not messages and time.monotonic() < deadline:
        time.sleep(0.05)
    w0.stop()
    w1.stop()
    assert len(messages) == 1 and messages[0].startswith("error: peer process 1 stopped answering"), messages


@pytest.mark.parametrize("timeout_s", [0.5, 10.0, 300.0])
def test_the_watch_ends_the_survivor_by_its_latest_exit_and_before_jax_could(timeout_s):
    """Beats of both processes and the survivor's checks at the real intervals, with random phases and a random
    moment of death: the survivor names its peer between `timeout_s` and `peer_watch.latest_exit_s` after the
    peer's last beat, and JAX's own heartbeat check, which cannot declare the peer dead before half its timeout
    after the kill (its client beats once per half timeout), comes later still."""
    rng = np.random.default_rng(int(timeout_s * 10))
    beat = peer_watch.beat_interval_s(timeout_s)
    judge = min(1.0, beat)
    tick = beat / 40
    for _ in range(20):
        store, clock = FakeStore(), Clock()
        w0, w1 = _watches(store, clock, timeout_s=timeout_s)
        next_beat = [rng.uniform(0, beat), rng.uniform(0, beat)]
        next_judge = rng.uniform(0, judge)
        death = rng.uniform(3 * beat, 6 * beat)
        last_beat = None
        for step in range(int((death + 3 * timeout_s) / tick)):
            clock.now = step * tick
            if clock.now >= next_beat[1] and clock.now < death:
                w1.exchange()
                last_beat, next_beat[1] = clock.now, next_beat[1] + beat
            if clock.now >= next_beat[0]:
                w0.exchange()
                next_beat[0] += beat
            if clock.now >= next_judge:
                next_judge += judge
                if w0.lost():
                    break
        else:
            pytest.fail("the survivor never named its silent peer")
        assert timeout_s <= clock.now - last_beat <= peer_watch.latest_exit_s(timeout_s) + tick
        assert distributed.jax_heartbeat_timeout_s(timeout_s) / 2 >= 1.2 * (clock.now - death)


def test_a_bad_peer_timeout_is_a_config_error():
    with pytest.raises(ValueError, match=r"distributed.peer_timeout_s must be a positive number of seconds, got 0"):
        distributed.maybe_initialize_distributed(peer_timeout_s=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: pathlib.Path) -> str:
    return f"--- {path.name} ---\n" + path.read_text(errors="replace")[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("victim", "how"), [(1, signal.SIGKILL), (0, signal.SIGSTOP)],
                         ids=["kill-process-1", "freeze-the-coordinator"])
def test_the_survivor_of_a_lost_peer_exits_with_a_clear_message(tmp_path, victim, how):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    port = _free_port()
    logs = [tmp_path / f"worker{pid}.log" for pid in range(2)]
    procs = []
    try:
        for pid, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, str(REPO / "tests" / "peer_death_worker.py"), str(pid), "2", str(port),
                     str(PEER_TIMEOUT_S)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + STARTUP_S
        while not all(re.search(r"^step 3$", log.read_text(), re.M) for log in logs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                pytest.fail("the workers did not reach step 3:\n" + "\n".join(_tail(log) for log in logs))
            time.sleep(0.2)
        procs[victim].send_signal(how)
        lost_at = time.monotonic()
        survivor = procs[1 - victim]
        try:
            survivor.wait(PEER_TIMEOUT_S + MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survivor still runs {PEER_TIMEOUT_S + MARGIN_S} s after its peer was lost:\n"
                        + _tail(logs[1 - victim]))
        took = time.monotonic() - lost_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()
    output = logs[1 - victim].read_text(errors="replace")
    steps = len(re.findall(r"^step \d+$", output, re.M))
    print(f"{how.name} of process {victim} after {steps} steps: the survivor exited with {survivor.returncode} "
          f"{took:.1f} s later (timeout {PEER_TIMEOUT_S} s)")
    role = " (the coordinator)" if victim == 0 else ""
    expected = re.escape(_message(f"{victim}{role}", 999, "SFT step 999")).replace("999", r"\d+")
    assert survivor.returncode == peer_watch.PEER_LOST_EXIT_CODE, _tail(logs[1 - victim])
    assert re.search(f"^{expected}$", output, re.M), _tail(logs[1 - victim])
    assert "Terminating process because the JAX distributed service" not in output  # the watch spoke first
