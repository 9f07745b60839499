"""Serves a finished run's agent pair as an OpenAI-compatible chat endpoint on loopback (standard library only).

    python -m gopo_jax.serve --workdir runs/mgshop [--port 8000] [--host 127.0.0.1] [--model-name NAME]

Endpoints: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`. In-process (tests): `make_server(workdir,
host, port)` returns a `ThreadingHTTPServer`; run `serve_forever` in a thread (port 0 picks a free port).

The run is rebuilt from its workdir: `config.json` (the resolved config), `tokenizer/` and the newest checkpoint
(restored with `restore_checkpoint` into the `Run`'s own state layout, so a checkpoint of another config is refused
with the checkpoint module's message). The served weights are the run's latest trained parameters.

Messages -> token ids, in the dialogue layout the agents were trained on (appending ids, never re-tokenising):
`system` -> business context (`<|context|> ...`), `user` -> a customer turn (`<|customer|> ... <|eot|>`),
`assistant` -> an agent turn (`<|agent|> <stage:σ> <s:k> reply <|eot|>`). The SOP stage σ of each agent turn is
tracked by realising every earlier assistant reply with the environment's realisation check and advancing the SOP
on the realised strategy (GOPO.md §1); an assistant message may carry `"gopo": {"strategy": NAME}` (as returned
by this server) to state its decision token, else the realised strategy is used. A request field `gopo_stage`
(stage name or index) overrides the stage of the turn being generated; it is required only for an environment
without a realisation check.

One completion: the Expert scores the strategy tokens at the decision position, masks them with the SOP
(`M[σ]`, disallowed strategies get probability 0; unless the run was trained with the no-SOP-mask ablation) and
picks `k` (sampled at `temperature`, argmax at 0); the CS writes the reply after `<s:k>` until `<|eot|>` or
`max_tokens`. Runs without an Expert (no-EA ablation, single-agent baselines) skip the decision. Every choice
carries `gopo: {strategy, strategy_logprob, realised, aligned, sop_valid}` and the response `gopo: {stage,
allowed}`. Honoured: `n`, `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `logprobs`
with `top_logprobs` (this server allows up to the vocabulary size, not only 20, so a judge can read every score
token). Not supported (HTTP 400): `stream`, tools. Errors are OpenAI-style JSON `{"error": {message, type, param,
code}}` with HTTP 400 / 404 / 405 / 413 / 500.

Prompts longer than what the agents were trained on are accepted (RoPE has no table), but the agents have only
ever seen dialogues of the run's layout length; `max_context` bounds the prompt.
"""
from __future__ import annotations

import argparse
import http.server
import json
import logging
import pathlib
import threading
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gopo_jax.dialogue.sop import UNRECOGNISED, masked_strategy_log_softmax
from gopo_jax.models import qwen3
from gopo_jax.sampling import filter_logits

_log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
MAX_N = 16
_BUCKET = 32  # prompt lengths are padded to a multiple of this, so few shapes compile


