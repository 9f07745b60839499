"""Output heads that turn final hidden states into only the logits a caller uses.

The decoder (`Qwen3.hidden`) returns hidden states h and the output embedding E [V, D] (row v = token v). A full
`h @ E.T` at every slot is [B, L, V] fp32, ~0.74 GB per 1,220-slot sequence at Qwen3's V = 151,936, and most of it
is thrown away: the Expert reads n_k strategy columns at T decision slots, the CS losses read one target column
plus a logsumexp and an entropy per reply slot. These heads compute just that:

* `row_logits`: the logits of a few selected vocabulary rows (the Expert's strategy tokens).
* `token_log_probs_and_entropy`: full-vocabulary log p(target) and entropy for N rows, `chunk` rows at a time
  under a rematerialised `lax.scan`, so neither the forward nor the backward pass holds more than [chunk, V];
  `token_log_probs_and_argmax` is the same scan with the arg-max token instead (SFT's accuracy).
* `all_logits`: every vocabulary column at every given row (sampling a token, `Qwen3.logits`).

The sampled distribution. A rollout draws each token from `SamplingDist`: softmax(filter(z / T)), temperature
then top-k then top-p (`filter_logits`), and records the token's log-prob under that distribution (GOPO.md §1;
greedy T == 0 records the model's own log softmax(z)). The policy the RL losses train is that distribution as a
function of θ, so `token_log_probs_and_entropy` takes the same `SamplingDist` and applies it per chunk: at θ = θ_old
the recomputed log-prob equals the recorded one and every PPO ratio is 1. The default (T 1, no filter) is the model's
own distribution and costs nothing extra; a top-p filter sorts each chunk's [chunk, V] logits.

Each takes the output embedding as a plain [V, D] table or as an `EditedEmbedding`: a table with a few rows replaced
(a LoRA model's trained marker rows, `Qwen3.head_embedding`). The heads compute with the table and patch the edited
rows or columns in, so the edited [V, D] table is never built: building it would copy the table at every call (every
decode step) and, in the backward pass, make the head compute the full [V, D] gradient of the table only to read its
n edited rows.

Matmuls run in h's (compute) dtype; logsumexp, log-probs and entropies are fp32.
"""
from __future__ import annotations

import dataclasses
import math

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class EditedEmbedding:
    """The output embedding `table` [V, D] with its rows `row_ids` replaced by `rows` [n, D]."""

    table: jax.Array
    rows: jax.Array
    # Static: which rows are edited is part of the model's architecture (Qwen3Config.trainable_rows), and the heads
    # skip the patching altogether when there are none.
    row_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def unedited(cls, table: jax.Array) -> EditedEmbedding:
        return cls(table=table, rows=table[:0], row_ids=())

    def dense(self) -> jax.Array:
        """The edited [V, D] table itself (a copy of `table` when rows are edited)."""
        if not self.row_ids:
            return self.table
        return self.table.at[np.asarray(self.row_ids, np.int32)].set(self.rows.astype(self.table.dtype))

    def astype(self, dtype) -> EditedEmbedding:
        return self.replace(table=self.table.astype(dtype), rows=self.rows.astype(dtype))


def _edited(embedding: jax.Array | EditedEmbedding) -> EditedEmbedding:
    return embedding if isinstance(embedding, EditedEmbedding) else EditedEmbedding.unedited(embedding)


def replace_rows(values: jax.Array, ids: jax.Array, row_ids: tuple[int, ...], rows: jax.Array) -> jax.Array:
    """values [..., D] (a table's rows `ids` [...]) with each row whose id is in `row_ids` replaced by its row of
    `rows` [n, D] (cast to values' dtype). An [..., n] comparison, not an int[V] map from ids to edited rows."""
    if not row_ids:
        return values
    chex.assert_shape(rows, (len(row_ids), values.shape[-1]))
    match = ids[..., None] == jnp.asarray(row_ids, ids.dtype)
    replacement = rows.astype(values.dtype)[jnp.argmax(match, axis=-1)]
    return jnp.where(jnp.any(match, axis=-1)[..., None], replacement, values)


