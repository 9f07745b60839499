"""An interactive terminal chat with a trained agent pair: you are the customer, the run's Expert and CS answer.

    gopo-chat --workdir runs/mgshop [--sample] [--seed 0] [--context TEXT] [--step N]   # or python -m gopo_jax.chat

The dialogue opens with the world's business context (the synthetic shop's context of episode `--seed`, a text
world's scenario of reset seed `--seed`) or `--context`. Each line you type is a customer turn; an empty line or
end of input ends the dialogue. For each agent turn the chat prints the SOP stage, its allowed strategies, the
Expert's distribution over them (the masked softmax it decides from) and its choice, then the CS reply, and moves
the stage on by the SOP transition of the realised strategy (the world's realisation check on the reply) or, in a
world without one, of the chosen strategy; the first lines say which. Greedy by default (the Expert's argmax, the
CS's most likely tokens); `--sample` draws both at the run's sampling settings, reproducibly for a `--seed`.

The agents run exactly as in a rollout: `ModelAgents.init` reads the context into their KV caches, and each turn
is one `ModelAgents.act` on a `TurnInput` of the customer's ids and the agent header, appended to the caches (no
re-encoding of the history). A dialogue lasts at most the run's `layout.max_turns` agent turns, what the agents
were trained on and what their caches hold.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from gopo_jax import command_line
from gopo_jax.dialogue.rollout import ModelAgents, ModelAgentsState, SamplingConfig, TurnInput, make_header
from gopo_jax.dialogue.sop import UNRECOGNISED, masked_strategy_log_softmax
from gopo_jax.export import RestoredRun, RunError, load_run
from gopo_jax.models import heads, qwen3
from gopo_jax.train.checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class AgentTurn:
    """What one agent turn did: the transcript prints it, tests read it."""

    turn: int  # 1-based
    stage: str
    allowed: tuple[str, ...]
    distribution: dict[str, float]  # π_E over the strategies it chose among; empty without an Expert
    strategy: str | None  # the Expert's choice; None without an Expert
    reply: str  # what the CS wrote, marker tokens included (an undertrained CS writes them), end of turn excluded
    realised: str | None  # R(reply); None when the world has no realisation check or nothing was recognised
    next_stage: str


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """The state between agent turns: the agents' KV caches, the SOP stage and the turns taken."""

    carry: ModelAgentsState
    stage: int
    turns: int


def strategy_distribution(agents: ModelAgents, params, carry: ModelAgentsState, inp: TurnInput) -> jax.Array:
    """f32[B, n_k]: π_E(· | dialogue, header), 0 for masked strategies: the masked softmax `ModelAgents.act` draws
    its decision from, recomputed because `act` returns only the chosen strategy's log-prob. The Expert's cache is
    read, not kept: `act` appends the same chunk itself."""
    expert = nnx.merge(agents.expert_graphdef, params["expert"])
    chunk = jnp.concatenate([inp.customer, inp.header], axis=1)
    chunk_valid = jnp.concatenate([inp.customer_valid, inp.header_valid], axis=1)
    positions = carry.num_valid[:, None] + qwen3.positions_from_valid(chunk_valid)
    h, _ = expert.hidden(chunk, positions, chunk_valid, carry.expert_cache)
    logits = heads.row_logits(h[:, -1, :], expert.head_embedding(),
                              jnp.asarray(agents.vocab.strategy_ids, jnp.int32))
    allowed = inp.allowed if agents.sampling.sop_mask else jnp.ones_like(inp.allowed)
    return jnp.exp(masked_strategy_log_softmax(logits, allowed))


def chat_agents(run: RestoredRun, *, sample: bool) -> ModelAgents:
    """The run's pair as rollout agents: greedy (evaluation) or sampling at the run's settings."""
    s = run.config.sampling
    sampling = SamplingConfig(temperature=float(s.temperature) if sample else 0.0, top_k=int(s.top_k),
                              top_p=float(s.top_p), expert_greedy=not sample,
                              sop_mask=bool(run.components.hyper.sop_mask), use_expert=run.use_expert)
    c = run.components
    return ModelAgents(c.expert_gd, c.cs_gd, run.world.vocab, run.world.layout, sampling)


def realisation_kind(world) -> str | None:
    """How the world's realisation check reads a reply: "ids" (pure-JAX world), "text" (host world) or None."""
    if getattr(world.env, "realise", None) is None:
        return None
    return "ids" if world.kind == "jax" else "text"


