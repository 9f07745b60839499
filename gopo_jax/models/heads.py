"""Output heads that turn final hidden states into only the logits a caller uses.

The decoder (`Qwen3.hidden`) returns hidden states h and the output embedding E [V, D] (row v = token v). A full
`h @ E.T` at every slot is [B, L, V] fp32, ~0.74 GB per 1,220-slot sequence at Qwen3's V = 151,936, and most of it
is thrown away: the Expert reads n_k strategy columns at T decision slots, the CS losses read one target column
plus a logsumexp and an entropy per reply slot. These heads compute just that:

* `row_logits`: the logits of a few selected vocabulary rows (the Expert's strategy tokens).
* `token_log_probs_and_entropy`: full-vocabulary log p(target) and entropy for N rows, `chunk` rows at a time
  under a rematerialised `lax.scan`, so neither the forward nor the backward pass holds more than [chunk, V];
  `token_log_probs_and_argmax` is the same scan with the arg-max token instead (SFT's accuracy).

Matmuls run in h's (compute) dtype; logsumexp, log-probs and entropies are fp32.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def row_logits(h: jax.Array, embedding: jax.Array, ids: jax.Array) -> jax.Array:
    """f32[..., n]: logits of vocabulary rows `ids` (int[n]) from hidden states h [..., D]; E is [V, D]."""
    chex.assert_rank([embedding, ids], [2, 1])
    chex.assert_type(ids, int)
    chex.assert_equal(h.shape[-1], embedding.shape[-1])
    rows = embedding[ids].astype(h.dtype)  # [n, D]
    # Accumulated in fp32, as `Qwen3.logits`: a row's logit is the same number whichever head computes it.
    return jnp.einsum("...d,nd->...n", h, rows, preferred_element_type=jnp.float32)


def token_log_probs_and_entropy(h: jax.Array, embedding: jax.Array, targets: jax.Array, *, chunk: int
                                ) -> tuple[jax.Array, jax.Array]:
    """(log softmax(h E^T)[target] f32[B, N], entropy of softmax(h E^T) f32[B, N]) for h [B, N, D], E [V, D],
    targets int[B, N] (or h [N, D], targets int[N] without the batch axis).

    About `chunk` (static) rows at a time, taken as the same span of positions in every batch row: a chunk is
    [B, chunk / B, V], so it stays split over the batch's devices (a chunk of flattened rows would sit on the
    devices that hold those rows, and every device would allocate the whole [chunk, V]). The scan body is
    `jax.checkpoint`ed, so the backward pass recomputes each chunk's logits instead of saving B x N x V of them.
    Positions are spread evenly over the chunks and padded up to whole chunks (padding is computed and dropped).
    """
    logp, entropy, _ = _chunked_token_statistics(h, embedding, targets, chunk=chunk)
    return logp, entropy


def token_log_probs_and_argmax(h: jax.Array, embedding: jax.Array, targets: jax.Array, *, chunk: int
                               ) -> tuple[jax.Array, jax.Array]:
    """(log softmax(h E^T)[target] f32[B, N], argmax_v (h E^T)[v] int32[B, N]): `token_log_probs_and_entropy`'s
    scan, with the most likely token (first of ties, as `jnp.argmax`) in place of the entropy."""
    logp, _, argmax = _chunked_token_statistics(h, embedding, targets, chunk=chunk)
    return logp, argmax


def _chunked_token_statistics(h, embedding, targets, *, chunk):
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    unbatched = h.ndim == 2
    if unbatched:
        h, targets = h[None], targets[None]
    chex.assert_rank([h, embedding, targets], [3, 2, 2])
    chex.assert_type(targets, int)
    chex.assert_equal_shape_prefix([h, targets], 2)
    chex.assert_equal(h.shape[2], embedding.shape[1])
    b, n, d = h.shape
    num_chunks = max(-(-n // max(chunk // b, 1)), 1)
    span = max(-(-n // num_chunks), 1)  # positions per chunk, spread evenly: 112 at chunk 32 run as 4 x 28
    num_chunks = max(-(-n // span), 1)
    pad = num_chunks * span - n
    h_chunks = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, num_chunks, span, d).swapaxes(0, 1)
    t_chunks = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, num_chunks, span).swapaxes(0, 1)
    table = embedding.astype(h.dtype)

    def one_chunk(hc, tc):
        # [B, span, V]: the only vocabulary-wide buffer; the matmul accumulates in fp32.
        logits = jnp.einsum("bsd,vd->bsv", hc, table, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        probs = jnp.exp(logits - lse[..., None])
        # H = -Σ p log p = lse - Σ p·logit: no second [chunk, V] log-softmax buffer.
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        return target_logit - lse, entropy, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if num_chunks == 1:
        # Everything fits in one chunk: no loop, and the backward keeps this chunk's logits rather than recomputing
        # them (the same order of memory as the chunk itself).
        stats = tuple(x[None] for x in one_chunk(h_chunks[0], t_chunks[0]))
    else:
        rematerialised = jax.checkpoint(one_chunk)
        _, stats = jax.lax.scan(lambda carry, xs: (carry, rematerialised(*xs)), None, (h_chunks, t_chunks))
    stats = tuple(x.swapaxes(0, 1).reshape(b, -1)[:, :n] for x in stats)
    return tuple(x[0] for x in stats) if unbatched else stats