def all_logits(h: jax.Array, embedding: jax.Array | EditedEmbedding) -> jax.Array:
    """f32[..., V]: every vocabulary column from hidden states h [..., D]; the matmul runs in h's dtype and accumulates
    into fp32 (no bf16 rounding of the logits). An edited row's column is the table's plus h·(edited row) - h·(table
    row), to fp32 rounding of the logit."""
    e = _edited(embedding)
    chex.assert_rank(e.table, 2)
    chex.assert_equal(h.shape[-1], e.table.shape[-1])
    logits = jnp.einsum("...d,vd->...v", h, e.table.astype(h.dtype), preferred_element_type=jnp.float32)
    if not e.row_ids:
        return logits
    ids = np.asarray(e.row_ids, np.int32)
    edited = jnp.einsum("...d,nd->...n", h, e.rows.astype(h.dtype), preferred_element_type=jnp.float32)
    unedited = jnp.einsum("...d,nd->...n", h, e.table[ids].astype(h.dtype), preferred_element_type=jnp.float32)
    # A correction added onto the matmul's output (in place) rather than the columns replaced: the cotangent of an
    # add passes to the matmul unmasked, where a replacement's masked copy cost the chunked head's backward pass one
    # more [chunk, V] buffer (measured by tests/test_lora.py's LoRA step).
    return logits.at[..., ids].add(edited - unedited)


def row_logits(h: jax.Array, embedding: jax.Array | EditedEmbedding, ids: jax.Array) -> jax.Array:
    """f32[..., n]: logits of vocabulary rows `ids` (int[n]) from hidden states h [..., D]; E is [V, D]."""
    e = _edited(embedding)
    chex.assert_rank([e.table, ids], [2, 1])
    chex.assert_type(ids, int)
    chex.assert_equal(h.shape[-1], e.table.shape[-1])
    rows = replace_rows(e.table[ids], ids, e.row_ids, e.rows).astype(h.dtype)  # [n, D]
    # Accumulated in fp32, as `Qwen3.logits`: a row's logit is the same number whichever head computes it.
    return jnp.einsum("...d,nd->...n", h, rows, preferred_element_type=jnp.float32)


