"""SOP automaton as data: stages, allowed-strategy masks, transitions and terminal stages.

An SOP (standard operating procedure) is loaded per domain from JSON and never hard-coded in the algorithms. The
JSON format is

    {"name": "shop",
     "strategies": ["greet", "elicit_need", ...],
     "initial": "opening",
     "stages": [{"name": "opening", "allowed": ["greet"], "next": {"greet": "discovery"}, "terminal": false}, ...]}

`next` maps a strategy to the stage it leads to; an allowed strategy absent from `next` keeps the stage. A
realised strategy that is not allowed (an SOP violation) or unrecognised also keeps the stage: the violation is
penalised through the rewards, not by moving the automaton somewhere undefined.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Realisation checks return this when a reply carries out no recognisable strategy.
UNRECOGNISED = -1


class SOPError(ValueError):
    """A malformed SOP definition; the message names the file and the offending entry."""


@dataclasses.dataclass(frozen=True)
class SOP:
    """Array form of the automaton (numpy on the host; `as_jax()` for use inside jitted code)."""

    name: str
    strategies: tuple[str, ...]
    stages: tuple[str, ...]
    allowed: np.ndarray  # bool[n_stages, n_strategies]
    transition: np.ndarray  # int32[n_stages, n_strategies]
    terminal: np.ndarray  # bool[n_stages]
    initial: int

    @property
    def num_strategies(self) -> int:
        return len(self.strategies)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def strategy_index(self, name: str) -> int:
        try:
            return self.strategies.index(name)
        except ValueError:
            raise SOPError(f"SOP {self.name!r}: unknown strategy {name!r}; known: {list(self.strategies)}") from None

    def stage_index(self, name: str) -> int:
        try:
            return self.stages.index(name)
        except ValueError:
            raise SOPError(f"SOP {self.name!r}: unknown stage {name!r}; known: {list(self.stages)}") from None

    def as_jax(self) -> JaxSOP:
        return JaxSOP(
            allowed=jnp.asarray(self.allowed),
            transition=jnp.asarray(self.transition, jnp.int32),
            terminal=jnp.asarray(self.terminal),
            initial=jnp.asarray(self.initial, jnp.int32),
        )

    def to_json(self) -> dict[str, Any]:
        stages = []
        for s, name in enumerate(self.stages):
            allowed = [self.strategies[k] for k in range(self.num_strategies) if self.allowed[s, k]]
            nxt = {self.strategies[k]: self.stages[self.transition[s, k]]
                   for k in range(self.num_strategies) if self.allowed[s, k] and self.transition[s, k] != s}
            stages.append({"name": name, "allowed": allowed, "next": nxt, "terminal": bool(self.terminal[s])})
        return {"name": self.name, "strategies": list(self.strategies), "initial": self.stages[self.initial],
                "stages": stages}

    def prompt(self, descriptions: Sequence[str] = ()) -> str:
        """The SOP as the system message's instructions to a pretrained agent: the strategies (with their
        descriptions) and, per stage, the strategies allowed there. The stage and the chosen strategy of every turn
        are the marker tokens that open the agent's message."""
        described = dict(zip(self.strategies, descriptions))
        lines = ["You are a customer service agent following a standard operating procedure (SOP). Each of your "
                 "messages starts with the current SOP stage and the strategy you carry out, then the reply.",
                 "Strategies:"]
        lines += [f"- {k}: {described[k]}" if described.get(k) else f"- {k}" for k in self.strategies]
        lines.append("Allowed strategies per stage:")
        for s, name in enumerate(self.stages):
            allowed = ", ".join(self.strategies[k] for k in range(self.num_strategies) if self.allowed[s, k])
            lines.append(f"- {name}: {allowed}")
        return "\n".join(lines)


@flax.struct.dataclass
class JaxSOP:
    """The SOP's arrays as jax arrays; every method is pure and works on scalars inside jit/vmap/scan."""

    allowed: jnp.ndarray
    transition: jnp.ndarray
    terminal: jnp.ndarray
    initial: jnp.ndarray

    def mask(self, stage: jnp.ndarray) -> jnp.ndarray:
        return self.allowed[stage]

    def is_allowed(self, stage: jnp.ndarray, strategy: jnp.ndarray) -> jnp.ndarray:
        safe = jnp.clip(strategy, 0, self.allowed.shape[1] - 1)
        return jnp.where(strategy >= 0, self.allowed[stage, safe], False)

    def advance(self, stage: jnp.ndarray, realised: jnp.ndarray) -> jnp.ndarray:
        safe = jnp.clip(realised, 0, self.allowed.shape[1] - 1)
        return jnp.where(self.is_allowed(stage, realised), self.transition[stage, safe], stage)


# A finite "minus infinity": exp() of it is exactly 0, yet 0 * _NEG stays finite (no NaN in masked sums).
_NEG = -1e30


