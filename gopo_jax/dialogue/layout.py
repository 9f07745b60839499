"""Fixed-shape trajectory layout: one token buffer per dialogue with a fixed slot per turn.

A dialogue buffer is `[context | turn 0 | turn 1 | ... | turn T_max-1]`; every turn has the same width

    [customer slot: Lc][agent header slot: Lh][EA decision: 1][CS reply slot: Lr]

Unused tail positions of a slot are PAD with `valid=False`. Pads are invisible to the model (key mask) and do not
advance RoPE positions (`positions = cumsum(valid) - 1`), so the model sees exactly the compacted dialogue: this
is what makes per-turn assembly by appending ids equal to encoding the whole dialogue at once (token-in-token-out),
while every shape stays static for `jit`/`scan`.

Loss masks are target-aligned: `ea_mask[i]` marks the EA's decision token at i (predicted from position i-1),
`cs_mask[i]` the CS reply tokens. Context, customer and header tokens are in no agent's loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp


ROLE_PAD, ROLE_CONTEXT, ROLE_CUSTOMER, ROLE_HEADER, ROLE_EXPERT, ROLE_CS = 0, 1, 2, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static slot sizes; hashable, so it is a static argument of jitted code."""

    context_len: int
    customer_len: int
    header_len: int
    reply_len: int
    max_turns: int

    @property
    def turn_width(self) -> int:
        return self.customer_len + self.header_len + 1 + self.reply_len

    @property
    def length(self) -> int:
        return self.context_len + self.max_turns * self.turn_width

    def turn_start(self, t):
        return self.context_len + t * self.turn_width

    def header_start(self, t):
        return self.turn_start(t) + self.customer_len

    def decision_pos(self, t):
        return self.header_start(t) + self.header_len

    def reply_start(self, t):
        return self.decision_pos(t) + 1

    def role_template(self) -> jnp.ndarray:
        """int8[L]: the role of every slot (before padding is taken into account)."""
        turn = jnp.concatenate([
            jnp.full((self.customer_len,), ROLE_CUSTOMER, jnp.int8),
            jnp.full((self.header_len,), ROLE_HEADER, jnp.int8),
            jnp.full((1,), ROLE_EXPERT, jnp.int8),
            jnp.full((self.reply_len,), ROLE_CS, jnp.int8),
        ])
        return jnp.concatenate([jnp.full((self.context_len,), ROLE_CONTEXT, jnp.int8), jnp.tile(turn, self.max_turns)])

    def turn_of_position(self) -> jnp.ndarray:
        """int32[L]: turn index of each slot, -1 for the context prefix."""
        per_turn = jnp.repeat(jnp.arange(self.max_turns, dtype=jnp.int32), self.turn_width)
        return jnp.concatenate([jnp.full((self.context_len,), -1, jnp.int32), per_turn])


@flax.struct.dataclass
class Trajectory:
    """A batch of rolled-out dialogues. Leading axis B on every field (unbatched inside vmap)."""

    tokens: Any  # int32[B, L]
    valid: Any  # bool[B, L]
    ea_mask: Any  # bool[B, L]  EA decision tokens (target-aligned)
    cs_mask: Any  # bool[B, L]  CS reply tokens (target-aligned)
    cs_logprob: Any  # f32[B, L]  rollout log-prob of each CS token (0 elsewhere)
    strategy: Any  # int32[B, T]  chosen k_t
    allowed: Any  # bool[B, T, n_k]  SOP mask M[σ_t] at each decision
    ea_logprob: Any  # f32[B, T]  rollout log π_E(k_t | x_t) (masked softmax)
    realised: Any  # int32[B, T]
    aligned: Any  # f32[B, T]
    sop_valid: Any  # f32[B, T]
    gain: Any  # f32[B, T]
    cont: Any  # f32[B, T]
    rel: Any  # f32[B, T]  relevance of the chosen k_t (the Expert's training signal)
    rel_realised: Any  # f32[B, T]  relevance of the realised k̂_t (what evaluation reports)
    quality: Any  # f32[B, T]
    turn_mask: Any  # bool[B, T]  turns that happened
    outcome: Any  # f32[B]
    satisfaction: Any  # f32[B]
    fcr: Any  # f32[B]
    # f32[B, T]: turns the deployment-time n-candidate filter rescued (`rollout.ModelAgents._filter`); None when
    # the agents ran no filter (training, n_candidates == 1), so such trajectories are as before.
    filter_rescued: Any = None

    @property
    def num_turns(self) -> jax.Array:
        return self.turn_mask.sum(-1)

    def check(self, layout: Layout, num_strategies: int) -> None:
        b = self.tokens.shape[0]
        chex.assert_shape([self.tokens, self.valid, self.ea_mask, self.cs_mask, self.cs_logprob], (b, layout.length))
        chex.assert_shape([self.strategy, self.ea_logprob, self.realised, self.aligned, self.sop_valid, self.gain,
                           self.cont, self.rel, self.rel_realised, self.quality, self.turn_mask],
                          (b, layout.max_turns))
        chex.assert_shape(self.allowed, (b, layout.max_turns, num_strategies))
        chex.assert_shape([self.outcome, self.satisfaction, self.fcr], (b,))
