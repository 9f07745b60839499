"""G-Eval mechanics: prompts, score extraction and renormalisation, a tiny causal-LM judge (marked unavailable) and
an OpenAI-compatible endpoint judge against a loopback stub of the remote API (test_openai_client.StubOpenAI):
log-probabilities or sampled scores, requests in flight bounded, scores in sample order, clear errors."""

import math
import time

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax.endpoint import ChatClientError
from gopo_jax.metrics import geval as ge
from test_openai_client import StubOpenAI


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


def sampled_scores(body: dict, index: int) -> str:
    return ["5", "3 - ok", "x"][index]


@pytest.mark.parametrize("offer_logprobs, expected", [(True, 3.0), (False, 4.0)])
def test_endpoint_judge(offer_logprobs, expected):
    stub = StubOpenAI(("judge-x",), reply=sampled_scores, top_logprobs={"4": 0.5, "2": 0.5} if offer_logprobs else None)
    try:
        judge = ge.make_judge({"judge": "endpoint", "endpoint_url": stub.url, "endpoint_model": "judge-x",
                               "n_samples": 3})
        result = ge.geval(judge, [ge.Sample("Customer: hi", "Hello!")] * 2, criteria=("fluency", "helpfulness"))
    finally:
        stub.close()
    # logprobs: (4·0.5 + 2·0.5)/1 = 3; samples "5", "3 - ok", "x": mean of 5 and 3 = 4.
    assert result.available and result.scores == {"fluency": expected, "helpfulness": expected}
    first = stub.chat_requests()[0]
    assert stub.requests[0]["path"] == "/v1/chat/completions" and first["model"] == "judge-x"
    assert first["max_tokens"] == 1 and first["top_logprobs"] == 20 and first["logprobs"] is True
    assert "Fluency" in first["messages"][0]["content"] or "Helpfulness" in first["messages"][0]["content"]
    if not offer_logprobs:
        assert stub.chat_requests()[-1]["n"] == 3


def score_in_reply(body: dict, index: int) -> str:
    """The judge's answer is the digit the judged reply starts with; lower digits answer later, so answers come back
    out of order."""
    digit = body["messages"][0]["content"].split("Reply:\n")[1][0]
    time.sleep(0.02 * (6 - int(digit)))
    return digit


def test_endpoint_judge_bounds_requests_in_flight_and_keeps_order():
    stub = StubOpenAI(("judge-x",), reply=score_in_reply, crowd=3)
    samples = [ge.Sample(f"Customer: item {i}", f"{1 + i % 5} stars from me") for i in range(12)]
    try:
        judge = ge.make_judge({"judge": "endpoint", "endpoint_url": stub.url, "endpoint_model": "judge-x",
                               "use_logprobs": False, "n_samples": 1, "max_concurrency": 3})
        result = ge.geval(judge, samples, criteria=("fluency", "coherence"))
    finally:
        stub.close()
    expected = [float(1 + i % 5) for i in range(12)]
    assert result.per_sample == {"fluency": expected, "coherence": expected}
    assert len(stub.chat_requests()) == 24 and stub.max_in_flight == 3


def test_endpoint_judge_errors_name_the_settings():
    stub = StubOpenAI(("judge-x",))
    try:
        judge = ge.make_judge({"judge": "endpoint", "endpoint_url": stub.url, "endpoint_model": "judge-y",
                               "max_retries": 0, "timeout": 5.0})
        assert (judge.client.max_retries, judge.client.timeout) == (0, 5.0)
        with pytest.raises(ChatClientError, match=r"answered HTTP 404: model 'judge-y' is not served here; check "
                                                  r"geval.endpoint_url / geval.endpoint_model"):
            ge.geval(judge, [ge.Sample("Customer: hi", "Hello!")], criteria=("fluency",))
        with pytest.raises(ValueError, match="geval.max_concurrency must be at least 1"):
            ge.make_judge({"judge": "endpoint", "endpoint_url": stub.url, "endpoint_model": "judge-x",
                           "max_concurrency": 0})
    finally:
        stub.close()
