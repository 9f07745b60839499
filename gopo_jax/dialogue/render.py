"""Human-readable transcripts of rolled-out dialogues (what a researcher reads to see what the agents learned)."""
from __future__ import annotations

import numpy as np

from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.sop import UNRECOGNISED


def _text(tokenizer, chat_format, ids, valid, role: str) -> str:
    return chat_format.content_text(tokenizer, [i for i, v in zip(ids, valid) if v], role)


def render_dialogue(traj: Trajectory, index: int, *, tokenizer, chat_format, layout: Layout, strategies) -> str:
    """One dialogue of a batch as text: every turn's customer utterance, chosen and realised strategy, the reply and
    its signals."""
    tokens, valid = np.asarray(traj.tokens[index]), np.asarray(traj.valid[index])
    c = layout.context_len
    lines = [f"context: {_text(tokenizer, chat_format, tokens[:c], valid[:c], 'system')}"]
    name = lambda k: strategies[k] if 0 <= k < len(strategies) else "-"  # noqa: E731
    for t in range(layout.max_turns):
        if not bool(traj.turn_mask[index, t]):
            break
        c0, r0 = layout.turn_start(t), layout.reply_start(t)
        customer = _text(tokenizer, chat_format, tokens[c0:c0 + layout.customer_len],
                         valid[c0:c0 + layout.customer_len], "user")
        reply = _text(tokenizer, chat_format, tokens[r0:r0 + layout.reply_len], valid[r0:r0 + layout.reply_len],
                      "assistant")
        k, kr = int(traj.strategy[index, t]), int(traj.realised[index, t])
        lines.append(f"  customer: {customer}")
        lines.append(f"  agent [{name(k)} -> {name(kr) if kr != UNRECOGNISED else 'unrecognised'}] {reply}"
                     f"   (g={float(traj.gain[index, t]):.2f} c={float(traj.cont[index, t]):.2f} "
                     f"rel={float(traj.rel[index, t]):.0f} q={float(traj.quality[index, t]):.2f})")
    lines.append(f"  outcome={float(traj.outcome[index]):.0f} satisfaction={float(traj.satisfaction[index]):.2f} "
                 f"fcr={float(traj.fcr[index]):.0f}")
    return "\n".join(lines)


def judge_samples(traj: Trajectory, indices, *, tokenizer, chat_format, layout: Layout, strategies,
                  descriptions=()) -> list[dict]:
    """The agent turns of dialogues `indices` as G-Eval samples (`gopo_jax.metrics.geval.Sample` fields): the
    dialogue so far as "Customer: ... / Agent: ..." lines, the reply, and the chosen strategy with its description
    ("" where no Expert chose one), plus the episode and turn they come from."""
    tokens, valid = np.asarray(traj.tokens), np.asarray(traj.valid)
    described = dict(zip(strategies, descriptions))
    samples = []
    for i in indices:
        c = layout.context_len
        history = [f"Business context: {_text(tokenizer, chat_format, tokens[i, :c], valid[i, :c], 'system')}"]
        for t in range(layout.max_turns):
            if not bool(traj.turn_mask[i, t]):
                break
            c0, r0 = layout.turn_start(t), layout.reply_start(t)
            history.append("Customer: " + _text(tokenizer, chat_format, tokens[i, c0:c0 + layout.customer_len],
                                                valid[i, c0:c0 + layout.customer_len], "user"))
            reply = _text(tokenizer, chat_format, tokens[i, r0:r0 + layout.reply_len],
                          valid[i, r0:r0 + layout.reply_len], "assistant")
            k = int(traj.strategy[i, t])
            strategy = f"{strategies[k]}: {described.get(strategies[k], strategies[k])}" if 0 <= k < len(
                strategies) else ""
            samples.append({"episode": int(i), "turn": t, "context": "\n".join(history), "response": reply,
                            "strategy": strategy})
            history.append("Agent: " + reply)
    return samples
