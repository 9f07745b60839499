"""The OpenAI chat-completions API of a served run (FastAPI + pydantic), with micro-batching and SSE streaming.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`. A request is validated against the pydantic
schema below (a wrong type or an out-of-range value is a 400 naming the field, in OpenAI's error format), encoded
into the run's layout by the engine, and queued. The `MicroBatcher` collects queued requests for at most
`max_wait_s` (or until a batch of `Engine.max_batch` rows is full), groups them by sampling settings and answers each
group with one device call on a worker thread, so the event loop keeps accepting requests meanwhile. It holds at most
`max_pending_rows` rows (queued or on the device): a request beyond that gets a 429 with `Retry-After` rather than
an answer after every client has given up; a client that disconnects while its request waits is dropped from the
queue, so no device time goes to an answer nobody reads. `stream=true`
answers as server-sent events (`chat.completion.chunk` objects, then `data: [DONE]`); a turn's reply is decoded by
one jitted scan, so its tokens are sent when that scan ends, one event per token.

Every choice carries the GOPO extension `gopo: {strategy, strategy_logprob, realised, aligned, sop_valid}` and the
response `gopo: {stage, allowed, ...}`. Without a system message the run's default business context is used (the
world's episode 0; `GET /v1/models` shows it) and the response says so (`gopo.default_context`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from typing import Any, Literal

import jax
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.serve.engine import MAX_TOP_LOGPROBS, Conversation, Engine, Reply, RequestError, Sampling

_log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this long after the request head: >= 35 kB/s at 1 MiB
MAX_N = 16
MAX_SEED = (1 << 63) - 1  # jax.random.key takes an int64
# A temperature below this is served greedily: it samples the most likely token anyway, and logits divided by it
# overflow float32 (5e-324 is 0.0 on the device), which made every log-prob NaN and the response unencodable.
MIN_SAMPLING_TEMPERATURE = 1e-6
PENDING_BATCHES = 16  # by default the batcher holds this many device batches of rows (or of n = MAX_N requests)
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a device batch of the tiny-to-small models served here


IMPOSSIBLE_LOGPROB = -9999.0  # what OpenAI's API reports for a token that cannot be drawn


def _finite_logprob(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else IMPOSSIBLE_LOGPROB

class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # clients add fields (name, refusal, ...) we ignore
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""
    gopo: dict[str, Any] | None = None  # an assistant turn's strategy/stage, as this server returned it

    @field_validator("content")
    @classmethod
    def _encodable(cls, content):
        # JSON's \uD800-style escapes can carry lone surrogates, which the tokenizer rejects with a TypeError (a 500).
        for text in [content] if isinstance(content, str) else [p.text for p in content or ()]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the text is not valid Unicode ({e.reason} at position {e.start})") from None
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    gopo_stage: int | str | None = None  # the SOP stage of the new turn (worlds without a realisation check)
    # Candidate replies the CS drafts for the filter (first aligned, SOP-valid one kept); None: the server's default.
    gopo_n_candidates: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request",
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type_, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


@dataclasses.dataclass
class _Job:
    conversation: Conversation
    n: int
    sampling: Sampling
    future: asyncio.Future


class MicroBatcher:
    """Queues encoded requests and answers them in device batches (one worker thread runs the device).

    At most `max_pending_rows` rows (default PENDING_BATCHES device batches) are admitted and not yet answered; a job
    whose future is cancelled (its client left) before its batch is formed is skipped, never computed.
    """

    def __init__(self, engine: Engine, *, max_wait_s: float = 0.005, seed: int = 0,
                 max_pending_rows: int | None = None):
        self.engine, self.max_wait_s = engine, max_wait_s
        self.max_pending_rows = (PENDING_BATCHES * max(engine.max_batch, MAX_N) if max_pending_rows is None
                                 else max_pending_rows)
        if self.max_pending_rows < max(engine.max_batch, MAX_N):
            raise ValueError(f"max_pending_rows={self.max_pending_rows} is below one device batch "
                             f"({engine.max_batch} rows) or one request's most rows (n={MAX_N}): such requests could "
                             "never be admitted")
        self.pending_rows = 0  # admitted and not yet answered, failed or abandoned
        self.rows_abandoned = 0  # rows of clients that left before their batch was formed: never computed
        self._queue: asyncio.Queue[_Job] | None = None
        self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gopo-device")
        self._key = jax.random.key(seed)
        self._batches = 0
        self.device_calls = 0  # batches answered (tests and the load benchmark read how requests were grouped)
        self.rows_served = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._device.shutdown(wait=True)

    def submit(self, conversation: Conversation, n: int, sampling: Sampling) -> asyncio.Future:
        """Queues a request of `n` rows; its future gets the replies. Cancelling the future withdraws the request.
        Raises a 429 APIError when admitting it would hold more than `max_pending_rows` rows."""
        if self.pending_rows + n > self.max_pending_rows:
            raise APIError(429, f"the server is busy: {self.pending_rows} rows are waiting for the device and this "
                           f"request of {n} would pass its limit of {self.max_pending_rows}; retry in a moment",
                           code="server_busy", type_="rate_limit_error",
                           headers={"retry-after": str(RETRY_AFTER_S)})
        future = asyncio.get_running_loop().create_future()
        self.pending_rows += n
        future.add_done_callback(functools.partial(self._release, n))
        self._queue.put_nowait(_Job(conversation, n, sampling, future))
        return future

    def _release(self, n: int, future: asyncio.Future) -> None:
        self.pending_rows -= n

    def _live(self, job: _Job) -> bool:
        if job.future.cancelled():
            self.rows_abandoned += job.n
            return False
        return True

    async def _collect(self) -> list[_Job]:
        """The next batch's jobs, in arrival order: the first live job, then whatever arrives within `max_wait_s`,
        up to a device batch of rows; jobs withdrawn meanwhile are dropped."""
        jobs = [await self._queue.get()]
        while not self._live(jobs[0]):
            jobs = [await self._queue.get()]
        rows, deadline = jobs[0].n, time.monotonic() + self.max_wait_s
        while rows < self.engine.max_batch:
            try:
                job = self._queue.get_nowait() if time.monotonic() >= deadline else await asyncio.wait_for(
                    self._queue.get(), deadline - time.monotonic())
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if self._live(job):
                jobs.append(job)
                rows += job.n
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            groups: dict[Any, list[_Job]] = {}
            for job in jobs:
                # A seeded request gets a batch of its own: its draw then depends on its seed alone.
                groups.setdefault(job.sampling if job.sampling.seed is None else id(job), []).append(job)
            for grouped in groups.values():
                group = [job for job in grouped if self._live(job)]  # not withdrawn while earlier groups decoded
                if not group:
                    continue
                sampling = group[0].sampling
                conversations = [job.conversation for job in group for _ in range(job.n)]
                # Everything a request's values reach happens inside the try: an exception that escaped it would
                # end this task, and every later request would wait for ever.
                try:
                    if sampling.seed is not None:
                        key = jax.random.key(sampling.seed)
                    else:
                        self._batches += 1
                        key = jax.random.fold_in(self._key, self._batches)
                    replies = await loop.run_in_executor(self._device, self.engine.answer, conversations, sampling,
                                                         key)
                except Exception as e:  # noqa: BLE001  (the requests get a 500; the batcher keeps serving)
                    _log.exception("device batch failed")
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                self.device_calls += 1
                self.rows_served += len(conversations)
                start = 0
                for job in group:
                    if not job.future.done():  # a client that left while its batch was on the device
                        job.future.set_result(replies[start:start + job.n])
                    start += job.n


class BodyLimit:
    """ASGI middleware: reads the request body before the app does, within limits. A body over `limit` bytes gets a
    413 (declared or streamed), one not received within `timeout_s` of the request head a 408: uvicorn has no body
    timeout of its own, so a client that sent part of a body and stalled would hold its connection for ever. The
    app cannot raise these itself: FastAPI answers any exception raised while it reads a body with a 400."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large.response()(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except _BodyTooLarge:
            return await too_large.response()(scope, receive, send)
        except TimeoutError:
            late = APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                            code="request_timeout", headers={"connection": "close"})
            # The client is still inside its body: close the connection rather than read on after the answer.
            return await late.response()(scope, receive, send)
        if body is None:  # the client left; nobody reads this answer, but the API-key middleware needs one
            return await APIError(400, "the client disconnected inside its request body",
                                  code="client_disconnected").response()(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:  # after the body, receive() waits for the client to disconnect
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                return bytes(body)


class _BodyTooLarge(Exception):
    pass


class ServedAPI:
    """The routes' logic over one engine: request -> conversation -> replies -> OpenAI response."""

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None = None, max_wait_s: float = 0.005,
                 body_timeout_s: float = BODY_TIMEOUT_S, max_pending_rows: int | None = None):
        self.engine, self.model_name, self.api_key, self.body_timeout_s = engine, model_name, api_key, body_timeout_s
        self.batcher = MicroBatcher(engine, max_wait_s=max_wait_s, max_pending_rows=max_pending_rows)
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "a valid API key is required: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    def sampling(self, req: ChatRequest) -> tuple[Sampling, int]:
        if req.tools or req.functions:
            raise APIError(400, "tools/functions are not supported by this server", param="tools")
        if req.model not in (None, "", self.model_name):
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {self.model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        reply_len = self.engine.layout.reply_len
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens or reply_len
        if max_tokens > reply_len:
            raise APIError(400, f"{field}={max_tokens}: this run's CS writes at most {reply_len} tokens per turn "
                           "(layout.reply_len, what it was trained on)", param=field)
        n_candidates = self.engine.n_candidates if req.gopo_n_candidates is None else req.gopo_n_candidates
        if isinstance(n_candidates, bool) or not 1 <= n_candidates <= self.engine.max_candidates:
            raise APIError(400, f"gopo_n_candidates={n_candidates}: this server drafts 1..{self.engine.max_candidates} "
                           "candidate replies per turn (its max_candidates)", param="gopo_n_candidates")
        wants_alternatives = bool(req.logprobs and req.top_logprobs)
        # The engine compiles a program per (greedy, nucleus filter or not, alternatives or not): tens of seconds in
        # which no request is answered. top_p's value is an argument of the program; greedy decoding ignores it; a
        # request for alternatives gets the most of them (its choices keep the first top_logprobs).
        temperature = 0.0 if req.temperature < MIN_SAMPLING_TEMPERATURE else req.temperature
        return Sampling(temperature=temperature, top_p=1.0 if temperature == 0.0 else req.top_p,
                        top_logprobs=MAX_TOP_LOGPROBS if wants_alternatives else 0, seed=req.seed,
                        n_candidates=n_candidates), max_tokens

    async def complete(self, req: ChatRequest, request: Request):
        """The response to `req`, which came in `request`: a client that disconnects before its answer withdraws it
        from the batcher's queue."""
        sampling, max_tokens = self.sampling(req)
        try:
            # Off the event loop: tokenising and realising a long history must not stall other requests' I/O.
            conversation = await asyncio.to_thread(self.engine.encode, [
                {"role": m.role, "content": m.text(), "gopo": m.gopo} for m in req.messages], req.gopo_stage)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        answer = self.batcher.submit(conversation, req.n, sampling)
        await _unless_client_leaves(answer, request)
        replies = answer.result()
        completion = self.response(conversation, replies, req, max_tokens)
        if not req.stream:
            return JSONResponse(completion)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(self.events(completion, replies, max_tokens, include_usage),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------------------------------ responses
    def choice(self, index: int, reply: Reply, conversation: Conversation, max_tokens: int, logprobs: bool,
               top_n: int) -> dict:
        engine, sop = self.engine, self.engine.sop
        ids = reply.token_ids[:max_tokens]
        finish = "stop" if reply.stopped and len(reply.token_ids) <= max_tokens else "length"
        allowed = sop.allowed[conversation.stage]
        # A reply cut by max_tokens is realised as cut; an uncut one keeps what the device computed.
        cut = len(ids) < len(reply.token_ids)
        realised = engine.realised(dataclasses.replace(reply, token_ids=ids, stopped=finish == "stop",
                                                       realised=None if cut else reply.realised))
        recognised = realised not in (None, UNRECOGNISED)
        gopo = {"strategy": None if reply.strategy is None else sop.strategies[reply.strategy],
                "strategy_logprob": reply.strategy_logprob,
                "realised": sop.strategies[realised] if recognised else None,
                "aligned": None if realised is None or reply.strategy is None else realised == reply.strategy,
                "sop_valid": None if realised is None else bool(recognised and allowed[realised])}
        choice = {"index": index, "message": {"role": "assistant", "content": engine.text(ids)},
                  "finish_reason": finish, "logprobs": None, "gopo": gopo}
        if logprobs:
            top = reply.top_logprobs or ((),) * len(ids)
            choice["logprobs"] = {"content": [self._logprob(i, lp, alternatives[:top_n])
                                              for i, lp, alternatives in zip(ids, reply.token_logprobs, top)]}
        return choice

    def _logprob(self, token_id: int, logprob: float, top) -> dict:
        text = self.engine.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                # A token outside the sampled distribution's support (top_p) has log-prob -inf, which JSON cannot
                # carry: it is written as -9999.0, OpenAI's value for an impossible token, so there are always top_n.
                "top_logprobs": [{"token": (s := self.engine.token_text(i)), "logprob": _finite_logprob(v),
                                  "bytes": list(s.encode("utf-8"))} for i, v in top]}

    def response(self, conversation: Conversation, replies: list[Reply], req: ChatRequest, max_tokens: int) -> dict:
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        choices = [self.choice(i, r, conversation, max_tokens, req.logprobs, top_n) for i, r in enumerate(replies)]
        prompt_tokens = int(conversation.context_valid.sum() + conversation.customer_valid.sum() + sum(
            t.customer_valid.sum() + t.reply_valid.sum() for t in conversation.past))
        completion_tokens = sum(min(len(r.token_ids), max_tokens) for r in replies)
        sop = self.engine.sop
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "gopo": {"stage": sop.stages[conversation.stage],
                         "allowed": [k for k, ok in zip(sop.strategies, sop.allowed[conversation.stage]) if ok],
                         "sop_mask": self.engine.sop_mask, "use_expert": self.engine.use_expert,
                         "iteration": self.engine.run.iteration, "default_context": conversation.default_context}}

    def events(self, completion: dict, replies: list[Reply], max_tokens: int, include_usage: bool):
        """The completion as `chat.completion.chunk` server-sent events: per choice the role, one content delta
        per token (the texts of growing prefixes, so the deltas join to the message content), then the finish."""
        head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                "model": completion["model"]}

        def event(choices, **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        for choice, reply in zip(completion["choices"], replies):
            index = choice["index"]
            yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            ids, sent = reply.token_ids[:max_tokens], ""
            for j, token_logprob in enumerate(choice["logprobs"]["content"] if choice["logprobs"] else
                                              [None] * len(ids)):
                text = self.engine.text(ids[:j + 1])
                # A prefix that ends inside a multi-byte character decodes to U+FFFD: wait for the rest of it.
                if text.endswith("\ufffd") or not text.startswith(sent) or text == sent:
                    continue
                delta, sent = text[len(sent):], text
                yield event([{"index": index, "delta": {"content": delta}, "finish_reason": None,
                              "logprobs": None if token_logprob is None else {"content": [token_logprob]}}])
            rest = choice["message"]["content"][len(sent):] if choice["message"]["content"].startswith(sent) else ""
            if rest:
                yield event([{"index": index, "delta": {"content": rest}, "finish_reason": None}])
            yield event([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"],
                          "gopo": choice["gopo"]}], gopo=completion["gopo"])
        if include_usage:
            yield event([], usage=completion["usage"])
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "gopo-jax",
                                            "gopo": {"default_context": self.engine.default_context_text(),
                                                     "sop": self.engine.sop.name,
                                                     "strategies": list(self.engine.sop.strategies),
                                                     "max_turns": self.engine.layout.max_turns,
                                                     "max_tokens": self.engine.layout.reply_len}}]}


