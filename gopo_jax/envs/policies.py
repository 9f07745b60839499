"""Scripted policies over both environment kinds, and their evaluation on GOPO's metrics.

* reference: the environment's own scripted expert (or logged agent).
* random: a uniformly random SOP-allowed strategy, realised by the environment's scripted reply.
* greedy: one-step lookahead; the allowed strategy that maximises the immediate gain g_t, ties broken by c_t, then
  by rel_t, then by the lower strategy index. A JaxEnv is stepped for every strategy at once (vmap); a HostEnv is
  deep-copied once per allowed strategy. The lookahead sees the customer's very next reaction (including its
  noise), so greedy is the strongest myopic policy: whatever separates it from the reference is the long horizon.

The pure-JAX policies (and `JaxDemonstrator`, the SFT demonstrator) are the `policy` of
`dialogue.rollout.ScriptedAgents`, so training and this report play them through the one rollout driver;
`rollout_scripted` cuts its `Trajectory` into padded per-turn arrays and `demonstrations` decodes them to text.
Host environments (text, no tokenizer here) keep a Python turn loop of their own (`_host_episodes`).

`evaluate_policy` runs a policy for N episodes and reports TSE, ESNDCG (of the realised strategies), R_B and GRE
(the mean R_B), each the mean over episodes with a bootstrap 95% interval, and nTSE: the run reports' ratio of means
(`gopo_jax.metrics.tse.ntse`) against the reference policy on the same seeds/customers, with a paired interval.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.env_protocol import Demonstration, DemoTurn, HostObs, JaxEnv
from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.rollout import AgentVocab, ScriptedAgents, jax_env_layout, make_rollout
from gopo_jax.envs.base import HostEnv
from gopo_jax.metrics import reporting
from gopo_jax.metrics.episode import EpisodeMetricSettings, host_episode_metrics
from gopo_jax.metrics.tse import ntse

POLICIES = ("reference", "random", "greedy")


def _lexicographic_best(gain, cont, rel, ok):
    """Index of the best candidate among `ok` by gain, then cont, then rel, then the lowest index (works on numpy
    and jax arrays alike). The tolerance keeps float noise in the gains from deciding a tie."""
    xp = jnp if isinstance(gain, jax.Array) else np
    best = ok
    for score in (gain, cont, rel):
        top = xp.max(xp.where(best, score, -xp.inf))
        best = best & (score >= top - 1e-6)
    return xp.argmax(best)


# -------------------------------------------------------------------- JaxEnv policies: (state, obs, key) -> turn
# The `policy` of `dialogue.rollout.ScriptedAgents`: `obs` is the dialogue's `TurnInput` (they read `obs.allowed`,
# which a `JaxObs` has too). Frozen dataclasses, hashable through the env (identity), so rollouts compile once.
@dataclasses.dataclass(frozen=True)
class JaxReference:
    env: Any

    def __call__(self, state, obs, key):
        return self.env.reference_turn(state, key)


@dataclasses.dataclass(frozen=True)
class JaxRandom:
    env: Any

    def __call__(self, state, obs, key):
        k_pick, k_reply = jax.random.split(key)
        allowed = obs.allowed.astype(jnp.float32)
        strategy = jax.random.choice(k_pick, allowed.shape[0], p=allowed / allowed.sum()).astype(jnp.int32)
        reply, valid = self.env.scripted_reply(state, strategy, k_reply)
        return strategy, reply, valid


@dataclasses.dataclass(frozen=True)
class JaxGreedy:
    env: Any

    def __call__(self, state, obs, key):
        n_k = self.env.spec.num_strategies
        strategies = jnp.arange(n_k, dtype=jnp.int32)
        # The same reply key for every candidate: the lookahead compares strategies, not template variants.
        replies, valid = jax.vmap(self.env.scripted_reply, (None, 0, None))(state, strategies, key)
        _, _, sig = jax.vmap(self.env.step, (None, 0, 0, 0))(state, strategies, replies, valid)
        best = _lexicographic_best(sig.gain, sig.cont, sig.rel, obs.allowed)
        return strategies[best], replies[best], valid[best]


@dataclasses.dataclass(frozen=True)
class JaxDemonstrator:
    """The SFT demonstrator: the reference with a share `noise` of its turns deviating (`demonstration_turn`: a
    random allowed strategy, or the myopic habit with `kind="habit"`)."""

    env: Any
    noise: float
    kind: str = "random"

    def __call__(self, state, obs, key):
        return self.env.demonstration_turn(state, key, noise=self.noise, kind=self.kind)


def jax_policy(env, name: str) -> Callable:
    classes = {"reference": JaxReference, "random": JaxRandom, "greedy": JaxGreedy}
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; choose one of {list(classes)}")
    return classes[name](env)


# -------------------------------------------------------------------- HostEnv policies: (env, obs, rng) -> turn
def host_reference(env: HostEnv, obs: HostObs, rng: np.random.Generator) -> tuple[int, str]:
    return env.reference_turn()


def host_random(env: HostEnv, obs: HostObs, rng: np.random.Generator) -> tuple[int, str]:
    strategy = int(rng.choice(np.flatnonzero(obs.allowed)))
    return strategy, env.scripted_reply(strategy)


def host_greedy(env: HostEnv, obs: HostObs, rng: np.random.Generator) -> tuple[int, str]:
    candidates = np.flatnonzero(obs.allowed)
    replies, gains, conts, rels = [], [], [], []
    for k in candidates:
        reply = env.scripted_reply(int(k))
        _, sig = copy.deepcopy(env).step(int(k), reply)
        replies.append(reply)
        gains.append(float(sig.gain))
        conts.append(float(sig.cont))
        rels.append(float(sig.rel))
    best = int(_lexicographic_best(np.array(gains), np.array(conts), np.array(rels),
                                   np.ones(len(candidates), bool)))
    return int(candidates[best]), replies[best]


HOST_POLICIES = {"reference": host_reference, "random": host_random, "greedy": host_greedy}


# -------------------------------------------------------------------- episodes as padded arrays
PolicyFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@functools.lru_cache(maxsize=32)
def _compiled_rollout(env, policy_fn: PolicyFn):
    """The one rollout driver (`dialogue.rollout.make_rollout`) with `policy_fn` as scripted agents, compiled once
    per (env, policy) pair; the policies here are frozen dataclasses that compare equal per env."""
    vocab = AgentVocab.from_tokenizer(env.tokenizer, env.spec.sop, chat_format=env.chat_format)
    layout = jax_env_layout(env, vocab)
    return layout, vocab, make_rollout(env, layout, vocab, ScriptedAgents(policy_fn, vocab))


def _turn_slots(tokens, layout: Layout, start, width: int):
    """[B, L] -> [B, T, width]: the slot of `width` positions at `start(t)` of every turn."""
    return jnp.stack([tokens[:, start(t):start(t) + width] for t in range(layout.max_turns)], axis=1)


def _episode_arrays(traj: Trajectory, layout: Layout, vocab: AgentVocab) -> dict[str, jax.Array]:
    lc, lr = layout.customer_len, layout.reply_len
    customer, customer_valid = (_turn_slots(x, layout, layout.turn_start, lc) for x in (traj.tokens, traj.valid))
    reply, reply_valid = (_turn_slots(x, layout, layout.reply_start, lr) for x in (traj.tokens, traj.valid))
    stage_tok = jnp.stack([traj.tokens[:, layout.header_start(t) + 1] for t in range(layout.max_turns)], axis=1)
    stage = jnp.argmax(stage_tok[..., None] == jnp.asarray(vocab.stage_ids), axis=-1).astype(jnp.int32)
    # The customer's answer to turn t is the utterance that opens turn t+1; the answer to the last turn never
    # reaches an agent, so the buffer does not hold it (empty).
    reaction = jnp.concatenate([customer[:, 1:], jnp.full_like(customer[:, :1], vocab.pad)], axis=1)
    reaction_valid = jnp.concatenate([customer_valid[:, 1:], jnp.zeros_like(customer_valid[:, :1])], axis=1)
    return dict(strategy=traj.strategy, reply=reply, reply_valid=reply_valid, customer=customer,
                customer_valid=customer_valid, reaction=reaction, reaction_valid=reaction_valid, stage=stage,
                allowed=traj.allowed, turn_mask=traj.turn_mask, gain=traj.gain, cont=traj.cont, rel=traj.rel,
                rel_realised=traj.rel_realised, quality=traj.quality, realised=traj.realised, aligned=traj.aligned,
                sop_valid=traj.sop_valid,
                context=traj.tokens[:, :layout.context_len], context_valid=traj.valid[:, :layout.context_len],
                outcome=traj.outcome, satisfaction=traj.satisfaction, fcr=traj.fcr)


def rollout_scripted(env, keys: jax.Array, policy_fn: PolicyFn) -> dict[str, jax.Array]:
    """Plays `policy_fn(state, inp, key) -> (strategy, reply, reply_valid)` (see `ScriptedAgents`) on a batch of
    episodes, one per key, through the training rollout driver (`dialogue.rollout.make_rollout`), and cuts the
    `Trajectory` into per-turn arrays. Works for any JaxEnv that holds a `tokenizer` with the world's special tokens.

    Episode i resets from the first half of `split(keys[i])`; the policy draws from the second half of
    `split(keys[0])`, folded with the turn index and split over the batch (the driver's agent key).

    Returns arrays with leading axes [B] or [B, T]: strategy, reply/reply_valid [B,T,Lr], customer/customer_valid
    [B,T,Lc] (the utterance before each agent turn), reaction/reaction_valid [B,T,Lc] (customer[t+1]; empty after
    the last turn), stage, allowed [B,T,n_k], turn_mask, the TurnSignals fields, context/context_valid
    [B,context_len], outcome, satisfaction, fcr. Past the last live turn every id array is PAD with valid False and
    every signal 0.
    """
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    chex.assert_rank(keys, 1 if typed else 2)  # a batch of typed keys, or of raw uint32[2] keys
    halves = jax.vmap(jax.random.split)(keys)
    layout, vocab, rollout = _compiled_rollout(env, policy_fn)
    return _episode_arrays(rollout({}, halves[:, 0], halves[0, 1]), layout, vocab)


def demonstration_arrays(env, keys: jax.Array, noise: float) -> dict[str, jax.Array]:
    """Array form of noisy reference demonstrations (see `rollout_scripted` for the fields), for SFT."""
    return rollout_scripted(env, keys, JaxDemonstrator(env, float(noise)))


def demonstrations(env, num_episodes: int, key: jax.Array, noise: float = 0.0) -> list[Demonstration]:
    """Text form of `demonstration_arrays` (decoded with the env's tokenizer), for the JSONL exporter in base.py."""
    arrays = jax.device_get(demonstration_arrays(env, jax.random.split(key, num_episodes), noise))
    names = env.spec.strategies
    demos = []
    for b in range(num_episodes):
        turns = [DemoTurn(customer=_content(env, arrays["customer"][b, t], arrays["customer_valid"][b, t], "user"),
                          strategy=names[int(arrays["strategy"][b, t])],
                          reply=_content(env, arrays["reply"][b, t], arrays["reply_valid"][b, t], "assistant"),
                          stage=int(arrays["stage"][b, t]))
                 for t in range(env.spec.max_turns) if arrays["turn_mask"][b, t]]
        demos.append(Demonstration(context=_content(env, arrays["context"][b], arrays["context_valid"][b], "system"),
                                   turns=turns))
    return demos


def _as_f32(x):
    return jnp.asarray(x, jnp.float32)


def _jax_episodes(env, policy: str, episodes: int, seed: int) -> dict[str, np.ndarray]:
    keys = jax.random.split(jax.random.PRNGKey(seed), episodes)
    return jax.device_get(rollout_scripted(env, keys, jax_policy(env, policy)))


def _host_episodes(env: HostEnv, policy: str, episodes: int, seed: int) -> dict[str, Any]:
    """Runs `episodes` host episodes (reset seeds seed..seed+N-1) into padded numpy arrays plus transcripts."""
    if policy not in HOST_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(HOST_POLICIES)}")
    fn = HOST_POLICIES[policy]
    t_max = env.spec.max_turns
    fields = ("gain", "cont", "rel", "rel_realised", "sop_valid", "aligned", "quality")
    out = {f: np.zeros((episodes, t_max), np.float32) for f in fields}
    out["strategy"] = np.zeros((episodes, t_max), np.int32)
    out["realised"] = np.full((episodes, t_max), UNRECOGNISED, np.int32)
    out["turn_mask"] = np.zeros((episodes, t_max), bool)
    for f in ("outcome", "satisfaction", "fcr"):
        out[f] = np.zeros((episodes,), np.float32)
    transcripts = []
    for i in range(episodes):
        rng = np.random.default_rng([seed, i])
        obs = env.reset(seed + i)
        turns = []
        for t in range(t_max):
            if obs.done:
                break
            strategy, reply = fn(env, obs, rng)
            customer = obs.customer
            obs, sig = env.step(strategy, reply)
            for f in fields:
                out[f][i, t] = float(getattr(sig, f))
            out["realised"][i, t] = int(sig.realised)
            out["strategy"][i, t] = strategy
            out["turn_mask"][i, t] = True
            turns.append(dict(customer=customer, strategy=env.spec.strategies[strategy], reply=reply,
                              gain=float(sig.gain), cont=float(sig.cont), rel=float(sig.rel)))
        result = env.outcome()
        out["outcome"][i], out["satisfaction"][i], out["fcr"][i] = (
            float(result.outcome), float(result.satisfaction), float(result.fcr))
        transcripts.append(dict(context=getattr(obs, "context", ""), turns=turns, final=obs.customer))
    out["transcripts"] = transcripts
    return out


def _content(env, ids, valid, role: str) -> str:
    """One message's text from its slot (the chat template's opening and closing cut)."""
    return env.chat_format.content_text(env.tokenizer, np.asarray(ids)[np.asarray(valid)], role)


def _jax_transcripts(env, arrays, count: int) -> list[dict]:
    transcripts = []
    for b in range(min(count, arrays["strategy"].shape[0])):
        turns = []
        for t in range(env.spec.max_turns):
            if not arrays["turn_mask"][b, t]:
                break
            turns.append(dict(customer=_content(env, arrays["customer"][b, t], arrays["customer_valid"][b, t], "user"),
                              strategy=env.spec.strategies[int(arrays["strategy"][b, t])],
                              reply=_content(env, arrays["reply"][b, t], arrays["reply_valid"][b, t], "assistant"),
                              gain=float(arrays["gain"][b, t]), cont=float(arrays["cont"][b, t]),
                              rel=float(arrays["rel"][b, t])))
        # No "final": the customer's answer to the last turn reaches no agent, so the Trajectory does not hold it.
        transcripts.append(dict(context=_content(env, arrays["context"][b], arrays["context_valid"][b], "system"),
                                turns=turns))
    return transcripts


def _policy_metrics(arrays, settings: EpisodeMetricSettings) -> dict[str, np.ndarray]:
    """The run's per-episode metrics (`gopo_jax.metrics.episode`) of a policy's episode arrays."""
    turn_fields = ("gain", "cont", "rel", "rel_realised", "aligned", "sop_valid", "outcome", "satisfaction", "fcr")
    batch = types.SimpleNamespace(turn_mask=jnp.asarray(arrays["turn_mask"]),
                                  realised=jnp.asarray(arrays["realised"], jnp.int32),
                                  **{f: _as_f32(arrays[f]) for f in turn_fields})
    return host_episode_metrics(batch, settings)


def ntse_ci(tse_values: np.ndarray, reference_tse: np.ndarray) -> dict:
    """nTSE (`gopo_jax.metrics.tse.ntse`, the ratio of means the run reports use) with a 95% interval: nTSE is
    1 + the paired relative difference of the means, so the interval is `reporting.paired_difference`'s (customers
    resampled with their reference dialogue)."""
    diff = reporting.paired_difference(tse_values, reference_tse)
    return dict(mean=float(ntse(jnp.asarray(tse_values), jnp.asarray(reference_tse))),
                lo=1.0 + diff["rel_lo"] / 100.0, hi=1.0 + diff["rel_hi"] / 100.0, n=diff["n"])


def evaluate_policy(env, policy: str, episodes: int, seed: int = 0, *, data_dir=None, p: float = 0.8,
                    transcripts: int = 0) -> dict[str, Any]:
    """Evaluates a scripted policy on `episodes` episodes (the reference runs on the same seeds for nTSE).

    Args:
      env: an environment object or a registry name (see gopo_jax.envs.registry).
      policy: "reference", "random" or "greedy".
      data_dir: passed to the registry for environments built from files.
      transcripts: how many dialogues to return as text (for `policy_report --show`).
    Returns:
      dict with mean_ci dicts (mean, lo, hi, n) for tse, ntse, esndcg, gre (the mean R_B), purchase, turns; the
      per-episode arrays under "per_episode"; "transcripts" (list of dialogues); and "env", "policy", "episodes".
    """
    if isinstance(env, str):
        from gopo_jax.envs import registry
        env = registry.make_env(env, data_dir=data_dir)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    if episodes < 2:
        raise ValueError(f"evaluate_policy: episodes={episodes}; need at least 2 for a confidence interval")
    is_jax = isinstance(env, JaxEnv)
    run = _jax_episodes if is_jax else _host_episodes
    arrays = run(env, policy, episodes, seed)
    ref = arrays if policy == "reference" else run(env, "reference", episodes, seed)
    settings = EpisodeMetricSettings(max_relevance=float(env.spec.max_relevance), t_max=env.spec.max_turns,
                                     esndcg_p=p)
    per = _policy_metrics(arrays, settings)
    per["purchase"] = per["outcome"]
    reference_tse = per["tse"] if ref is arrays else _policy_metrics(ref, settings)["tse"]
    result = {
        "env": env.spec.name, "policy": policy, "episodes": episodes,
        "tse": reporting.mean_ci(per["tse"]),
        "ntse": ntse_ci(per["tse"], reference_tse),
        "esndcg": reporting.mean_ci(per["esndcg"]),
        "gre": reporting.mean_ci(per["gre"]),
        "purchase": reporting.mean_ci(per["purchase"]),
        "turns": reporting.mean_ci(per["turns"]),
        "per_episode": per,
    }
    if transcripts:
        result["transcripts"] = (_jax_transcripts(env, arrays, transcripts) if is_jax
                                 else arrays["transcripts"][:transcripts])
    return result
