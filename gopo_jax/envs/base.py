"""What the host (text) worlds share: the `HostEnv` base class, one way to find and read their data files with errors
that name the file, the record and the fix, and the per-turn signals every host world computes the same way.

The protocol types themselves (`EnvSpec`, `TurnSignals`, `HostObs`, ...) live in gopo_jax/dialogue/env_protocol.py,
below the rollout drivers that consume them.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import json
import pathlib
from typing import Any, Iterable

import numpy as np

from gopo_jax.dialogue.env_protocol import Demonstration, DemoTurn, EnvSpec, EpisodeOutcome, HostObs, TurnSignals

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


class EnvDataError(ValueError):
    """Malformed or inconsistent world data; the message names the file, the record and the fix."""


class MissingEnvData(EnvDataError, FileNotFoundError):
    """A world's data folder or file is not there; the message says where the data comes from and how to point the
    config key `env.data_dir` at it."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a file-backed world's data lives and how problems with it read (one per world)."""

    world: str  # the world's name as people know it ("MultiWOZ")
    folder: str  # its folder under shared/data
    files: str  # what the world reads there, for the not-found message
    error: type[EnvDataError] = EnvDataError  # the world's error for malformed content

    def missing(self, path: pathlib.Path) -> MissingEnvData:
        return MissingEnvData(
            f"{path}: not found. The {self.world} world reads {self.files} from the shared data folder "
            f"(shared/data/{self.folder}, described in its README.md). Set the config key env.data_dir to that "
            f"folder: --config.env.data_dir=/path/to/shared/data/{self.folder}")

    def resolve(self, data_dir: str | pathlib.Path | None) -> pathlib.Path:
        """The data folder: `data_dir` (a config's env.data_dir; empty or None: shared/data/<folder>)."""
        path = pathlib.Path(data_dir) if data_dir else SHARED_DATA / self.folder
        if not path.is_dir():
            raise self.missing(path)
        return path

    def read_json(self, path: pathlib.Path) -> Any:
        """The parsed JSON file; a missing, truncated or non-UTF-8 file is one error naming it."""
        path = pathlib.Path(path)
        if not path.exists():
            raise self.missing(path)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise self.error(f"{path}: not UTF-8 text ({e}); re-fetch the file") from None
        except (ValueError, RecursionError, OSError) as e:
            # ValueError: bad JSON and integers past Python's digit limit; RecursionError: nesting past the
            # interpreter's limit; OSError: the path is a folder or unreadable.
            raise self.error(f"{path}: not valid JSON ({e}); the file may be truncated: restore it from the source "
                             f"named in {path.parent / 'README.md'} or re-fetch it") from None


class HostEnv(abc.ABC):
    """A text world: one Python object plays one episode at a time (`reset(seed)` then `step` until `obs.done`).

    Subclasses keep their loaded data immutable and shared, and the current episode in `self._ep`, so a deep copy
    (one per rollout episode, one per greedy lookahead) copies only the episode.
    """

    spec: EnvSpec
    _ep: Any = None

    def __deepcopy__(self, memo):
        other = copy.copy(self)
        other._ep = copy.deepcopy(self._ep, memo)
        return other

    def _episode(self) -> Any:
        if self._ep is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(seed) before step/outcome/reference_turn")
        return self._ep

    @abc.abstractmethod
    def reset(self, seed: int) -> HostObs: ...

    @abc.abstractmethod
    def step(self, strategy: int, reply: str) -> tuple[HostObs, TurnSignals]:
        """TurnSignals fields are Python/numpy scalars here. `strategy` is the Expert's choice, or UNRECOGNISED
        (-1) when no Expert acts: then the realised strategy counts as chosen (`host_turn_signals`)."""

    @abc.abstractmethod
    def outcome(self) -> EpisodeOutcome: ...

    @abc.abstractmethod
    def realise(self, reply: str) -> int:
        """The realisation check R (deterministic): the strategy index the reply carries out, or UNRECOGNISED."""

    @abc.abstractmethod
    def reference_turn(self) -> tuple[int, str]:
        """The reference policy's (strategy, reply) for the current state (deterministic given the reset seed)."""

    @abc.abstractmethod
    def scripted_reply(self, strategy: int) -> str:
        """A reply that realises `strategy` in the current state (for scripted random/greedy policies)."""

    @abc.abstractmethod
    def corpus(self) -> Iterable[str]:
        """Texts of this world (for training the embedded tokenizer)."""

    def stage_names(self) -> tuple[str, ...]:
        """The stage tokens of the agent header: one per SOP stage."""
        return tuple(self.spec.sop.stages)

    def demonstrations(self, num_episodes: int, seed: int) -> list[Demonstration]:
        """Reference-policy dialogues from reset seeds seed, seed+1, ... (played on a copy: this env is untouched)."""
        env = copy.deepcopy(self)
        demos = []
        for i in range(num_episodes):
            obs = env.reset(seed + i)
            turns = []
            while not obs.done:
                k, reply = env.reference_turn()
                turns.append(DemoTurn(customer=obs.customer, strategy=env.spec.strategies[k], reply=reply,
                                      stage=int(obs.stage)))
                obs, _ = env.step(k, reply)
            demos.append(Demonstration(context=obs.context, turns=turns))
        return demos


# c_t of the scripted-user worlds (MultiWOZ, TmallBrand): set, not fitted, as neither dataset labels engagement.
ENGAGEMENT = dict(progress=0.98, info=0.95, idle=0.85, violation=0.6)


def scripted_user_engagement(*, valid: bool, progress: bool, changed: bool) -> float:
    """c_t after a turn: an SOP violation or unrecognised reply, goal progress, a change of the dialogue state (the
    user told or was offered something), or an idle valid turn."""
    if not valid:
        return ENGAGEMENT["violation"]
    if progress:
        return ENGAGEMENT["progress"]
    return ENGAGEMENT["info"] if changed else ENGAGEMENT["idle"]


def graded_relevance(chosen: int, reference: int, allowed: np.ndarray, valid: bool) -> int:
    """rel_t of host worlds: 2 for the reference policy's choice, 1 for another allowed strategy, 0 otherwise or
    when the reply violated the SOP."""
    if not valid:
        return 0
    if chosen == reference:
        return 2
    return int(0 <= chosen < len(allowed) and bool(allowed[chosen]))


def host_turn_signals(*, strategy: int, realised: int, reference: int, allowed: np.ndarray, valid: bool, gain: float,
                      cont: float, done: bool, quality: float = 0.0) -> TurnSignals:
    """The per-turn signals of a host world. `strategy < 0` means there is no Expert (single-agent baselines, the
    no-EA ablation): the chosen strategy is then the realised one."""
    chosen = realised if strategy < 0 else strategy
    return TurnSignals(gain=float(gain), cont=float(cont), rel=graded_relevance(chosen, reference, allowed, valid),
                       rel_realised=graded_relevance(realised, reference, allowed, valid), quality=float(quality),
                       realised=int(realised), aligned=int(realised == chosen and realised >= 0),
                       sop_valid=int(valid), done=bool(done))


def write_demonstrations_jsonl(demos: Iterable[Demonstration], path) -> int:
    """The demonstration exporter: one JSON object per dialogue; returns the count written."""
    n = 0
    with open(path, "w") as f:
        for d in demos:
            f.write(json.dumps(d.to_json()) + "\n")
            n += 1
    return n
