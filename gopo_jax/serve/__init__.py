"""Serves a finished run's agent pair as an OpenAI-compatible chat endpoint (FastAPI + uvicorn).

    gopo-serve --workdir runs/mgshop [--port 8000] [--host 127.0.0.1] [--model_name NAME] [--api_key KEY]
    python -m gopo_jax.serve --workdir runs/mgshop

The run's agents, tokenizer and SOP are restored from its workdir (`gopo_jax.export.load_run`: `config.json`,
`tokenizer/`, the newest checkpoint or `--step`); the device programs of every batch bucket are compiled before the
port opens, for greedy requests and for the run's own sampling settings. The server binds to loopback by default;
any other address needs an API key (`--api_key` or the GOPO_API_KEY environment variable), which every `/v1/`
request must then send as `Authorization: Bearer KEY`.

`gopo_jax.serve.engine` turns conversations into the run's layout and answers batches of them; `gopo_jax.serve.api`
is the HTTP API (schema, micro-batching, streaming). `start_server` runs one on a background thread (tests, the load
benchmark); port 0 picks a free port.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time

from absl import flags

from gopo_jax import command_line

_log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_api(workdir, *, step: int | None = None, model_name: str | None = None, api_key: str | None = None,
              batch_buckets=None, max_wait_s: float = 0.005, warmup: bool = True, n_candidates: int = 1,
              max_candidates: int | None = None, candidate_temperature: float = 0.7,
              max_pending_rows: int | None = None):
    """The ServedAPI of the run in `workdir`, its programs compiled when `warmup` (the default)."""
    from gopo_jax.export import load_run  # noqa: PLC0415  (JAX and the run's world: only when serving)
    from gopo_jax.serve.api import ServedAPI  # noqa: PLC0415
    from gopo_jax.serve.engine import DEFAULT_BUCKETS, Engine, Sampling  # noqa: PLC0415

    run = load_run(workdir, step)
    engine = Engine(run, batch_buckets=tuple(batch_buckets or DEFAULT_BUCKETS), n_candidates=n_candidates,
                    max_candidates=max_candidates, candidate_temperature=candidate_temperature)
    if warmup:
        s = run.config.sampling
        seconds = engine.warmup([Sampling(temperature=0.0),
                                 Sampling(temperature=float(s.temperature), top_p=float(s.top_p))])
        _log.info("compiled %d device programs in %.1f s", len(engine.buckets) * 2, seconds)
    return ServedAPI(engine, model_name=model_name or run.workdir.resolve().name, api_key=api_key,
                     max_wait_s=max_wait_s, max_pending_rows=max_pending_rows)


@dataclasses.dataclass
class RunningServer:
    """A uvicorn server on a background thread: `url` is its base (`http://host:port`), `stop()` ends it."""

    server: object
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(served, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serves `served` (a ServedAPI) on a background thread; returns once the port accepts connections."""
    import uvicorn  # noqa: PLC0415

    from gopo_jax.serve.api import create_app  # noqa: PLC0415

    server = uvicorn.Server(uvicorn.Config(create_app(served), host=host, port=port, log_level="warning",
                                           timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True, name="gopo-serve")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    return RunningServer(server, thread, f"http://{host}:{bound[1]}")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by the trainer")
    flags.DEFINE_integer("step", None, "the checkpoint step to serve (default: the newest)")
    flags.DEFINE_string("host", "127.0.0.1", "bind address; anything but loopback requires an API key")
    flags.DEFINE_integer("port", 8000, "port (0 picks a free one, printed)")
    flags.DEFINE_string("model_name", None, "model id to serve (default: the workdir's name)")
    flags.DEFINE_string("api_key", None, "required `Authorization: Bearer` key (default: $GOPO_API_KEY; none on "
                                         "loopback)")
    flags.DEFINE_list("batch_buckets", ["1", "4", "16"], "device batch sizes compiled at start-up; the largest is "
                                                         "the most rows one device call answers")
    flags.DEFINE_integer("n_candidates", 1, "candidate replies drawn per turn by default (GOPO.md §1: the first "
                         "aligned, SOP-valid one is returned, else the most likely); requests set gopo_n_candidates")
    flags.DEFINE_integer("max_candidates", None, "the most candidates a request may ask for (default: n_candidates)")
    flags.DEFINE_float("candidate_temperature", 0.7, "the temperature of candidates 1.. for a greedy request")
    flags.DEFINE_float("max_wait_ms", 5.0, "how long the first queued request waits for others to share its batch")
    flags.DEFINE_integer("max_pending_rows", None, "the most rows (requests x n) queued or on the device; a request "
                         "beyond gets a 429 with Retry-After (default: 16 x the largest of the largest bucket and the "
                         "most n, 16)")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    command_line.quiet_logging()
    from gopo_jax.export import RunError  # noqa: PLC0415
    from gopo_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

    api_key = f.api_key or os.environ.get("GOPO_API_KEY") or None
    try:
        if not f.workdir:
            raise RunError("--workdir (a run directory written by the trainer) is required")
        if f.host not in LOOPBACK and not api_key:
            raise RunError(f"--host {f.host} is not loopback: set --api_key or GOPO_API_KEY, so that not everyone "
                           "who can reach the port can query the model")
        buckets = [int(b) for b in f.batch_buckets]
        served = build_api(f.workdir, step=f.step, model_name=f.model_name, api_key=api_key,
                           batch_buckets=buckets, max_wait_s=f.max_wait_ms / 1000, n_candidates=f.n_candidates,
                           max_candidates=f.max_candidates, candidate_temperature=f.candidate_temperature,
                           max_pending_rows=f.max_pending_rows)
    except (RunError, CheckpointError, ValueError) as e:
        command_line.fail(str(e))
    import uvicorn  # noqa: PLC0415

    from gopo_jax.serve.api import create_app  # noqa: PLC0415

    family = socket.AF_INET6 if ":" in f.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((f.host, f.port))  # bound here, so that port 0's pick is known before the first request
    print(f"serving {served.model_name!r} on http://{f.host}:{sock.getsockname()[1]}/v1 "
          f"(iteration {served.engine.run.iteration})", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning")).run(sockets=[sock])


def cli() -> None:
    command_line.run(define_flags, main)