class ServeError(Exception):
    """A request or workdir problem, reported to the caller as an OpenAI-style error."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str = "invalid_request", type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class ServedRun:
    """A finished run's agents, tokenizer and SOP, ready to answer chat requests (thread-safe via one lock)."""

    def __init__(self, workdir: str | pathlib.Path, *, model_name: str | None = None, max_context: int = 4096,
                 max_new_tokens: int = 256):
        from gopo_jax.train.driver import restore_agents  # noqa: PLC0415  (heavy imports only when serving)

        workdir = pathlib.Path(workdir)
        for needed, what in (("config.json", "the resolved run config"), ("tokenizer/tokenizer.json",
                                                                           "the run's tokenizer")):
            if not (workdir / needed).exists():
                raise ServeError(f"{workdir / needed} is missing ({what}); point --workdir at a run directory "
                                 "written by the trainer (python -m experiments.mgshop ...)", status=500,
                                 code="bad_workdir", type_="server_error")
        config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
        restored = restore_agents(workdir, config)
        if restored is None:
            raise ServeError(f"{workdir / 'checkpoints'} holds no checkpoint; train the run first (its first "
                             "checkpoint is written at the end of the warm start)", status=500, code="bad_workdir",
                             type_="server_error")
        c, params, self.iteration = restored
        self.params = jax.device_get(params)
        world = c.world
        self.config, self.world, self.workdir = config, world, workdir
        self.model_name = model_name or workdir.resolve().name
        self.env, self.tokenizer, self.sop = world.env, world.tokenizer, world.spec.sop
        self.vocab = world.vocab
        self.use_expert = c.method.use_expert
        self.sop_mask = bool(c.hyper.sop_mask)
        self.expert_gd, self.cs_gd = c.expert_gd, c.cs_gd
        self.vocab_size = world.model_config.vocab_size
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._requests = 0
        self._expert_logits = jax.jit(self._expert_logits_impl)
        self._cs_prefill = jax.jit(self._cs_prefill_impl, static_argnames=("cache_len",))
        self._cs_step = jax.jit(self._cs_step_impl, static_argnames=("top_p", "top_n"))

    # ------------------------------------------------------------------------------------------ jitted pieces
    def _expert_logits_impl(self, params, tokens, valid):
        """Strategy-token logits at the last valid slot of one prompt: f32[n_k]."""
        model = nnx.merge(self.expert_gd, params)
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        logits, _ = model(tokens, positions, valid)
        last = tokens.shape[1] - 1 - jnp.argmax(valid[0, ::-1])
        return logits[0, last][jnp.asarray(self.vocab.strategy_ids)]

    def _cs_prefill_impl(self, params, tokens, valid, *, cache_len):
        from gopo_jax.sampling import prefill  # noqa: PLC0415
        model = nnx.merge(self.cs_gd, params)
        cache = qwen3.init_cache(model.config, tokens.shape[0], cache_len)
        return prefill(model, cache, tokens, valid)

    def _cs_step_impl(self, params, cache, logits, key, positions, active, temperature, *, top_p, top_n):
        """Samples one token per row from `logits` (policy log-prob and the top-n alternatives under the
        unmodified policy, as OpenAI reports them), then feeds it to the CS."""
        logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_p=top_p)
        ids = jnp.where(temperature > 0, jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32), greedy)
        ids = jnp.where(active, ids, self.vocab.pad)
        logp = jnp.take_along_axis(logp_all, ids[:, None], axis=1)[:, 0]
        top_vals, top_ids = jax.lax.top_k(logp_all, top_n)
        model = nnx.merge(self.cs_gd, params)
        new_logits, cache = model(ids[:, None], positions[:, None], active[:, None], cache)
        return ids, logp, top_vals, top_ids, new_logits[:, 0], cache

    # ------------------------------------------------------------------------------------------ text <-> ids
    def _encode(self, text: str) -> list[int]:
        # A content as the run's chat template encodes it (gopo_jax.models.chat_format).
        text = text.strip()
        return self.world.chat_format.content_ids(self.tokenizer, text) if text else []

    def realise(self, reply_ids: list[int]) -> int | None:
        """The environment's realisation check on reply ids; None when the environment has none."""
        fn = getattr(self.env, "realise", None)
        if fn is None:
            return None
        ids = np.asarray(reply_ids or [self.vocab.pad], np.int32)
        out = fn(jnp.asarray(ids), jnp.asarray(ids != self.vocab.pad) if reply_ids else jnp.zeros(1, bool))
        return int(out[0] if isinstance(out, tuple) else out)

    def stage_name(self, stage: int) -> str:
        return self.sop.stages[stage]

    def _parse_stage(self, value: Any, param: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ServeError(f"{param} must be a stage name or index of SOP {self.sop.name!r}: {list(self.sop.stages)}",
                             param=param)
        if isinstance(value, int):
            if not 0 <= value < self.sop.num_stages:
                raise ServeError(f"{param}={value} is out of range 0..{self.sop.num_stages - 1}", param=param)
            return value
        if value not in self.sop.stages:
            raise ServeError(f"{param}={value!r} is not a stage of SOP {self.sop.name!r}: {list(self.sop.stages)}",
                             param=param)
        return self.sop.stages.index(value)

    def encode_messages(self, messages: list[dict], gopo_stage: Any = None) -> tuple[list[int], int]:
        """Chat messages -> (prompt ids ending with the new agent header, SOP stage of the new turn)."""
        ids: list[int] = []
        fmt = self.world.chat_format
        stage = int(self.sop.initial)
        has_realise = getattr(self.env, "realise", None) is not None
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):
                ids += [*fmt.system_open, *self._encode(content), *fmt.system_close]
            elif role == "user":
                ids += [*fmt.user_open, *self._encode(content), *fmt.user_close]
            else:  # assistant
                reply = self._encode(content)
                declared = (m.get("gopo") or {}).get("strategy") if isinstance(m.get("gopo"), dict) else None
                realised = self.realise(reply)
                if declared is not None:
                    if declared not in self.sop.strategies:
                        raise ServeError(f"messages[{i}].gopo.strategy={declared!r} is not a strategy of SOP "
                                         f"{self.sop.name!r}: {list(self.sop.strategies)}", param=f"messages[{i}]")
                    decision = self.sop.strategies.index(declared)
                else:
                    decision = realised if realised is not None and realised != UNRECOGNISED else None
                if not has_realise and isinstance(m.get("gopo"), dict) and "stage" in m["gopo"]:
                    stage = self._parse_stage(m["gopo"]["stage"], f"messages[{i}].gopo.stage")
                ids += [*self.vocab.header_open, self.vocab.stage_ids[stage]]
                if self.use_expert and decision is not None:
                    ids.append(self.vocab.strategy_ids[decision])
                ids += [*reply, self.vocab.eot]
                if realised is not None and realised != UNRECOGNISED and self.sop.allowed[stage, realised]:
                    stage = int(self.sop.transition[stage, realised])
        if gopo_stage is not None:
            stage = self._parse_stage(gopo_stage, "gopo_stage")
        elif not has_realise and any(m["role"] == "assistant" for m in messages):
            raise ServeError(f"environment {self.world.spec.name!r} has no realisation check to track the SOP "
                             "stage; send the stage of the new turn as `gopo_stage`", param="gopo_stage")
        ids += [*self.vocab.header_open, self.vocab.stage_ids[stage]]
        return ids, stage

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------------------------------ one request
    def complete(self, request: dict) -> dict:
        req = validate_request(request, self)
        with self._lock:
            self._requests += 1
            key = (jax.random.key(req["seed"]) if req["seed"] is not None
                   else jax.random.fold_in(jax.random.key(int(time.time_ns() % (1 << 31))), self._requests))
            return self._complete(req, key)

    def _complete(self, req: dict, key: jax.Array) -> dict:
        prompt, stage = self.encode_messages(req["messages"], req["gopo_stage"])
        if len(prompt) + 1 > self.max_context:
            raise ServeError(f"the prompt is {len(prompt)} tokens; this server accepts at most {self.max_context} "
                             "(--max-context)", param="messages", code="context_length_exceeded")
        n, temperature = req["n"], req["temperature"]
        k_expert, k_cs = jax.random.split(key)
        allowed = np.asarray(self.sop.allowed[stage])
        width = _round_up(len(prompt) + 1, _BUCKET)
        strategies, strategy_logps = [None] * n, [None] * n
        if self.use_expert:
            tokens = np.full((1, width), self.vocab.pad, np.int32)
            tokens[0, :len(prompt)] = prompt
            logits = self._expert_logits(self.params["expert"], jnp.asarray(tokens),
                                         jnp.asarray(tokens != self.vocab.pad) & (np.arange(width) < len(prompt)))
            mask = allowed if self.sop_mask else np.ones_like(allowed)
            logp = np.asarray(masked_strategy_log_softmax(logits[None], jnp.asarray(mask)[None])[0], np.float64)
            if temperature == 0:
                picks = np.full((n,), int(np.argmax(logp)))
            else:
                picks = np.asarray(jax.random.categorical(k_expert, jnp.asarray(logp / temperature), shape=(n,)))
            strategies = [int(k) for k in picks]
            strategy_logps = [float(logp[k]) for k in strategies]
        tokens = np.full((n, width), self.vocab.pad, np.int32)
        valid = np.zeros((n, width), bool)
        tokens[:, :len(prompt)], valid[:, :len(prompt)] = prompt, True
        if self.use_expert:
            tokens[:, len(prompt)] = [self.vocab.strategy_ids[k] for k in strategies]
            valid[:, len(prompt)] = True
        max_tokens, top_n = req["max_tokens"], req["top_logprobs"] if req["logprobs"] else 1
        last_logits, positions, cache = self._cs_prefill(self.params["cs"], jnp.asarray(tokens), jnp.asarray(valid),
                                                         cache_len=width + _round_up(max_tokens, _BUCKET))
        out_ids, out_logp, out_top = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        active = np.ones((n,), bool)
        finish = ["length"] * n
        for t in range(max_tokens):
            ids, logp, top_vals, top_ids, last_logits, cache = self._cs_step(
                self.params["cs"], cache, last_logits, jax.random.fold_in(k_cs, t), positions, jnp.asarray(active),
                jnp.float32(temperature), top_p=req["top_p"], top_n=top_n)
            ids, logp, top_vals, top_ids = map(np.asarray, (ids, logp, top_vals, top_ids))
            positions = positions + jnp.asarray(active, jnp.int32)
            for b in np.flatnonzero(active):
                out_ids[b].append(int(ids[b]))
                out_logp[b].append(float(logp[b]))
                out_top[b].append(list(zip(top_ids[b].tolist(), top_vals[b].tolist())))
                if ids[b] == self.vocab.eot:
                    active[b], finish[b] = False, "stop"
            if not active.any():
                break
        choices = []
        for b in range(n):
            reply = out_ids[b][:-1] if finish[b] == "stop" else out_ids[b]
            realised = self.realise(reply)
            gopo = {"strategy": self.sop.strategies[strategies[b]] if strategies[b] is not None else None,
                    "strategy_logprob": strategy_logps[b],
                    "realised": (self.sop.strategies[realised] if realised not in (None, UNRECOGNISED) else None),
                    "aligned": (None if realised is None or strategies[b] is None else realised == strategies[b]),
                    "sop_valid": (None if realised is None else bool(realised != UNRECOGNISED
                                                                     and allowed[realised]))}
            choice = {"index": b, "message": {"role": "assistant", "content": self.tokenizer.decode(
                reply, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()},
                "finish_reason": finish[b], "logprobs": None, "gopo": gopo}
            if req["logprobs"]:
                choice["logprobs"] = {"content": [self._logprob_entry(i, lp, top[:req["top_logprobs"]])
                                                  for i, lp, top in zip(out_ids[b], out_logp[b], out_top[b])]}
            choices.append(choice)
        completion = sum(len(o) for o in out_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion},
                "gopo": {"stage": self.stage_name(stage),
                         "allowed": [k for k, ok in zip(self.sop.strategies, allowed) if ok],
                         "sop_mask": self.sop_mask, "use_expert": self.use_expert, "iteration": self.iteration}}

    def _logprob_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": (s := self.token_text(i)), "logprob": float(v),
                                  "bytes": list(s.encode("utf-8"))} for i, v in top]}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "gopo-jax"}]}


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ServeError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")


