"""The prompted-model baseline end to end against a stub OpenAI-compatible server on loopback
(test_openai_client.StubOpenAI): a chat model acts as the CS of the real MG-ShopDial world through `train(config)`
with method=prompted, its episodes played concurrently within `baselines.prompted.max_concurrency`, and the summary
has a run's shape so the comparison tables read it like any method's."""
import json
import math
import time

import jax
import numpy as np
import pytest

from configs import mgshop, mgshop_real
from gopo_jax.endpoint import ChatClientError
from gopo_jax.clients.prompted_eval import prompted_agents, rollout_concurrently
from gopo_jax.launch import train
from gopo_jax.train.world import build_world
from test_openai_client import StubOpenAI, stub_reply


def prompted_config(base_url: str, data_dir: str, *, episodes: int, max_concurrency: int, model="served-model"):
    c = mgshop_real.get_config()
    with c.unlocked():
        c.method = "prompted"
        c.env.data_dir = data_dir
        c.layout.max_turns = 3
        c.eval.episodes = episodes
        c.baselines.prompted.base_url = base_url
        c.baselines.prompted.model = model
        c.baselines.prompted.max_tokens = 6
        c.baselines.prompted.max_concurrency = max_concurrency
    return c


@pytest.fixture(scope="module")
def world_dir(shared_data, tmp_path_factory):
    """A workdir holding the MG-ShopDial world's tokenizer, so the tests here train it once."""
    directory = tmp_path_factory.mktemp("prompted")
    build_world(prompted_config("http://127.0.0.1:9", str(shared_data / "mgshopdial"), episodes=1,
                                max_concurrency=1), directory)
    return directory


def test_prompted_model_serves_the_held_out_customers(shared_data, world_dir):
    # Each request waits until two are in flight at once: only a client that overlaps episodes gets past it quickly.
    stub = StubOpenAI(("served-model",), crowd=2, delay=0.02)
    try:
        c = prompted_config(stub.url, str(shared_data / "mgshopdial"), episodes=4, max_concurrency=2)
        summary = train(c, world_dir)
    finally:
        stub.close()
    assert summary["method"] == "prompted" and summary["endpoint"]["model"] == "served-model"
    assert json.loads((world_dir / "summary.json").read_text())["prompted"]["tse"]["n"] == 4
    for name in ("reference", "prompted"):
        block = summary[name]
        assert all(math.isfinite(block[k]["mean"]) for k in ("tse", "gre", "esndcg", "sop_validity"))
        assert 1 <= block["turns"]["mean"] <= 3
    # One request per prompted turn, never more than two in flight, and two at once at some point.
    assert len(stub.chat_requests()) == round(summary["prompted"]["turns"]["mean"] * 4)
    assert stub.max_in_flight == 2


def answer_out_of_order(body: dict, index: int) -> str:
    """The stub's usual answer, slower for shorter dialogues so that concurrent episodes finish out of order."""
    time.sleep(0.05 / len(body["messages"]))
    return stub_reply(body, index)


def test_concurrent_episodes_equal_the_sequential_rollout(shared_data, world_dir):
    stub = StubOpenAI(("served-model",), reply=answer_out_of_order, crowd=3)
    try:
        c = prompted_config(stub.url, str(shared_data / "mgshopdial"), episodes=5, max_concurrency=3)
        world = build_world(c, world_dir)
        episodes, key = world.eval_episodes(c.eval.seed, c.eval.episodes), jax.random.key(c.seed)
        rollout = world.make_rollout(prompted_agents(c.baselines.prompted))
        concurrent = rollout_concurrently(rollout, episodes, key, max_concurrency=3)
        assert stub.max_in_flight == 3
        sequential = rollout({}, episodes, key)
        jax.tree.map(np.testing.assert_array_equal, concurrent, sequential)
        # An endpoint that refuses the model: one clear error naming the settings, raised from the episode threads.
        with c.unlocked():
            c.baselines.prompted.model = "no-such-model"
        refused = world.make_rollout(prompted_agents(c.baselines.prompted))
        with pytest.raises(ChatClientError, match=r"HTTP 404: model 'no-such-model' is not served here; check "
                                                  r"baselines.prompted.base_url / baselines.prompted.model"):
            rollout_concurrently(refused, episodes, key, max_concurrency=3)
    finally:
        stub.close()


def test_prompted_needs_an_endpoint_and_a_text_world(tmp_path):
    c = mgshop.get_config()
    with c.unlocked():
        c.method = "prompted"
        c.baselines.prompted.base_url, c.baselines.prompted.model = "http://127.0.0.1:9", "m"
    with pytest.raises(ValueError, match="needs a text \\(host\\) world"):
        train(c, tmp_path / "shop")
    with c.unlocked():
        c.baselines.prompted.base_url = ""
        c.env.name = "multiwoz"
    with pytest.raises(ValueError, match="baselines.prompted.base_url"):
        train(c, tmp_path / "woz")
    with c.unlocked():
        c.baselines.prompted.max_concurrency = 0
    with pytest.raises(ValueError, match="baselines.prompted.max_concurrency must be at least 1"):
        train(c, tmp_path / "none")
