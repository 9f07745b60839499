"""G-Eval (Liu et al. 2023) for GOPO replies: an LLM judge fills a form per criterion on a 1–5 scale.

Score = Σ_s p(s)·s over the score tokens "1".."5", with p renormalised over those valid scores (GOPO.md §2).
Two judges, chosen by config (`make_judge`):
- `CausalLMJudge`: any causal LM this project loads (`gopo_jax.models.qwen3.Qwen3` + a `transformers` tokenizer
  from a local checkpoint folder); the probabilities are read from the next-token logits after the prompt.
- `EndpointJudge`: an OpenAI-compatible `/v1/chat/completions` endpoint through the `openai` SDK (its retries and
  timeouts), `max_concurrency` prompts in flight. With `use_logprobs` it asks for one token with `top_logprobs` and
  uses their probabilities; when the endpoint offers none it falls back to the mean of `n_samples` sampled scores.

A number is reported as a G-Eval score only when a real judge is configured: `GEvalResult.available` is False,
with the reason, for `judge="none"` and for any judge built around an in-memory model (e.g. a tiny random model in
a test). The mechanics (prompt assembly, score-token extraction, renormalisation) stay testable through
`score_from_logits`, `score_from_top_logprobs`, `score_from_samples` and `Judge.score_prompts`.
"""

import abc
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.endpoint import ChatClient, map_concurrently

SCORES = (1, 2, 3, 4, 5)

