"""Stops this process, with one clear line, when a peer of a multi-process (`jax.distributed`) run stops answering.

A peer that dies mid-step leaves the others blocked inside a collective that may never return (gloo waits for a
machine that vanished without closing its sockets) or, when the collective fails, in `jax.distributed`'s shutdown
barrier at exit; JAX's own heartbeat check ends them later with a page of C++ stack trace. Here each process beats
on the coordination service's key-value store from a daemon thread, and a second daemon thread, which never blocks,
ends the process with `os._exit` (nothing else gets a thread out of a blocked collective) once a peer's beat has not
moved for the timeout, or the coordination service (hosted by process 0) has not answered for that long.

`gopo_jax.distributed.maybe_initialize_distributed` starts the watch. A caller may name what the process is doing
with `doing(...)` so that the message says where the run stopped (tests/peer_death_worker.py names its SFT steps);
the trainer does not, so a training run's message says "during the run".
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): nothing is wrong with the run itself; rerunning resumes it
KEY_DIR = "gopo_jax/peer_watch"  # holds one beat counter per process in the key-value store
COORDINATOR = 0  # the process that hosts the coordination service

_activity = "the run"  # until the training loop names its step


def doing(what: str) -> None:
    """Names what this process is doing now (e.g. "SFT step 12"), for the message if a peer is lost meanwhile."""
    global _activity
    _activity = what


def lost_message(peer: int, silent_s: float) -> str:
    role = " (the coordinator)" if peer == COORDINATOR else ""
    return (f"error: peer process {peer}{role} stopped answering (no heartbeat for {silent_s:.0f} s) during "
            f"{_activity}; this process stops too; rerun the command to resume from the last checkpoint")


def beat_interval_s(timeout_s: float) -> float:
    """How often a watch beats and reads its peers: several times per timeout, so that one slow round trip does not
    make a live peer look silent."""
    return min(5.0, timeout_s / 5)


def latest_exit_s(timeout_s: float) -> float:
    """The longest a watch takes to end its process after a peer's last beat: the survivor first reads that beat up
    to one beat interval later, judges the silence only up to its own last exchange (one more interval) and checks
    at most once a second."""
    beat = beat_interval_s(timeout_s)
    return timeout_s + 2 * beat + min(1.0, beat)


def _stop_process(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(PEER_LOST_EXIT_CODE)


class PeerWatch:
    """Beats for this process and watches the other processes' beats (see the module docstring).

    `get_client` returns the `jax.distributed` key-value client (`key_value_set`, `key_value_dir_get`), or None once
    `jax.distributed` has shut down, which ends the watch. `on_lost` receives the message when a peer is lost; the
    default prints it to stderr and exits with PEER_LOST_EXIT_CODE.
    """

    def __init__(self, get_client: Callable[[], Any], process_id: int, num_processes: int, timeout_s: float, *,
                 on_lost: Callable[[str], None] = _stop_process, clock: Callable[[], float] = time.monotonic):
        self._get_client = get_client
        self._process_id = process_id
        self._peers = [p for p in range(num_processes) if p != process_id]
        self.timeout_s = float(timeout_s)
        self.beat_every_s = beat_interval_s(self.timeout_s)
        self._on_lost = on_lost
        self._clock = clock
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        now = clock()
        self._beats = 0
        self._last_contact = now  # end of the last exchange with the key-value store that succeeded
        self._contact_failing = False  # an exchange since then has failed or is still waiting for an answer
        self._seen_beat: dict[int, str] = {}
        self._seen_at = dict.fromkeys(self._peers, now)  # when an exchange first read each peer's current beat

    def start(self) -> PeerWatch:
        threading.Thread(target=self._beat_loop, name="peer-watch-beat", daemon=True).start()
        threading.Thread(target=self._judge_loop, name="peer-watch-judge", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def exchange(self) -> None:
        """One beat: publishes this process's counter and reads the peers' (two round trips to the service)."""
        client = self._get_client()
        if client is None:
            self.stop()
            return
        with self._lock:
            self._contact_failing = True  # until this exchange returns
        self._beats += 1
        try:
            client.key_value_set(f"{KEY_DIR}/{self._process_id}", str(self._beats), allow_overwrite=True)
            beats = dict(client.key_value_dir_get(KEY_DIR))
        except Exception:  # noqa: BLE001  (service gone or unreachable: `lost` counts for how long)
            return
        now = self._clock()
        with self._lock:
            self._last_contact = now
            self._contact_failing = False
            for peer in self._peers:
                beat = beats.get(f"{KEY_DIR}/{peer}")
                if beat is not None and beat != self._seen_beat.get(peer):
                    self._seen_beat[peer] = beat
                    self._seen_at[peer] = now

    def lost(self) -> str | None:
        """The message naming a peer that stopped answering, or None while every peer answers."""
        with self._lock:
            unanswered_s = self._clock() - self._last_contact
            if self._contact_failing and self._process_id != COORDINATOR and unanswered_s > self.timeout_s:
                return lost_message(COORDINATOR, unanswered_s)
            # Measured up to this process's last exchange rather than to now, so that a pause of this process
            # (swapped out, a long call holding the GIL) is not taken for a silent peer.
            silent_s = {peer: self._last_contact - at for peer, at in self._seen_at.items()}
        for peer, seconds in silent_s.items():
            if seconds > self.timeout_s:
                return lost_message(peer, seconds)
        return None

    def _beat_loop(self) -> None:
        while not self._stopped.is_set():
            self.exchange()
            self._stopped.wait(self.beat_every_s)

    def _judge_loop(self) -> None:
        while not self._stopped.wait(min(1.0, self.beat_every_s)):
            if self._get_client() is None:
                return
            message = self.lost()
            if message:
                self._on_lost(message)
                return