def masked_strategy_log_softmax(logits: jnp.ndarray, allowed: jnp.ndarray) -> jnp.ndarray:
    """log π_E(· | x) = log softmax(z + log M): f32[..., n_k]; disallowed strategies get exactly zero probability.

    `allowed` is the SOP stage mask (`JaxSOP.mask`). A row with no allowed strategy (a padded turn) returns zeros
    instead of NaN; callers mask such turns out.
    """
    chex.assert_equal_shape([logits, allowed])
    chex.assert_type(allowed, bool)
    masked = jnp.where(allowed, logits.astype(jnp.float32), _NEG)
    logp = jax.nn.log_softmax(masked, axis=-1)
    any_allowed = jnp.any(allowed, axis=-1, keepdims=True)
    return jnp.where(allowed & any_allowed, logp, jnp.where(any_allowed, _NEG, 0.0))


def sop_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> SOP:
    """Validates and converts the JSON form; every problem is one SOPError naming `source` and the entry."""

    def fail(msg: str) -> SOPError:
        return SOPError(f"{source}: {msg}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    for key in ("name", "strategies", "initial", "stages"):
        if key not in data:
            raise fail(f"missing key {key!r} (needs name, strategies, initial, stages)")
    strategies = data["strategies"]
    if not isinstance(strategies, Sequence) or isinstance(strategies, str) or not strategies:
        raise fail("'strategies' must be a non-empty list of names")
    if not all(isinstance(k, str) for k in strategies):
        raise fail(f"'strategies' must be a list of strings, got {list(strategies)!r}")
    if len(set(strategies)) != len(strategies):
        raise fail(f"duplicate strategy names in {list(strategies)}")
    stage_defs = data["stages"]
    if not isinstance(stage_defs, Sequence) or not stage_defs:
        raise fail("'stages' must be a non-empty list")
    names = []
    for i, st in enumerate(stage_defs):
        if not isinstance(st, Mapping) or "name" not in st or "allowed" not in st:
            raise fail(f"stage #{i} must be an object with 'name' and 'allowed'")
        if not isinstance(st["name"], str):
            raise fail(f"stage #{i}: 'name' must be a string, got {st['name']!r}")
        if isinstance(st["allowed"], str) or not isinstance(st["allowed"], Sequence):
            raise fail(f"stage {st['name']!r}: 'allowed' must be a list of strategy names, got {st['allowed']!r}")
        if not isinstance(st.get("next", {}), Mapping):
            raise fail(f"stage {st['name']!r}: 'next' must be an object strategy -> stage, got {st['next']!r}")
        if not isinstance(st.get("terminal", False), bool):
            raise fail(f"stage {st['name']!r}: 'terminal' must be true or false, got {st['terminal']!r}")
        names.append(st["name"])
    if len(set(names)) != len(names):
        raise fail(f"duplicate stage names in {names}")
    k_index = {k: i for i, k in enumerate(strategies)}
    s_index = {s: i for i, s in enumerate(names)}
    n_s, n_k = len(names), len(strategies)
    allowed = np.zeros((n_s, n_k), bool)
    transition = np.tile(np.arange(n_s, dtype=np.int32)[:, None], (1, n_k))
    terminal = np.zeros((n_s,), bool)
    for s, st in enumerate(stage_defs):
        terminal[s] = bool(st.get("terminal", False))
        for k in st["allowed"]:
            if not isinstance(k, str) or k not in k_index:
                raise fail(f"stage {st['name']!r} allows unknown strategy {k!r}; known: {list(strategies)}")
            allowed[s, k_index[k]] = True
        if not allowed[s].any() and not terminal[s]:
            raise fail(f"stage {st['name']!r} allows no strategy and is not terminal (a dead end)")
        for k, target in dict(st.get("next", {})).items():
            if k not in k_index:
                raise fail(f"stage {st['name']!r}: transition on unknown strategy {k!r}")
            if not isinstance(target, str) or target not in s_index:
                raise fail(f"stage {st['name']!r}: transition {k!r} -> unknown stage {target!r}")
            if not allowed[s, k_index[k]]:
                raise fail(f"stage {st['name']!r}: transition on {k!r}, which the stage does not allow")
            transition[s, k_index[k]] = s_index[target]
    if not isinstance(data["initial"], str) or data["initial"] not in s_index:
        raise fail(f"initial stage {data['initial']!r} is not a stage; stages: {names}")
    initial = s_index[data["initial"]]
    reachable = {initial}
    frontier = [initial]
    while frontier:
        s = frontier.pop()
        for k in np.flatnonzero(allowed[s]):
            t = int(transition[s, k])
            if t not in reachable:
                reachable.add(t)
                frontier.append(t)
    unreachable = [names[s] for s in range(n_s) if s not in reachable]
    if unreachable:
        raise fail(f"stages unreachable from {data['initial']!r}: {unreachable}")
    return SOP(name=str(data["name"]), strategies=tuple(strategies), stages=tuple(names), allowed=allowed,
               transition=transition, terminal=terminal, initial=initial)


def load_sop(path: str | pathlib.Path) -> SOP:
    path = pathlib.Path(path)
    if not path.exists():
        raise SOPError(f"SOP file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as e:
        # ValueError: bad JSON, bad UTF-8 and integers past Python's digit limit; RecursionError: nesting past the
        # interpreter's limit; OSError: the path is a folder or unreadable.
        raise SOPError(f"{path}: not valid JSON ({e})") from None
    return sop_from_dict(data, source=str(path))
