"""Supervised fine-tuning losses.

* `sft_loss`: one model, token-mean cross-entropy on the masked target tokens of a token batch (the simplest client
  of the shared train step; benchmarks and the multi-host test use it).
* `make_warm_start_loss`: the dual-agent warm start of a run (GOPO.md §6), the Expert's masked-softmax NLL of the
  demonstrated strategy plus the CS's cross-entropy on the demonstrated replies, over a `DemoBatch`.

`sft_loss` batch (a mapping of arrays):
    tokens     int32[B, L]
    valid      bool[B, L]   False at PAD slots, which may sit anywhere (fixed-size turn slots)
    loss_mask  bool[B, L]   target-aligned: True where token i is a target, predicted from the logits of the
                            closest valid slot before i (slot i-1 when there is no padding in between)
Positions are `cumsum(valid) - 1`, so pads do not shift RoPE. A masked slot that is a pad, or has no valid
slot before it (the first token), is not a target. The loss is the mean over all target tokens of the
batch (every token weighs the same, whatever its sequence's length).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.models import heads
from gopo_jax.models.qwen3 import positions_from_valid, previous_valid_slot

BATCH_KEYS = ("tokens", "valid", "loss_mask")


def sft_loss(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss f32[], metrics {loss, accuracy, num_tokens}) for one model given by `nnx.split` parts.

    `params` is the split-off state (nnx.Param and anything else `graphdef` needs). Pure: usable inside
    `jax.jit` / `jax.grad`. An all-unmasked batch gives loss 0 and accuracy 0 rather than NaN.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"sft_loss: batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    tokens, valid, loss_mask = batch["tokens"], batch["valid"], batch["loss_mask"]
    chex.assert_rank([tokens, valid, loss_mask], 2)
    chex.assert_equal_shape([tokens, valid, loss_mask])
    chex.assert_type(tokens, int)
    chex.assert_type([valid, loss_mask], bool)

    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(tokens, positions_from_valid(valid), valid)
    prev, has_prev = previous_valid_slot(valid)
    # Each slot is predicted from its previous valid slot's hidden state; the chunked head turns those into one
    # log-prob and one arg-max per slot without ever holding [B, L, V] logits.
    h_prev = jnp.take_along_axis(h, prev[..., None], axis=1)
    logp, argmax = heads.token_log_probs_and_argmax(h_prev, model.head_embedding(), tokens,
                                                    chunk=model.config.logits_chunk)
    correct = argmax == tokens

    is_target = (loss_mask & has_prev).astype(jnp.float32)
    num_tokens = jnp.sum(is_target)
    denom = jnp.maximum(num_tokens, 1.0)
    loss = -jnp.sum(logp * is_target) / denom
    accuracy = jnp.sum(correct * is_target) / denom
    return loss, {"loss": loss, "accuracy": accuracy, "num_tokens": num_tokens}


def make_sft_loss_fn(graphdef: nnx.GraphDef):
    """`sft_loss` in the `gopo_jax.train.step` loss signature (extras passed through, rng unused)."""
    def loss_fn(params, extras, batch, rng):
        del rng  # SFT is deterministic
        loss, metrics = sft_loss(graphdef, params, batch)
        return loss, (metrics, extras)

    return loss_fn


# --- the dual-agent warm start (GOPO.md §6): both agents imitate demonstrated dialogues ---

def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@flax.struct.dataclass
class DemoBatch:
    """The warm start's batch: demonstrated dialogues (scripted rollouts in the layout of the agents' rollouts)."""

    traj: Trajectory


def imitable_decisions(traj: Trajectory, *, sop_mask: bool) -> jax.Array:
    """bool[B, T]: demonstrated turns the Expert can learn to reproduce. A logged agent sometimes takes a strategy
    the SOP does not allow at that stage (real MG-ShopDial wizards: ~3% of turns) or one no strategy name covers;
    under the SOP mask the Expert gives such a move probability 0, so its NLL is unbounded and carries no
    gradient: it is left out of the loss (and counted in `sft_expert_skipped`) rather than swamping it."""
    known = (traj.strategy >= 0) & traj.turn_mask
    if not sop_mask:
        return known
    k = jnp.clip(traj.strategy, 0)[..., None]
    return known & jnp.take_along_axis(traj.allowed, k, axis=-1)[..., 0]


def make_warm_start_loss(expert_graphdef: Any, cs_graphdef: Any, layout: Layout, strategy_ids: tuple[int, ...], *,
                         use_expert: bool = True, sop_mask: bool = True):
    """SFT of both agents on demonstrations: EA on x_t -> k_t (masked-softmax NLL), CS on (x_t, k_t) -> y_t
    (token cross-entropy on the reply slots). Batch: a `DemoBatch` of scripted rollouts."""

    def loss_fn(params, extras, batch, rng):
        del rng
        traj = batch.traj
        metrics = {}
        loss = jnp.zeros((), jnp.float32)
        if use_expert:
            expert = nnx.merge(expert_graphdef, params["expert"])
            logp_all = scoring.expert_strategy_log_probs(expert, traj, layout, strategy_ids, sop_mask=sop_mask)
            imitable = imitable_decisions(traj, sop_mask=sop_mask)
            logp = scoring.chosen(logp_all, traj.strategy, imitable)
            loss_e = -_masked_mean(logp, imitable)
            metrics["sft_expert_nll"] = loss_e
            metrics["sft_expert_accuracy"] = _masked_mean(
                (jnp.argmax(logp_all, -1) == traj.strategy).astype(jnp.float32), imitable)
            metrics["sft_expert_skipped"] = 1.0 - _masked_mean(imitable.astype(jnp.float32), traj.turn_mask)
            loss = loss + loss_e
        cs = nnx.merge(cs_graphdef, params["cs"])
        cs_logp, _ = scoring.cs_token_log_probs(cs, traj, layout)
        loss_c = -_masked_mean(cs_logp, traj.cs_mask)
        metrics["sft_cs_nll"] = loss_c
        return loss + loss_c, (metrics, extras)

    return loss_fn
