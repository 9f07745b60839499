"""Supervised fine-tuning loss: token-mean cross-entropy on the masked target tokens of a dialogue batch.

Used to warm-start the tiny default models (GOPO.md §6) and as the simplest client of the shared train step.

Batch (a mapping of arrays):
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
import jax
import jax.numpy as jnp
from flax import nnx

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
    logits, _ = model(tokens, positions_from_valid(valid), valid)
    prev, has_prev = previous_valid_slot(valid)
    rows = jnp.arange(tokens.shape[0])[:, None]
    # Reduce over the vocabulary first, then gather per slot: no second [B, L, V] copy.
    logp = logits[rows, prev, tokens] - jax.nn.logsumexp(logits, axis=-1)[rows, prev]
    correct = jnp.argmax(logits, axis=-1)[rows, prev] == tokens

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