CRITERIA: dict[str, tuple[str, str]] = {
    "fluency": (
        "Fluency (1-5): the quality of the customer-service reply as written language: grammar, spelling, word "
        "choice and sentence structure.",
        "1. Read the reply.\n2. Note grammatical errors, awkward or unnatural phrasing, and garbled text.\n"
        "3. Give 5 for a reply a careful native writer would send, 1 for one that is hard to read.",
    ),
    "coherence": (
        "Coherence (1-5): whether the reply follows from the dialogue so far and is well organised: it answers "
        "what the customer said, does not contradict earlier turns, and its sentences fit together.",
        "1. Read the dialogue and note what the customer last asked or said.\n2. Read the reply.\n"
        "3. Check it responds to that, is consistent with earlier turns and is logically ordered.\n"
        "4. Give 5 for a fully coherent reply, 1 for one unrelated or self-contradictory.",
    ),
    "strategy_faithfulness": (
        "Strategy faithfulness (1-5): whether the reply carries out the strategy the expert chose for this turn "
        "(given below), and nothing that the strategy or the service procedure forbids.",
        "1. Read the chosen strategy and its description.\n2. Read the reply.\n"
        "3. Decide whether the reply performs that strategy (e.g. recommends when told to recommend, asks when "
        "told to elicit) and avoids actions of other strategies.\n"
        "4. Give 5 when the reply clearly and only realises the strategy, 1 when it does something else.",
    ),
    "helpfulness": (
        "Helpfulness (1-5): how much the reply moves the customer towards their goal (finding, buying, resolving), "
        "with correct, relevant and specific information.",
        "1. Read the dialogue and infer the customer's goal.\n2. Read the reply.\n"
        "3. Judge how much it helps reach that goal and whether its information is relevant and specific.\n"
        "4. Give 5 for a reply that helps as much as possible at this point, 1 for one that does not help.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reply to judge: the dialogue so far, the reply, and (for strategy faithfulness) the chosen strategy."""

    context: str
    response: str
    strategy: str = ""


def build_prompt(criterion: str, sample: Sample) -> str:
    """The form-filling prompt of one criterion; it ends where the judge must write the score digit."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown G-Eval criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    definition, steps = CRITERIA[criterion]
    strategy = f"Chosen strategy:\n{sample.strategy}\n\n" if criterion == "strategy_faithfulness" else ""
    name = criterion.replace("_", " ").capitalize()
    return (
        "You will be given a customer-service dialogue and the agent's next reply. Your task is to rate the reply "
        "on one criterion.\n\n"
        f"Evaluation criterion:\n{definition}\n\nEvaluation steps:\n{steps}\n\n"
        f"Dialogue:\n{sample.context}\n\n{strategy}Reply:\n{sample.response}\n\n"
        f"Evaluation form (answer with a single digit from 1 to 5 only):\n- {name}:"
    )


# ---------------------------------------------------------------------------------------------- score extraction


def score_from_logits(logits: chex.Array, score_token_ids: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Probability-weighted score from next-token logits (unbatched; vmap over a batch).

    Args:
      logits: f32[V] next-token logits at the position where the judge writes the score.
      score_token_ids: int32[S, K] token ids spelling each score s = 1..S (e.g. "3" and " 3"); -1 pads unused
        variants. A score's probability is the sum over its variants.
    Returns:
      (score f32[], probs f32[S]) with probs renormalised over the S valid scores.
    """
    chex.assert_rank([logits, score_token_ids], [1, 2])
    chex.assert_type([logits, score_token_ids], [float, int])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    valid = score_token_ids >= 0
    per_variant = jnp.where(valid, logp[jnp.maximum(score_token_ids, 0)], -jnp.inf)
    probs = jax.nn.softmax(jax.nn.logsumexp(per_variant, axis=1))
    values = jnp.arange(1, score_token_ids.shape[0] + 1, dtype=jnp.float32)
    return jnp.sum(probs * values), probs


def _score_of_text(text: str) -> int | None:
    match = re.match(r"\s*([1-5])(?!\d)", text)
    return int(match.group(1)) if match else None


def score_from_top_logprobs(top_logprobs: Mapping[str, float]) -> float | None:
    """Σ p(s)·s from an endpoint's {token: logprob} alternatives, renormalised over tokens that read as a score."""
    mass = {s: 0.0 for s in SCORES}
    for token, logprob in top_logprobs.items():
        value = _score_of_text(token) if token.strip().isdigit() else None
        if value is not None:
            mass[value] += math.exp(logprob)
    total = sum(mass.values())
    return sum(s * m for s, m in mass.items()) / total if total > 0 else None


def score_from_samples(texts: Sequence[str]) -> float | None:
    """Mean of the scores that sampled answers start with (answers without a 1–5 score are left out)."""
    values = [v for v in (_score_of_text(t) for t in texts) if v is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------------- judges


class Judge(abc.ABC):
    """A judge scores prompts; `available`/`reason` say whether its scores may be reported as G-Eval."""

    name: str = "none"
    available: bool = False
    reason: str = ""

    @abc.abstractmethod
    def score_prompts(self, prompts: Sequence[str]) -> list[float | None]:
        """One probability-weighted (or sampled) score per prompt; None where the answer held no score."""


class NoJudge(Judge):
    """What `judge="none"` builds: scores nothing and says why."""

    def __init__(self, reason: str = "no G-Eval judge configured (geval.judge='none')"):
        self.reason = reason

    def score_prompts(self, prompts):
        raise RuntimeError(f"G-Eval: {self.reason}; configure geval.judge='causal_lm' or 'endpoint'")


def score_token_ids(tokenizer) -> np.ndarray:
    """int32[5, 2]: the single-token spellings "s" and " s" of each score (-1 where a spelling is several tokens)."""
    ids = np.full((len(SCORES), 2), -1, np.int32)
    for i, s in enumerate(SCORES):
        for j, text in enumerate((str(s), f" {s}")):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids[i, j] = encoded[0]
    if (ids < 0).all(axis=1).any():
        raise ValueError(
            "G-Eval: the judge tokenizer has no single token for some score digit 1-5; it cannot be "
            "used as a probability-weighted judge (use an endpoint judge with sampling instead)"
        )
    return ids


class CausalLMJudge(Judge):
    """Judges with a project causal LM: `model(tokens, positions, token_valid) -> (logits, cache)`.

    Prompts are wrapped in the tokenizer's chat template when it has one (user turn, generation prompt; Qwen3's
    thinking is switched off so the first answer token is the digit), right-padded into length buckets of
    `bucket` tokens to bound recompilation, and judged `batch_size` at a time.
    `is_real_judge` must be True only for a capable checkpoint (set by `make_judge` for `geval.judge='causal_lm'`);
    otherwise `available` is False and nothing it scores is reported as G-Eval.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        is_real_judge: bool = False,
        batch_size: int = 8,
        bucket: int = 128,
        use_chat_template: bool = True,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.available = is_real_judge
        self.reason = (
            ""
            if is_real_judge
            else (
                f"judge {name!r} is an in-memory model, not a configured checkpoint; "
                "its numbers are mechanics checks, not G-Eval scores"
            )
        )
        self.batch_size, self.bucket = batch_size, bucket
        self.use_chat_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.score_ids = jnp.asarray(score_token_ids(tokenizer))
        # Split once and pass the state as an argument, so the weights are not baked into the compiled program.
        self._graphdef, self._state = nnx.split(model)
        self._forward = jax.jit(self._last_logits_scores)

    def encode(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _last_logits_scores(self, state, tokens, lengths):
        model = nnx.merge(self._graphdef, state)
        valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        positions = jnp.where(valid, jnp.arange(tokens.shape[1])[None, :], 0).astype(jnp.int32)
        h, _ = model.hidden(tokens, positions, valid)
        # Only the slot where the judge writes its score becomes logits: [B, V], not [B, L, V].
        last = model.logits(jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0])
        return jax.vmap(score_from_logits, in_axes=(0, None))(last, self.score_ids)

    def score_prompts(self, prompts):
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [self.encode(p) for p in prompts[start : start + self.batch_size]]
            width = self.bucket * math.ceil(max(len(e) for e in encoded) / self.bucket)
            tokens = np.zeros((self.batch_size, width), np.int32)  # fixed batch: one compile per width bucket
            lengths = np.ones((self.batch_size,), np.int32)
            for i, ids in enumerate(encoded):
                tokens[i, : len(ids)], lengths[i] = ids, len(ids)
            batch_scores, _ = self._forward(self._state, jnp.asarray(tokens), jnp.asarray(lengths))
            scores.extend(float(s) for s in np.asarray(batch_scores)[: len(encoded)])
        return scores


class EndpointJudge(Judge):
    """Judges through an OpenAI-compatible chat endpoint (`gopo_jax.endpoint.ChatClient`, i.e. the
    `openai` SDK with its retries and timeouts), with at most `max_concurrency` prompts in flight."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "",
        api_key_env: str = "OPENAI_API_KEY",
        use_logprobs: bool = True,
        top_logprobs: int = 20,
        n_samples: int = 5,
        temperature: float = 1.0,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_concurrency: int = 8,
    ):
        if max_concurrency < 1:
            raise ValueError(f"geval.max_concurrency must be at least 1 (prompts in flight), got {max_concurrency}")
        self.client = ChatClient(
            base_url,
            model,
            api_key=api_key,
            api_key_env=api_key_env,
            timeout=timeout,
            max_retries=max_retries,
            config_keys="geval.endpoint_url / geval.endpoint_model",
        )
        self.name = f"endpoint:{model}"
        self.use_logprobs, self.top_logprobs = use_logprobs, top_logprobs
        self.n_samples, self.temperature, self.max_concurrency = n_samples, temperature, max_concurrency
        self.available, self.reason = True, ""

    def _score_one(self, prompt: str) -> float | None:
        messages = [{"role": "user", "content": prompt}]
        if self.use_logprobs:
            completion = self.client.chat(
                messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs
            )
            logprobs = completion.choices[0].logprobs if completion.choices else None
            first_token = logprobs.content[0] if logprobs is not None and logprobs.content else None
            if first_token is not None and first_token.top_logprobs:
                return score_from_top_logprobs({alt.token: alt.logprob for alt in first_token.top_logprobs})
        # No log-probabilities offered: the mean of sampled answers.
        completion = self.client.chat(messages, max_tokens=5, temperature=self.temperature, n=self.n_samples)
        return score_from_samples([choice.message.content or "" for choice in completion.choices])

    def score_prompts(self, prompts):
        return map_concurrently(self._score_one, prompts, self.max_concurrency)


def make_judge(config: Mapping[str, Any]) -> Judge:
    """Builds the judge named by `config["judge"]`: "none", "causal_lm" (`model_path`: a local HF folder) or
    "endpoint" (`endpoint_url`, `endpoint_model`, optional `api_key`, `api_key_env`, `use_logprobs`, `top_logprobs`,
    `n_samples`, `timeout` seconds per attempt, `max_retries`, `max_concurrency` prompts in flight)."""
    kind = config.get("judge", "none")
    if kind == "none":
        return NoJudge()
    if kind == "causal_lm":
        if not config.get("model_path"):
            raise ValueError(
                "geval.model_path: set it to a local Hugging Face Qwen3 folder for geval.judge='causal_lm'"
            )
        from gopo_jax.models import hf_io  # heavy; only a causal-LM judge needs it

        path = config["model_path"]
        return CausalLMJudge(
            hf_io.from_pretrained(path),
            hf_io.load_tokenizer(path),
            name=f"causal_lm:{path}",
            is_real_judge=True,
            batch_size=int(config.get("batch_size", 8)),
        )
    if kind == "endpoint":
        missing = [k for k in ("endpoint_url", "endpoint_model") if not config.get(k)]
        if missing:
            raise ValueError(f"geval: {missing} must be set for geval.judge='endpoint'")
        return EndpointJudge(
            config["endpoint_url"],
            config["endpoint_model"],
            api_key=config.get("api_key", ""),
            api_key_env=config.get("api_key_env", "OPENAI_API_KEY"),
            use_logprobs=bool(config.get("use_logprobs", True)),
            top_logprobs=int(config.get("top_logprobs", 20)),
            n_samples=int(config.get("n_samples", 5)),
            timeout=float(config.get("timeout", 60.0)),
            max_retries=int(config.get("max_retries", 4)),
            max_concurrency=int(config.get("max_concurrency", 8)),
        )
    raise ValueError(f"geval.judge must be 'none', 'causal_lm' or 'endpoint', got {kind!r}")


@dataclasses.dataclass(frozen=True)
class GEvalResult:
    """Per-criterion mean scores and per-sample scores; empty with `available=False` and a reason when no real judge.

    `num_unscored` counts samples whose judge answer held no score (endpoint answers without a digit); they are
    left out of the means.
    """

    available: bool
    reason: str
    judge: str
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    per_sample: dict[str, list] = dataclasses.field(default_factory=dict)
    num_unscored: dict[str, int] = dataclasses.field(default_factory=dict)


def geval(judge: Judge, samples: Sequence[Sample], criteria: Sequence[str] = tuple(CRITERIA)) -> GEvalResult:
    """G-Eval of `samples` on `criteria` with `judge`: every (criterion, sample) prompt in one `score_prompts` call,
    so an endpoint judge keeps its bound of requests in flight across criteria."""
    for criterion in criteria:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown G-Eval criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    if not judge.available:
        return GEvalResult(available=False, reason=judge.reason, judge=judge.name)
    all_values = judge.score_prompts([build_prompt(criterion, s) for criterion in criteria for s in samples])
    per_sample, means, unscored = {}, {}, {}
    for i, criterion in enumerate(criteria):
        values = all_values[i * len(samples) : (i + 1) * len(samples)]
        scored = [v for v in values if v is not None]
        per_sample[criterion] = values
        unscored[criterion] = len(values) - len(scored)
        means[criterion] = float(np.mean(scored)) if scored else float("nan")
    return GEvalResult(
        available=True, reason="", judge=judge.name, scores=means, per_sample=per_sample, num_unscored=unscored
    )
