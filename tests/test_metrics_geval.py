"""G-Eval mechanics: prompts, score extraction and renormalisation, a tiny causal-LM judge (marked unavailable) and
an OpenAI-compatible endpoint judge against a loopback test double of the remote API."""

import http.server
import json
import math
import threading

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax.metrics import geval as ge


def test_build_prompt():
    sample = ge.Sample(
        context="Customer: I need running shoes.", response="What size do you wear?", strategy="elicit_need"
    )
    prompt = ge.build_prompt("fluency", sample)
    assert "Fluency (1-5)" in prompt and sample.context in prompt and sample.response in prompt
    assert "elicit_need" not in prompt and prompt.endswith("- Fluency:")
    assert "Chosen strategy:\nelicit_need" in ge.build_prompt("strategy_faithfulness", sample)
    with pytest.raises(ValueError, match="politeness"):
        ge.build_prompt("politeness", sample)


class ScoreFromLogitsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_renormalised_over_valid_scores(self):
        # Unnormalised probabilities: token 0 (not a score) 10; "1" → 1; "3" spelled by tokens 3 and 6 → 1 + 2.
        # Over the score tokens: p = [1, 0, 3, 0, 0]/4 → score (1·1 + 3·3)/4 = 2.5.
        weights = np.array([10, 1, 0, 1, 0, 0, 2, 0], np.float32)
        logits = jnp.asarray(np.where(weights > 0, np.log(np.maximum(weights, 1e-30)), -1e9), jnp.float32)
        ids = jnp.asarray([[1, -1], [2, -1], [3, 6], [4, -1], [5, -1]], jnp.int32)
        score, probs = self.variant(ge.score_from_logits)(logits, ids)
        np.testing.assert_allclose(probs, [0.25, 0, 0.75, 0, 0], atol=1e-6)
        np.testing.assert_allclose(score, 2.5, rtol=1e-6)


def test_score_from_top_logprobs_and_samples():
    alts = {"4": math.log(0.6), " 5": math.log(0.2), "The": math.log(0.15), "10": math.log(0.05)}
    assert ge.score_from_top_logprobs(alts) == pytest.approx((4 * 0.6 + 5 * 0.2) / 0.8)
    assert ge.score_from_top_logprobs({"The": 0.0}) is None
    assert ge.score_from_samples(["4", " 5 because", "none", "3/5"]) == pytest.approx(4.0)
    assert ge.score_from_samples(["n/a"]) is None


@pytest.fixture(scope="module")
def tiny_judge():
    from gopo_jax.models.qwen3 import Qwen3, get_config
    from gopo_jax.models.tokenizer import train_tokenizer

    corpus = [
        ge.build_prompt(c, ge.Sample("Customer: hi, shoes 1 2 3 4 5?", "Sure, size 4 or 5?", "ask"))
        for c in ge.CRITERIA
    ]
    tokenizer = train_tokenizer(corpus, vocab_size=400, special_tokens=())
    model = Qwen3(get_config("tiny", vocab_size=512), rngs=nnx.Rngs(0))
    return ge.CausalLMJudge(model, tokenizer, name="tiny-random", batch_size=2, bucket=64, use_chat_template=False)


def test_causal_lm_judge_mechanics(tiny_judge):
    prompts = [
        ge.build_prompt("fluency", ge.Sample("Customer: hi", "Hello!")),
        ge.build_prompt("coherence", ge.Sample("Customer: shoes?", "Size 4 or 5?")),
        ge.build_prompt("helpfulness", ge.Sample("Customer: hi", "Hello!")),
    ]
    batched = tiny_judge.score_prompts(prompts)
    assert all(1.0 <= s <= 5.0 for s in batched)
    # The batched, padded judgement equals scoring the prompt's own logits directly.
    ids = tiny_judge.encode(prompts[1])
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = tiny_judge.model(tokens, jnp.arange(len(ids), dtype=jnp.int32)[None], jnp.ones_like(tokens, bool))
    direct, _ = ge.score_from_logits(logits[0, -1], tiny_judge.score_ids)
    np.testing.assert_allclose(batched[1], float(direct), rtol=1e-4)


def test_toy_judge_is_never_reported(tiny_judge):
    result = ge.geval(tiny_judge, [ge.Sample("Customer: hi", "Hello!")])
    assert not result.available and "not G-Eval scores" in result.reason and result.scores == {}
    none = ge.geval(ge.make_judge({"judge": "none"}), [ge.Sample("c", "r")])
    assert not none.available and "none" in none.reason
    with pytest.raises(ValueError, match="judge must be"):
        ge.make_judge({"judge": "gpt"})
    with pytest.raises(ValueError, match="endpoint_model"):
        ge.make_judge({"judge": "endpoint", "endpoint_url": "http://127.0.0.1:1"})


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """Loopback test double of an OpenAI chat-completions server (logprobs offered or not)."""

    offer_logprobs = True
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        if body.get("logprobs") and self.offer_logprobs:
            top = [{"token": "4", "logprob": math.log(0.5)}, {"token": "2", "logprob": math.log(0.5)}]
            choice = {"message": {"content": "4"}, "logprobs": {"content": [{"token": "4", "top_logprobs": top}]}}
            choices = [choice]
        else:
            choices = [{"message": {"content": c}} for c in ["5", "3 - ok", "x"][: body.get("n", 1)]]
        payload = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeOpenAI.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("offer_logprobs, expected", [(True, 3.0), (False, 4.0)])
def test_endpoint_judge(fake_endpoint, monkeypatch, offer_logprobs, expected):
    monkeypatch.setattr(_FakeOpenAI, "offer_logprobs", offer_logprobs)
    judge = ge.make_judge(
        {"judge": "endpoint", "endpoint_url": fake_endpoint, "endpoint_model": "judge-x", "n_samples": 3}
    )
    result = ge.geval(judge, [ge.Sample("Customer: hi", "Hello!")] * 2, criteria=("fluency", "helpfulness"))
    # logprobs: (4·0.5 + 2·0.5)/1 = 3; samples "5", "3 - ok", "x": mean of 5 and 3 = 4.
    assert result.available and result.scores == {"fluency": expected, "helpfulness": expected}
    path, first = _FakeOpenAI.requests[0]
    assert path == "/v1/chat/completions" and first["model"] == "judge-x"
    assert first["max_tokens"] == 1 and first["top_logprobs"] == 20 and first["logprobs"] is True
    assert "Fluency" in first["messages"][0]["content"] or "Helpfulness" in first["messages"][0]["content"]
    if not offer_logprobs:
        assert _FakeOpenAI.requests[-1][1]["n"] == 3
