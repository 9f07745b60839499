"""Logged demonstrations: a world's real logged agent turns as SFT warm-start `Demonstration`s (GOPO.md §3), and the
numbers that say how well they fit the world (how many turns map to a strategy, how often the world's realisation
check R reads the logged reply as the annotated strategy, how many demonstrated strategies the SOP allows).

A world turns its log into `LoggedTurn`s (customer text, logged reply, the strategy its own annotation names);
`replay` walks them through the world's SOP automaton and R; `demonstration` and `report` read the replay.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from gopo_jax.dialogue.env_protocol import Demonstration, DemoTurn
from gopo_jax.dialogue.sop import SOP, UNRECOGNISED


@dataclasses.dataclass(frozen=True)
class LoggedTurn:
    """One logged agent turn: the customer text before it, the reply as the world speaks it, and the strategy the
    log's annotation names (None when it names none of the world's strategies)."""

    customer: str
    reply: str
    label: str | None


@dataclasses.dataclass(frozen=True)
class ReplayedTurn:
    turn: LoggedTurn
    strategy: int  # demonstrated: the label, else R's reading; UNRECOGNISED: the demonstration leaves the turn out
    realised: int  # R(reply)
    stage: int  # the automaton's stage before the turn
    sop_valid: bool  # the stage allows the demonstrated strategy


def replay(turns: Sequence[LoggedTurn], sop: SOP, realise: Callable[[str], int]) -> list[ReplayedTurn]:
    """The turns replayed from the SOP's initial stage: the stage advances on each demonstrated strategy the stage
    allows and stays on any other, as the world's automaton does on a violation."""
    stage, out = sop.initial, []
    for turn in turns:
        realised = realise(turn.reply)
        k = sop.strategy_index(turn.label) if turn.label is not None else realised
        valid = k != UNRECOGNISED and bool(sop.allowed[stage, k])
        out.append(ReplayedTurn(turn, k, realised, stage, valid))
        if valid:
            stage = int(sop.transition[stage, k])
    return out


def demonstration(context: str, replayed: Sequence[ReplayedTurn], strategies: Sequence[str]) -> Demonstration:
    """The replay as a Demonstration. A turn left out hands its customer text on to the next kept turn, so no
    customer words are lost."""
    turns, unanswered = [], []
    for r in replayed:
        unanswered.append(r.turn.customer)
        if r.strategy == UNRECOGNISED:
            continue
        turns.append(DemoTurn(customer=" ".join(t for t in unanswered if t), strategy=strategies[r.strategy],
                              reply=r.turn.reply, stage=r.stage))
        unanswered = []
    return Demonstration(context=context, turns=turns)


def episode_order(num_items: int, num_episodes: int, seed: int) -> list[int]:
    """Item indices for `num_episodes` demonstrations: a seed-shuffled order, cycled when more are asked for."""
    if num_items == 0:
        raise ValueError("no logged dialogues to demonstrate")
    order = np.random.default_rng(seed).permutation(num_items)
    return [int(order[n % num_items]) for n in range(num_episodes)]


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def report(replayed: Sequence[ReplayedTurn], strategies: Sequence[str], *, dialogues: int) -> dict:
    """Counts, R's agreement with the annotated strategy (annotated turns only: a turn labelled by R agrees by
    construction) overall and per strategy, and the SOP-valid share of the demonstrated turns."""
    annotated = [r for r in replayed if r.turn.label is not None]
    kept = [r for r in replayed if r.strategy != UNRECOGNISED]
    per_strategy = {}
    for k, name in enumerate(strategies):
        rows = [r for r in annotated if r.strategy == k]
        if rows:
            per_strategy[name] = {"turns": len(rows), "realisation_agreement": _share([r.realised == k for r in rows])}
    return {
        "dialogues": dialogues, "turns": len(replayed), "annotated": len(annotated),
        "labelled_by_realisation": len(kept) - len(annotated), "left_out": len(replayed) - len(kept),
        "realisation_agreement": _share([r.realised == r.strategy for r in annotated]),
        "realisation_unrecognised": _share([r.realised == UNRECOGNISED for r in annotated]),
        "sop_valid": _share([r.sop_valid for r in kept]),
        "per_strategy": per_strategy,
    }