def realise(world, reply_ids: np.ndarray, reply_valid: np.ndarray, reply_text: str) -> int | None:
    """R(reply): the strategy the reply carries out (UNRECOGNISED if none); None when the world has no check."""
    kind = realisation_kind(world)
    if kind is None:
        return None
    if kind == "text":
        return int(world.env.realise(reply_text))
    out = world.env.realise(jnp.asarray(reply_ids), jnp.asarray(reply_valid))
    return int(out[0] if isinstance(out, tuple) else out)  # the synthetic shop also returns product and value


def next_stage(sop, stage: int, strategy: int | None) -> int:
    """The SOP transition on `strategy`; a disallowed, unrecognised or absent strategy keeps the stage."""
    if strategy is None or strategy == UNRECOGNISED or not sop.allowed[stage, strategy]:
        return stage
    return int(sop.transition[stage, strategy])


class Chat:
    """A restored run ready to talk: its agents jitted for one dialogue (batch 1), the codec and the SOP."""

    def __init__(self, run: RestoredRun, *, sample: bool = False, seed: int = 0, context: str | None = None):
        self.run, self.world, self.sop = run, run.world, run.world.spec.sop
        self.vocab = self.world.vocab
        self.agents = chat_agents(run, sample=sample)
        self.codec = self.world.codec()  # as the world's rollouts encode contexts and customers
        self.sample, self.key = sample, jax.random.key(seed)
        self.context_ids, self.context_valid = (self.codec.context(context) if context is not None
                                                else self._world_context(seed))
        self._init = jax.jit(self.agents.init)
        self._act = jax.jit(self.agents.act)
        self._distribution = jax.jit(functools.partial(strategy_distribution, self.agents))

    def _world_context(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The business context of the world's episode `seed`, as the rollout gives it to the agents."""
        if self.world.kind == "jax":
            _, ids, valid, _ = self.world.env.reset(jax.random.key(seed))
            return np.asarray(ids), np.asarray(valid)
        return self.codec.context(self.world.env.reset(seed).context)

    @property
    def context_text(self) -> str:
        ids = np.asarray(self.context_ids)[np.asarray(self.context_valid)]
        return self.world.chat_format.content_text(self.world.tokenizer, ids, "system")

    @property
    def max_turns(self) -> int:
        return self.world.layout.max_turns

    def written_text(self, ids: np.ndarray, valid: np.ndarray) -> str:
        kept = [int(i) for i, v in zip(ids, valid) if v and int(i) != self.vocab.eot]
        return self.world.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def stage_rule(self) -> str:
        """How the stage moves on, for the transcript's first lines."""
        kind = realisation_kind(self.world)
        if kind is not None:
            return f"the stage moves on the realised strategy (the world's realisation check on the reply {kind})"
        if self.run.use_expert:
            return "the stage moves on the Expert's chosen strategy (this world has no realisation check)"
        return (f"the stage stays {self.sop.stages[self.sop.initial]} (this world has no realisation check and the "
                "run no Expert)")

    def start(self) -> Dialogue:
        carry = self._init(self.run.params, jnp.asarray(self.context_ids)[None], jnp.asarray(self.context_valid)[None])
        return Dialogue(carry=carry, stage=int(self.sop.initial), turns=0)

    def turn_input(self, customer: str, stage: int) -> TurnInput:
        ids, valid = self.codec.customer(customer)
        active = jnp.ones((1,), bool)
        header, header_valid = make_header(self.vocab, jnp.asarray([stage], jnp.int32), active)
        return TurnInput(customer=jnp.asarray(ids)[None], customer_valid=jnp.asarray(valid)[None], header=header,
                         header_valid=header_valid, allowed=jnp.asarray(self.sop.allowed[stage])[None],
                         active=active, env_state=None)

    def agent_turn(self, dialogue: Dialogue, customer: str) -> tuple[Dialogue, AgentTurn]:
        """The customer's line, then one agent turn: the Expert's decision and the CS reply."""
        stage, names = dialogue.stage, self.sop.strategies
        inp = self.turn_input(customer, stage)
        distribution = {}
        if self.run.use_expert:
            probs = np.asarray(self._distribution(self.run.params, dialogue.carry, inp)[0])
            candidates = self.sop.allowed[stage] if self.agents.sampling.sop_mask else np.ones_like(probs, bool)
            distribution = {names[k]: float(probs[k]) for k in np.flatnonzero(candidates)}
        carry, act = self._act(self.run.params, dialogue.carry, inp, jax.random.fold_in(self.key, dialogue.turns))
        reply_ids, reply_valid = np.asarray(act.reply[0]), np.asarray(act.reply_valid[0])
        reply = self.written_text(reply_ids, reply_valid)
        chosen = int(act.strategy[0]) if self.run.use_expert else None
        # A host world reads the text its rollouts give it: the reply without special tokens.
        realised = realise(self.world, reply_ids, reply_valid, self.codec.reply_text(reply_ids, reply_valid))
        moved_on = realised if realisation_kind(self.world) is not None else chosen
        new_stage = next_stage(self.sop, stage, moved_on)
        record = AgentTurn(turn=dialogue.turns + 1, stage=self.sop.stages[stage],
                           allowed=tuple(names[k] for k in np.flatnonzero(self.sop.allowed[stage])),
                           distribution=distribution, strategy=None if chosen is None else names[chosen],
                           reply=reply, realised=None if realised in (None, UNRECOGNISED) else names[realised],
                           next_stage=self.sop.stages[new_stage])
        return Dialogue(carry=carry, stage=new_stage, turns=dialogue.turns + 1), record


def format_turn(t: AgentTurn, *, max_turns: int, realisation: str | None, sampled: bool) -> list[str]:
    """The transcript lines of one agent turn."""
    lines = [f"agent turn {t.turn}/{max_turns} · stage {t.stage} · allowed: {', '.join(t.allowed)}"]
    if t.strategy is not None:
        dist = " · ".join(f"{k} {p:.3f}" for k, p in t.distribution.items())
        lines.append(f"  expert: {dist} -> {'sampled' if sampled else 'chose'} {t.strategy}")
    lines.append(f"  cs: {t.reply or '(empty reply)'}")
    moved = f"stage {t.next_stage}" if t.next_stage != t.stage else f"stage stays {t.stage}"
    if realisation is not None:
        what = t.realised or "nothing recognised"
        off_sop = t.realised is not None and t.realised not in t.allowed
        lines.append(f"  realised: {what}{' (not allowed here: an SOP violation)' if off_sop else ''} -> {moved}")
    elif t.strategy is not None:
        lines.append(f"  chosen: {t.strategy} -> {moved}")
    return lines


def chat_loop(chat: Chat, lines: Iterable[str], out: TextIO, *, echo: bool = False) -> list[AgentTurn]:
    """Runs one dialogue over the customer's `lines`, writing the transcript to `out`; returns the agent turns.
    `echo` writes each customer line too (for transcripts of piped input, where the terminal shows nothing)."""
    def write(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    sop = chat.sop
    write(f"context: {chat.context_text}")
    write(f"SOP {sop.name}: stages {', '.join(sop.stages)}; {chat.stage_rule()}")
    if not chat.run.use_expert:
        write(f"single-agent run (method {chat.run.config.method}): no Expert; the CS replies without a strategy")
    write("type a customer line; an empty line or end of input ends the dialogue")
    dialogue, turns = chat.start(), []
    for line in lines:
        text = line.strip()
        if not text:
            break
        if echo:
            write(f"customer: {text}")
        dialogue, record = chat.agent_turn(dialogue, text)
        turns.append(record)
        for row in format_turn(record, max_turns=chat.max_turns, realisation=realisation_kind(chat.world),
                               sampled=chat.sample):
            write(row)
        if dialogue.turns == chat.max_turns:
            write(f"the dialogue reached the run's limit of {chat.max_turns} agent turns (layout.max_turns: what "
                  "the agents were trained on and what their KV caches hold); start again for a new dialogue")
            return turns
        if sop.terminal[dialogue.stage]:
            write(f"the SOP reached its terminal stage {sop.stages[dialogue.stage]}; the dialogue is over")
            return turns
    write(f"dialogue ended by the customer after {dialogue.turns} agent turn(s)")
    return turns


def prompted_lines(prompt: str = "customer> ") -> Iterator[str]:
    """Lines typed at a terminal (with line editing), until end of input."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by the trainer")
    flags.DEFINE_integer("step", None, "the checkpoint step to talk to (default: the newest)")
    flags.DEFINE_bool("sample", False, "sample the Expert's choice and the CS reply (default: greedy)")
    flags.DEFINE_integer("seed", 0, "the world episode whose business context opens the dialogue, and the sampling "
                                    "seed")
    flags.DEFINE_string("context", None, "a business context of your own instead of the world's")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every restore at INFO through absl
    try:
        if not f.workdir:
            raise RunError("--workdir (a run directory written by the trainer) is required")
        chat = Chat(load_run(f.workdir, f.step), sample=f.sample, seed=f.seed, context=f.context)
    except (RunError, CheckpointError) as e:
        command_line.fail(str(e))
    interactive = sys.stdin.isatty()
    chat_loop(chat, prompted_lines() if interactive else sys.stdin, sys.stdout, echo=not interactive)


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
