"""The prompted-model baseline end to end against the project's own server (live loopback): a chat model acts as
the CS of the real MG-ShopDial world through `train(config)` with method=prompted, and the summary has a run's
shape so the comparison tables read it like any method's."""
import json
import math

import pytest

from configs import mgshop, mgshop_real
from gopo_jax.launch import train
from test_serve import server  # noqa: F401  (the live server fixture)


def prompted_config(base_url: str, data_dir: str):
    c = mgshop_real.get_config()
    with c.unlocked():
        c.method = "prompted"
        c.env.data_dir = data_dir
        c.layout.max_turns = 3
        c.eval.episodes = 2
        c.baselines.prompted.base_url = base_url
        c.baselines.prompted.model = "tiny-gopo"
        c.baselines.prompted.max_tokens = 6
    return c


def test_prompted_model_serves_the_held_out_customers(server, shared_data, tmp_path):  # noqa: F811
    c = prompted_config(f"http://127.0.0.1:{server.server_address[1]}", str(shared_data / "mgshopdial"))
    summary = train(c, tmp_path)
    assert summary["method"] == "prompted" and summary["endpoint"]["model"] == "tiny-gopo"
    assert json.loads((tmp_path / "summary.json").read_text())["prompted"]["tse"]["n"] == 2
    for name in ("reference", "prompted"):
        block = summary[name]
        assert all(math.isfinite(block[k]["mean"]) for k in ("tse", "gre", "esndcg", "sop_validity"))
        assert 1 <= block["turns"]["mean"] <= 3
    # The tiny untrained server names no strategy: the world's realisation check decides every turn, so the
    # prompted agent is never "aligned" with a chosen strategy it never chose.
    assert summary["prompted"]["alignment"]["mean"] == 0.0


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