def check_filters(top_k: int, top_p) -> None:
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, (int, float)) and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k and then the top-p nucleus to -inf. logits: float[..., V].

    top_p keeps the smallest prefix (by descending probability) whose mass reaches top_p, i.e. a token is kept
    when the mass strictly above it is < top_p (Hugging Face's TopPLogitsWarper rule). Ties with the last
    kept logit are kept too. `top_k` is a static Python number; `top_p` is one too (1 skips the nucleus filter at
    trace time) or a traced scalar in (0, 1], which always filters (a server compiles one program for every
    requested top_p). Which tokens are kept is piecewise constant in the logits: the thresholds are computed under
    `stop_gradient`, so a backward pass differentiates the kept logits only, never the sort.
    """
    check_filters(top_k, top_p)
    vocab = logits.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(jax.lax.stop_gradient(logits), top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if not isinstance(top_p, (int, float)) or top_p < 1.0:
        sorted_desc = -jnp.sort(-jax.lax.stop_gradient(logits), axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_above < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


@dataclasses.dataclass(frozen=True)
class SamplingDist:
    """The distribution a token is sampled from, as a function of the model's logits z: softmax(filter(z / T)),
    temperature first, then top-k, then top-p (`filter_logits`). temperature == 0 is greedy decoding: the token is
    argmax z and its recorded log-prob is the model's own log softmax(z), whatever the filters.

    `temperature` and `top_p` are static Python numbers (a trainer's, hashable), or traced scalars where a sampler
    takes them per call; a traced temperature must be > 0 (the sampler branches greedy decoding off before).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_filters(self.top_k, self.top_p)
        t = self.temperature
        if isinstance(t, (int, float)) and not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")

    @property
    def is_model(self) -> bool:
        """Static: the distribution is the model's own softmax(z) (T 1 without filters, or greedy), so the heads
        skip the transformation altogether."""
        t = self.temperature
        if not isinstance(t, (int, float)) or not isinstance(self.top_p, (int, float)):
            return False
        return t == 0 or (t == 1 and self.top_k == 0 and self.top_p == 1)

    def tempered(self, logits: jax.Array) -> jax.Array:
        """z / T, elementwise (z itself for the model's distribution): a gathered logit tempered here is bitwise
        the entry of `logits(z)` at that token when the filters keep it."""
        t = self.temperature
        return logits if self.is_model or (isinstance(t, (int, float)) and t == 1) else logits / t

    def logits(self, logits: jax.Array) -> jax.Array:
        """filter(z / T) f32[..., V]: -inf outside the support; softmax of it is the sampled distribution."""
        if self.is_model:
            return logits
        return filter_logits(self.tempered(logits), top_k=self.top_k, top_p=self.top_p)


def token_log_probs_and_entropy(h: jax.Array, embedding: jax.Array | EditedEmbedding, targets: jax.Array, *,
                                chunk: int, dist: SamplingDist = SamplingDist()) -> tuple[jax.Array, jax.Array]:
    """(log π(target) f32[B, N], entropy of π f32[B, N]) with π = the sampled distribution `dist` of the logits
    h E^T (by default the model's own softmax(h E^T)), for h [B, N, D], E [V, D], targets int[B, N] (or h [N, D],
    targets int[N] without the batch axis).

    When `dist` filters and its support at these logits excludes the target (the current policy moved after the
    token was sampled), the target is kept in the support: log π(target) = (z_t / T) − logsumexp over the support
    ∪ {target}. That stays finite, and at the logits the token was sampled from it is exactly the recorded log-prob
    (the token was in the support then). The entropy is the filtered distribution's, the target not added.

    About `chunk` (static) rows at a time, taken as the same span of positions in every batch row: a chunk is
    [B, chunk / B, V], so it stays split over the batch's devices (a chunk of flattened rows would sit on the
    devices that hold those rows, and every device would allocate the whole [chunk, V]). The scan body is
    `jax.checkpoint`ed, so the backward pass recomputes each chunk's logits instead of saving B x N x V of them.
    Positions are spread evenly over the chunks and padded up to whole chunks (padding is computed and dropped).
    """
    logp, entropy, _ = _chunked_token_statistics(h, embedding, targets, chunk=chunk, dist=dist)
    return logp, entropy


def token_log_probs_and_argmax(h: jax.Array, embedding: jax.Array | EditedEmbedding, targets: jax.Array, *,
                               chunk: int) -> tuple[jax.Array, jax.Array]:
    """(log softmax(h E^T)[target] f32[B, N], argmax_v (h E^T)[v] int32[B, N]): `token_log_probs_and_entropy`'s
    scan under the model's own distribution (SFT's likelihood), with the most likely token (first of ties, as
    `jnp.argmax`) in place of the entropy."""
    logp, _, argmax = _chunked_token_statistics(h, embedding, targets, chunk=chunk, dist=SamplingDist())
    return logp, argmax


def _chunked_token_statistics(h, embedding, targets, *, chunk, dist: SamplingDist):
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    unbatched = h.ndim == 2
    if unbatched:
        h, targets = h[None], targets[None]
    # Cast once, outside the chunk loop.
    output = _edited(embedding).astype(h.dtype)
    chex.assert_rank([h, output.table, targets], [3, 2, 2])
    chex.assert_type(targets, int)
    chex.assert_equal_shape_prefix([h, targets], 2)
    chex.assert_equal(h.shape[2], output.table.shape[1])
    b, n, d = h.shape
    num_chunks = max(-(-n // max(chunk // b, 1)), 1)
    span = max(-(-n // num_chunks), 1)  # positions per chunk, spread evenly: 112 at chunk 32 run as 4 x 28
    num_chunks = max(-(-n // span), 1)
    pad = num_chunks * span - n
    h_chunks = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, num_chunks, span, d).swapaxes(0, 1)
    t_chunks = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, num_chunks, span).swapaxes(0, 1)

    def one_chunk(hc, tc):
        # [B, span, V]: the only vocabulary-wide buffer (with its transformed copy under a sampling filter); the
        # matmul accumulates in fp32.
        logits = all_logits(hc, output)
        argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        if dist.is_model:
            lse = jax.nn.logsumexp(logits, axis=-1)
            probs = jnp.exp(logits - lse[..., None])
            # H = -Σ p log p = lse - Σ p·logit: no second [chunk, V] log-softmax buffer.
            return target_logit - lse, lse - jnp.sum(probs * logits, axis=-1), argmax
        sampled = dist.logits(logits)  # -inf outside the support
        in_support = jnp.isfinite(sampled)
        support_lse = jax.nn.logsumexp(sampled, axis=-1)
        target_tempered = dist.tempered(target_logit)
        # A target the current filter drops is kept in the support (see `token_log_probs_and_entropy`).
        dropped = ~jnp.take_along_axis(in_support, tc[..., None], axis=-1)[..., 0]
        lse = jnp.where(dropped, jnp.logaddexp(support_lse, target_tempered), support_lse)
        probs = jnp.exp(sampled - support_lse[..., None])
        # 0 rather than -inf off the support: p·(-inf) would be NaN, in the backward pass too.
        entropy = support_lse - jnp.sum(probs * jnp.where(in_support, sampled, 0.0), axis=-1)
        return target_tempered - lse, entropy, argmax

    if num_chunks == 1:
        # Everything fits in one chunk: no loop, and the backward keeps this chunk's logits rather than recomputing
        # them (the same order of memory as the chunk itself).
        stats = tuple(x[None] for x in one_chunk(h_chunks[0], t_chunks[0]))
    else:
        rematerialised = jax.checkpoint(one_chunk)
        _, stats = jax.lax.scan(lambda carry, xs: (carry, rematerialised(*xs)), None, (h_chunks, t_chunks))
    stats = tuple(x.swapaxes(0, 1).reshape(b, -1)[:, :n] for x in stats)
    return tuple(x[0] for x in stats) if unbatched else stats
