"""The server's MicroBatcher on a stand-in engine whose device calls wait for the test: the bound on pending rows
(a 429 with Retry-After past it) and requests withdrawn by clients that left (never computed)."""
import asyncio
import threading

import pytest

from gopo_jax.serve.api import MAX_N, APIError, MicroBatcher
from gopo_jax.serve.engine import Sampling

GREEDY = Sampling(temperature=0.0)


class HeldEngine:
    """Answers each conversation with itself, once the test lets the device call through."""

    max_batch = 4

    def __init__(self):
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.go = threading.Event()

    def answer(self, conversations, sampling, key):
        self.calls.append(list(conversations))
        self.entered.set()
        assert self.go.wait(10), "the test never let the device call through"
        return list(conversations)


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _started(engine, **kwargs) -> MicroBatcher:
    batcher = MicroBatcher(engine, max_wait_s=0.0, **kwargs)
    batcher.start()
    return batcher


def test_a_request_past_the_pending_rows_gets_a_429_until_rows_are_answered():
    async def scenario():
        engine = HeldEngine()
        batcher = _started(engine, max_pending_rows=MAX_N + 1)
        first = batcher.submit("a", MAX_N, GREEDY)
        second = batcher.submit("b", 1, GREEDY)  # exactly at the bound: admitted
        assert batcher.pending_rows == MAX_N + 1
        with pytest.raises(APIError) as refused:
            batcher.submit("c", 1, GREEDY)
        error = refused.value
        assert (error.status, error.code, error.type) == (429, "server_busy", "rate_limit_error")
        assert error.response().headers["retry-after"] == "1"
        assert f"limit of {MAX_N + 1}" in str(error)
        engine.go.set()
        assert await first == ["a"] * MAX_N and await second == ["b"]
        assert batcher.pending_rows == 0
        assert await batcher.submit("c", 1, GREEDY) == ["c"]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_withdrawn_request_is_never_computed_and_frees_its_rows():
    async def scenario():
        engine = HeldEngine()
        batcher = _started(engine)
        on_device = batcher.submit("a", 1, GREEDY)
        await _until(engine.entered.is_set)
        left = batcher.submit("b", 2, GREEDY)
        stays = batcher.submit("c", 1, GREEDY)
        left.cancel()  # its client disconnected while it waited (api._unless_client_leaves)
        await asyncio.sleep(0)  # a future's done callbacks run at the loop's next turn
        assert batcher.pending_rows == 2
        engine.go.set()
        assert await on_device == ["a"] and await stays == ["c"]
        assert engine.calls == [["a"], ["c"]]
        assert batcher.rows_abandoned == 2 and batcher.pending_rows == 0 and batcher.rows_served == 2
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("rows", [0, MAX_N - 1, -3])
def test_a_pending_bound_below_one_request_is_a_config_error(rows):
    with pytest.raises(ValueError, match=f"max_pending_rows={rows} is below one device batch"):
        MicroBatcher(HeldEngine(), max_pending_rows=rows)


def test_the_default_bound_holds_sixteen_batches_or_requests():
    assert MicroBatcher(HeldEngine()).max_pending_rows == 16 * max(HeldEngine.max_batch, MAX_N)