def validate_request(body: Any, served: ServedRun) -> dict:
    """The request's fields, checked and defaulted; raises ServeError naming the bad field."""
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    if body.get("stream"):
        raise ServeError("stream=true is not supported by this server; send stream=false", param="stream")
    if body.get("tools") or body.get("functions"):
        raise ServeError("tools/functions are not supported by this server", param="tools")
    model = body.get("model")
    if model not in (None, "", served.model_name):
        raise ServeError(f"model {model!r} is not served here; this server serves {served.model_name!r} "
                         "(GET /v1/models)", status=404, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError("messages must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ServeError(f"messages[{i}].role must be one of system, developer, user, assistant",
                             param=f"messages[{i}]")
        clean.append({**m, "content": _content_text(m.get("content", ""), i)})

    def number(name, default, lo, hi, kind):
        value = body.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ServeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                             param=name)
        if not lo <= value <= hi:
            raise ServeError(f"{name}={value} is out of range [{lo}, {hi}]", param=name)
        return kind(value)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    top_p = number("top_p", 1.0, 0.0, 1.0, float)
    if top_p <= 0:
        raise ServeError("top_p must be > 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ServeError(f"seed must be an integer, got {seed!r}", param="seed")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ServeError("logprobs must be true or false", param="logprobs")
    return {
        "messages": clean,
        "n": number("n", 1, 1, MAX_N, int),
        "temperature": number("temperature", 1.0, 0.0, 2.0, float),
        "top_p": top_p,
        "max_tokens": int(number("max_tokens", served.world.layout.reply_len if max_tokens is None else max_tokens,
                                 1, served.max_new_tokens, int)),
        "logprobs": logprobs,
        "top_logprobs": number("top_logprobs", 0, 0, served.vocab_size, int) if logprobs else 0,
        "seed": seed,
        "gopo_stage": body.get("gopo_stage"),
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "gopo-jax-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # requests go to the logger, not stderr
        _log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ServeError) -> None:
        self._send(err.status, err.body())

    def do_GET(self):
        served: ServedRun = self.server.served
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": served.model_name, "iteration": served.iteration})
        elif path == "/v1/models":
            self._send(200, served.models())
        elif path == "/v1/chat/completions":
            self._error(ServeError("use POST for /v1/chat/completions", status=405, code="method_not_allowed"))
        else:
            self._error(ServeError(f"no route {path!r}; routes: POST /v1/chat/completions, GET /v1/models, "
                                   "GET /health", status=404, code="not_found"))

    def do_POST(self):
        served: ServedRun = self.server.served
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(ServeError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}", status=413,
                                          code="request_too_large"))
        raw = self.rfile.read(length)
        if path != "/v1/chat/completions":
            return self._error(ServeError(f"no route POST {path!r}; use POST /v1/chat/completions", status=404,
                                          code="not_found"))
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            return self._error(ServeError(f"the request body is not valid JSON ({e})", code="invalid_json"))
        try:
            self._send(200, served.complete(body))
        except ServeError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001  (a bug must answer 500, not drop the connection)
            _log.exception("request failed")
            self._error(ServeError(f"internal error: {type(e).__name__}: {e}", status=500, code="internal_error",
                                   type_="server_error"))


def make_server(workdir: str | pathlib.Path, host: str = "127.0.0.1", port: int = 0, *,
                model_name: str | None = None, **kwargs) -> http.server.ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server for the run in `workdir`; `server.served` is its `ServedRun`."""
    served = ServedRun(workdir, model_name=model_name, **kwargs)
    server = http.server.ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.served = served
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished run directory")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--model-name", default=None, help="model id to serve (default: the workdir's name)")
    parser.add_argument("--max-context", type=int, default=4096)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        server = make_server(args.workdir, args.host, args.port, model_name=args.model_name,
                             max_context=args.max_context)
    except ServeError as e:
        raise SystemExit(f"error: {e}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning("serving on %s, not loopback: anyone who can reach it can query the model", args.host)
    host, port = server.server_address[:2]
    print(f"serving {server.served.model_name!r} on http://{host}:{port}/v1 (iteration {server.served.iteration})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
