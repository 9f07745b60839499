"""Attention kernels of the Qwen3 decoder (`gopo_jax.models.qwen3`): one place that decides how q·k is computed.

Two situations, one function each:

* `self_attention` — no KV cache (training, scoring, reference pass). L queries attend causally by slot order to
  the valid keys among the same L slots. Dialogue buffers have pads in the MIDDLE (fixed-size slots per turn), so
  validity is not a length. Two implementations, picked by `resolve_implementation`:
    - "xla": `jax.nn.dot_product_attention(implementation="xla")` with the dense bool mask
      causal[L, L] & valid[B, 1, 1, L]; runs everywhere, fp32 included.
    - "cudnn": cuDNN flash attention. Its fused kernels know causal and per-row length (padding) masks; a dense
      bool mask is accepted only by turning it into an additive [B, 1, L, L] bias in the compute dtype (memory
      quadratic in L, a bias gradient kernel in training, and even-length constraints). Instead we PACK: a
      stable argsort moves every row's valid slots to the front in their original order, cuDNN runs with
      `is_causal=True` and `query_seq_lengths = key_value_seq_lengths = number of valid slots`
      (its PADDING_CAUSAL mask), and the outputs are scattered back to their slots. Causality by packed index
      equals causality by slot among valid tokens, and positions (RoPE was applied before) already skip pads, so
      valid slots get exactly the masked result; pad slots get garbage, as the model's contract allows.
      cuDNN needs a GPU and bf16/fp16 inputs; asking for it elsewhere is a clear error.
* `cached_attention` — with a KV cache (prefill, decode). Only slots `[0, index)` of the S-slot cache are
  written, so the prefix is read in blocks of `block` slots with an online (flash-style) softmax inside a
  `lax.fori_loop` whose trip count `ceil(index / block)` is traced: a decode step costs O(used prefix), not
  O(S). The L new keys/values (not yet in the cache; the caller writes them once after the layer scan) are the
  last block, with the causal mask among themselves. Scores and the softmax run in float32.
  This path is forward-only (a `fori_loop` with a traced trip count cannot be reverse-differentiated); nothing
  trains through the cache.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_implementation(name: str, dtype) -> str:
    """"xla" or "cudnn" for a config's `attention` field and compute dtype. "auto" is cuDNN only where it can
    run: a GPU backend and a half-precision compute dtype."""
    dtype = jnp.dtype(dtype)
    if name == "auto":
        return "cudnn" if jax.default_backend() == "gpu" and dtype in _CUDNN_DTYPES else "xla"
    if name == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention='cudnn' needs a GPU, but the JAX backend is {jax.default_backend()!r}; "
                             f"use attention='auto' (which picks 'xla' here) or 'xla'")
        if dtype not in _CUDNN_DTYPES:
            raise ValueError(f"attention='cudnn' needs a bfloat16/float16 compute dtype, got {dtype.name}; set "
                             f"dtype='bfloat16' or use attention='auto'/'xla'")
        return name
    if name == "xla":
        return name
    raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_valid: jax.Array, *, scale: float,
                   implementation: str) -> jax.Array:
    """[B, L, N, hd]: causal attention of q[B, L, N, hd] over k/v[B, L, K, hd] (N % K == 0, GQA), keys restricted
    to `token_valid[B, L]` slots. `implementation` is "xla" (dense mask) or "cudnn" (packed; see module doc)."""
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_shape(token_valid, q.shape[:2])
    if implementation == "xla":
        slot = jnp.arange(q.shape[1])
        mask = (slot[None, :] <= slot[:, None])[None, None] & token_valid[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    return packed_causal_attention(q, k, v, token_valid, scale=scale, implementation=implementation)


def packed_causal_attention(q, k, v, token_valid, *, scale: float, implementation: str) -> jax.Array:
    """Valid slots packed to the front, causal + length mask, unpacked again (what the cuDNN path runs; with
    implementation="xla" the same packing runs on any backend, which is how it is tested without a GPU)."""
    # Stable: valid slots keep their order (False sorts first, so sort on ~valid).
    order = jnp.argsort(~token_valid, axis=1, stable=True)  # [B, L] packed index -> slot
    unorder = jnp.argsort(order, axis=1)  # slot -> packed index
    lengths = jnp.sum(token_valid, axis=1, dtype=jnp.int32)

    def gather(x, idx):
        return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)

    out = jax.nn.dot_product_attention(
        gather(q, order), gather(k, order), gather(v, order), scale=scale, is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
    # Pad slots get 0 rather than whatever the kernel leaves past a row's length: a non-finite value there would
    # reach valid slots through 0 * nan in the next layer's p·v or in the backward pass.
    return jnp.where(token_valid[:, :, None, None], gather(out, unorder), 0)


def cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, new_valid: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, cache_valid: jax.Array, index: jax.Array, layer: jax.Array, *,
                     scale: float, block: int) -> jax.Array:
    """[B, L, N, hd]: queries at slots `index + [0, L)` over the valid written prefix of layer `layer` of the cache
    plus the L new keys (causal among themselves).

    q [B, L, N, hd]; k_new/v_new [B, L, K, hd] and new_valid bool[B, L] (the chunk being added);
    k_cache/v_cache [num_layers, B, S, K, hd] (the whole cache: reading blocks straight from it avoids copying a
    layer's S slots per step); cache_valid bool[B, S]; index: int32 scalar, slots [0, index) are written.
    """
    chex.assert_rank([q, k_new, v_new, k_cache, v_cache], [4, 4, 4, 5, 5])
    chex.assert_equal_shape([k_new, v_new])
    b, length, n_heads, hd = q.shape
    n_kv = k_new.shape[2]
    groups = n_heads // n_kv
    max_len = k_cache.shape[2]
    block = min(block, max_len)
    dtype = q.dtype
    # [B, K, G, L, hd]: query head n = kv head n // G (jax's and HF's GQA grouping).
    qg = jnp.transpose(q.reshape(b, length, n_kv, groups, hd), (0, 2, 3, 1, 4))

    def scores(keys):  # keys [B, s, K, hd] -> f32[B, K, G, L, s]
        return jnp.einsum("bkgld,bskd->bkgls", qg, keys.astype(dtype), preferred_element_type=jnp.float32) * scale

    def update(carry, s, keep, values):
        m, denom, acc = carry
        s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgls,bskd->bkgld", p.astype(dtype), values.astype(dtype),
                        preferred_element_type=jnp.float32)
        return m_new, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

    def prefix_block(i, carry):
        want = i * block
        # dynamic_slice clamps a start past S - block back to S - block; slots below `want` were already read
        # by the previous block, so they are masked out here rather than counted twice.
        start = jnp.minimum(want, max_len - block)
        zero = jnp.zeros((), jnp.int32)
        at = (layer, zero, start, zero, zero)
        size = (1, b, block, n_kv, hd)
        keys = jax.lax.dynamic_slice(k_cache, at, size)[0]
        values = jax.lax.dynamic_slice(v_cache, at, size)[0]
        slot = start + jnp.arange(block)
        key_valid = jax.lax.dynamic_slice(cache_valid, (zero, start), (b, block))
        keep = key_valid & (slot >= want)[None] & (slot < index)[None]  # [B, block]
        return update(carry, scores(keys), keep[:, None, None, None, :], values)

    # A finite floor for the running max keeps exp(m - m_new) at 1 (not nan) while a row has seen no key.
    init = (jnp.full((b, n_kv, groups, length), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((b, n_kv, groups, length), jnp.float32),
            jnp.zeros((b, n_kv, groups, length, hd), jnp.float32))
    num_blocks = (index + block - 1) // block
    carry = jax.lax.fori_loop(0, num_blocks, prefix_block, init)
    chunk = jnp.arange(length)
    keep_new = (chunk[None, :] <= chunk[:, None])[None] & new_valid[:, None, :]  # [B, L(query), L(key)]
    m, denom, acc = update(carry, scores(k_new), keep_new[:, None, None], v_new)
    # A query with no valid key at all (a pad before any valid token) gets 0; its output is ignored anyway.
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, length, n_heads, hd).astype(dtype)
