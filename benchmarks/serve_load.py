"""Load test of the served chat endpoint through the official `openai` SDK: C concurrent clients x R requests each
against a trained tiny run, for the micro-batching server (gopo_jax.serve) and, side by side in the same process,
the same server answering one request per device call (batch bucket 1, no wait for company): what micro-batching
buys, everything else equal.

    python -m benchmarks.serve_load [--workdir RUN] [--clients 32] [--requests 20]

Without `--workdir` a tiny run is trained first (a short SFT of a 2-layer, 64-wide pair on the synthetic shop, so
the CS writes words and ends its turns; about two minutes on two cores). The requests are the turns of held-out
evaluation dialogues with their history (1 to max_turns turns), sampled at temperature 0.7; every fifth request of
the micro-batching server streams (`stream=true`) and is checked to join to a complete reply. Every request must
return 200. Prints p50/p99 latency, throughput and the device batches, then
`RESULT serve_load ratio=<throughput of the micro-batching server / the one-at-a-time one> goal=<x>`.

(Until 2026-12-04 the reference was the serial server of commit aaf2be2 imported from git into the current package;
it stopped importing when the package's sampler API moved, so it could no longer be measured.)
"""
from __future__ import annotations

import concurrent.futures
import logging
import pathlib
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import openai
from absl import flags

from gopo_jax import command_line


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a trained run to serve (default: train a tiny one in a temporary folder)")
    flags.DEFINE_integer("clients", 32, "concurrent clients")
    flags.DEFINE_integer("requests", 20, "requests per client")
    flags.DEFINE_list("batch_buckets", ["1", "4", "16", "32"], "device batch sizes of the micro-batching server")
    flags.DEFINE_float("max_wait_ms", 5.0, "the micro-batcher's wait for company")
    flags.DEFINE_float("goal", 4.0, "throughput ratio goal")


def train_tiny_run(workdir: pathlib.Path) -> pathlib.Path:
    from gopo_jax.train.driver import train_run
    from tests.helpers import tiny_run_config

    c = tiny_run_config()
    c.unlock()
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
    c.sft.steps, c.sft.episodes, c.sft.batch_size = 150, 128, 16
    c.train.steps, c.train.groups, c.train.group_size = 1, 4, 2
    c.train.eval_every = c.train.checkpoint_every = 1
    c.eval.episodes = 16
    c.lock()
    train_run(c, workdir)
    return workdir


def evaluation_conversations(engine, count: int = 8) -> list[list[dict]]:
    """Every turn of `count` held-out dialogues of the evaluation rollout, as chat messages with their history."""
    run, layout, world = engine.run, engine.layout, engine.world
    traj = jax.device_get(run.components.eval_rollout(run.params, run.components.eval_episodes()[:count],
                                                      jax.random.key(0)))

    def content(i, start, length, role):
        ids, valid = traj.tokens[i, start:start + length], traj.valid[i, start:start + length]
        return world.chat_format.content_text(world.tokenizer, ids[valid], role)

    conversations = []
    for i in range(count):
        messages = [{"role": "system", "content": content(i, 0, layout.context_len, "system")}]
        for t in range(int(traj.turn_mask[i].sum())):
            messages.append({"role": "user", "content": content(i, layout.turn_start(t), layout.customer_len,
                                                                 "user")})
            conversations.append(list(messages))
            at = layout.reply_start(t)
            messages.append({"role": "assistant", "content": engine.codec.reply_text(
                traj.tokens[i, at:at + layout.reply_len], traj.valid[i, at:at + layout.reply_len])})
    return conversations


def load(url: str, conversations: list[list[dict]], clients: int, requests: int, *, stream_every: int = 0) -> dict:
    """`clients` threads each send `requests` requests through the SDK; latencies, statuses and stream checks."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="load-test", max_retries=0, timeout=600)
    latencies, failures, streamed = [], [], 0
    lock = threading.Lock()

    def one(c: int, r: int) -> None:
        nonlocal streamed
        messages = conversations[(c * requests + r) % len(conversations)]
        stream = stream_every > 0 and (c * requests + r) % stream_every == 0
        start = time.perf_counter()
        try:
            if stream:
                chunks = list(client.chat.completions.create(model="load", messages=messages, temperature=0.7,
                                                             stream=True))
                finished = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
                if len(finished) != 1:
                    raise RuntimeError(f"a stream ended without one finish chunk ({len(chunks)} chunks)")
            else:
                client.chat.completions.create(model="load", messages=messages, temperature=0.7)
        except Exception as e:  # noqa: BLE001  (every failure is counted and shown)
            with lock:
                failures.append(f"{type(e).__name__}: {e}")
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            streamed += stream

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda job: one(*job), [(c, r) for c in range(clients) for r in range(requests)]))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {"ok": len(latencies), "failed": len(failures), "first_failure": failures[0] if failures else None,
            "wall_s": wall, "throughput": len(latencies) / wall, "streamed": streamed,
            "p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else float("nan")}


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    command_line.quiet_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from gopo_jax.serve import build_api, start_server

    workdir = pathlib.Path(f.workdir) if f.workdir else train_tiny_run(pathlib.Path(tempfile.mkdtemp()) / "run")
    start = time.perf_counter()
    served = build_api(workdir, model_name="load", batch_buckets=[int(b) for b in f.batch_buckets],
                       max_wait_s=f.max_wait_ms / 1000)
    startup = time.perf_counter() - start
    conversations = evaluation_conversations(served.engine)
    total = f.clients * f.requests
    print(f"{total} requests ({f.clients} clients x {f.requests}) over {len(conversations)} held-out turns; "
          f"micro-batching server ready in {startup:.1f} s (programs compiled for buckets {f.batch_buckets})")

    running = start_server(served)
    batched = load(running.url, conversations, f.clients, f.requests, stream_every=5)
    running.stop()
    batches = served.batcher.device_calls
    one_at_a_time = build_api(workdir, model_name="load", batch_buckets=[1], max_wait_s=0.0)
    running = start_server(one_at_a_time)
    serial = load(running.url, conversations, f.clients, f.requests)
    running.stop()

    print(f"{'server':<22}{'200s':>8}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>9}{'wall s':>9}")
    for name, r in (("micro-batching", batched), ("one at a time", serial)):
        print(f"{name:<22}{r['ok']:>8}{r['failed']:>8}{r['p50_ms']:>10.0f}{r['p99_ms']:>10.0f}"
              f"{r['throughput']:>9.1f}{r['wall_s']:>9.1f}")
    print(f"micro-batching: {batches} device calls for {served.batcher.rows_served} rows "
          f"({served.batcher.rows_served / max(batches, 1):.1f} rows per call); {batched['streamed']} streamed "
          "requests ended with one finish chunk")
    for name, r in (("micro-batching", batched), ("one at a time", serial)):
        if r["failed"]:
            print(f"{name}: {r['failed']} failed, first: {r['first_failure']}", file=sys.stderr)
    ratio = batched["throughput"] / serial["throughput"] if batched["failed"] == 0 else 0.0
    print(f"RESULT serve_load ratio={ratio:.2f} goal={f.goal}")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