async def _unless_client_leaves(answer: asyncio.Future, request: Request) -> None:
    """Waits for `answer`, or until the client disconnects: then cancels it (the batcher skips it if its batch has
    not formed yet) and raises a 400 that nobody reads. Starlette does not end a handler whose client left."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":  # the body was read: only a disconnect comes
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not answer.done():
        answer.cancel()
        raise APIError(400, "the client disconnected before its answer", code="client_disconnected")


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def create_app(served: ServedAPI) -> FastAPI:
    """The FastAPI app of a served run; the batcher starts with the app and stops with it."""

    async def lifespan(app):
        served.batcher.start()
        yield
        await served.batcher.stop()

    app = FastAPI(title=f"gopo-jax: {served.model_name}", lifespan=lifespan)
    app.add_middleware(BodyLimit, timeout_s=served.body_timeout_s)

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        # Before the body is read or validated: without the key a caller learns nothing about the API.
        if request.url.path.startswith("/v1/"):
            try:
                served.check_key(request)
            except APIError as err:
                return err.response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        message, param = _validation_message(err)
        return APIError(400, message, param=param,
                        code="invalid_json" if message.startswith("the request body") else "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        if err.status_code == 404:
            return APIError(404, f"no route {request.method} {request.url.path}; routes: POST /v1/chat/completions, "
                            "GET /v1/models, GET /health", code="not_found").response()
        if err.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(err.status_code, str(err.detail), code="http_error").response()

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        _log.exception("request failed")
        # The exception's text stays in the server log: it can quote library internals and the request's values.
        return APIError(500, "internal error (the server log has the details)", code="internal_error",
                        type_="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.model_name, "iteration": served.engine.run.iteration}

    @app.get("/v1/models")
    async def models():
        return served.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await served.complete(body, request)

    return app
