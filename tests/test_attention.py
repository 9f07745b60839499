"""Tests for gopo_jax.models.attention against a float64 numpy reference: the dense XLA path, the packed path the
cuDNN kernel runs (here through XLA: no GPU on CI), the blocked prefix attention of the KV cache, and the choice
of implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.models import attention

N_HEADS, N_KV, HD = 4, 2, 8  # GQA: two query heads per kv head
SCALE = HD ** -0.5


def _reference(q, k, v, mask):
    """float64 softmax attention. q [B, T, N, hd], k/v [B, S, K, hd], mask bool[B, T, S]; rows without a key -> nan."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # query head n uses kv head n // groups
    s = np.einsum("btnd,bsnd->bnts", q, k) * SCALE
    s = np.where(mask[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)


def _qkv(rng, b, t, s):
    return (rng.normal(size=(b, t, N_HEADS, HD)).astype(np.float32),
            rng.normal(size=(b, s, N_KV, HD)).astype(np.float32),
            rng.normal(size=(b, s, N_KV, HD)).astype(np.float32))


# Pads in the middle, leading pads, a row that is almost all pads.
VALID = np.array([[1, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                  [0, 0, 0, 1, 1, 0, 1, 1, 1, 1],
                  [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]], bool)


def _self_mask(valid):
    slot = np.arange(valid.shape[1])
    return (slot[None, :] <= slot[:, None])[None] & valid[:, None, :]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_self_attention_matches_reference_on_valid_slots(packed):
    q, k, v = _qkv(np.random.default_rng(0), *VALID.shape, VALID.shape[1])
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(VALID))
    if packed:  # the cuDNN path's packing, run through XLA
        out = attention.packed_causal_attention(*args, scale=SCALE, implementation="xla")
    else:
        out = attention.self_attention(*args, scale=SCALE, implementation="xla")
    out = np.asarray(out)
    assert np.isfinite(out).all()  # pad queries give numbers (ignored by callers)
    want = _reference(q, k, v, _self_mask(VALID))
    np.testing.assert_allclose(out[VALID], want[VALID], atol=1e-5, rtol=0)


def test_packed_gradients_match_dense_on_valid_slots():
    q, k, v = (jnp.asarray(a) for a in _qkv(np.random.default_rng(1), *VALID.shape, VALID.shape[1]))
    valid = jnp.asarray(VALID)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v, valid, scale=SCALE, implementation="xla")
            return jnp.sum(jnp.where(valid[:, :, None, None], out * weights, 0.0))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    dense, packed = loss(attention.self_attention), loss(attention.packed_causal_attention)
    for a, b in zip(dense, packed):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def _cache_case(seed, *, b=3, max_len=20, index=9, length=3, layers=2):
    """A cache with `index` written slots (random validity, row 2 mostly pads) and a chunk of `length` new tokens."""
    rng = np.random.default_rng(seed)
    k_cache = rng.normal(size=(layers, b, max_len, N_KV, HD)).astype(np.float32)
    v_cache = rng.normal(size=(layers, b, max_len, N_KV, HD)).astype(np.float32)
    cache_valid = rng.random((b, max_len)) < 0.7
    cache_valid[2] = False
    cache_valid[2, :index:5] = True  # a few valid keys among many pads
    cache_valid[:, index:] = False  # nothing written there yet
    q, k_new, v_new = _qkv(rng, b, length, length)
    new_valid = rng.random((b, length)) < 0.7
    new_valid[:, -1] = True
    return q, k_new, v_new, new_valid, k_cache, v_cache, cache_valid


def _cached_reference(q, k_new, v_new, new_valid, k_cache, v_cache, cache_valid, index, layer):
    """Dense: write the chunk into the cache at `index`, attend to every valid slot s <= index + i."""
    length = q.shape[1]
    k_all, v_all, valid = k_cache[layer].copy(), v_cache[layer].copy(), cache_valid.copy()
    k_all[:, index:index + length], v_all[:, index:index + length] = k_new, v_new
    valid[:, index:index + length] = new_valid
    slot = np.arange(k_all.shape[1])
    mask = (slot[None, :] <= index + np.arange(length)[:, None])[None] & valid[:, None, :]
    return _reference(q, k_all, v_all, mask), mask.any(-1)


@pytest.mark.parametrize("index,length,block", [
    (9, 1, 4),    # decode step, blocks dividing the cache
    (9, 3, 4),    # a chunk of L > 1
    (9, 3, 6),    # block not dividing S (20)
    (19, 1, 6),   # ... and the 4th block, past S - block, is clamped to slots 14..19 and overlaps the 3rd
    (0, 4, 4),    # prefill: no prefix at all
    (12, 2, 64),  # block larger than the cache
])
def test_cached_attention_matches_dense(index, length, block):
    case = _cache_case(index * 10 + length, index=index, length=length)
    layer = 1
    out = attention.cached_attention(*(jnp.asarray(a) for a in case), jnp.asarray(index, jnp.int32),
                                     jnp.asarray(layer, jnp.int32), scale=SCALE, block=block)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    want, has_key = _cached_reference(*case, index, layer)
    np.testing.assert_allclose(out[has_key], want[has_key], atol=1e-5, rtol=0)


def test_cached_attention_reads_only_the_used_prefix():
    index, block = 9, 4
    q, k_new, v_new, new_valid, k_cache, v_cache, cache_valid = _cache_case(3, index=index, length=1)
    used = -(-index // block) * block  # slots of the blocks the loop visits
    poisoned_k, poisoned_v = k_cache.copy(), v_cache.copy()
    poisoned_k[:, :, used:], poisoned_v[:, :, used:] = np.nan, np.nan
    run = jax.jit(lambda kc, vc, index: attention.cached_attention(
        jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(new_valid), kc, vc,
        jnp.asarray(cache_valid), index, jnp.int32(0), scale=SCALE, block=block))
    clean = np.asarray(run(k_cache, v_cache, jnp.int32(index)))
    poisoned = np.asarray(run(poisoned_k, poisoned_v, jnp.int32(index)))  # same compiled code, traced index
    np.testing.assert_array_equal(clean, poisoned)


def test_auto_picks_xla_without_a_gpu_and_cudnn_is_refused_here():
    if jax.default_backend() == "gpu":
        pytest.skip("CPU-only behaviour")
    for dtype in ("float32", "bfloat16"):
        assert attention.resolve_implementation("auto", dtype) == "xla"
        assert attention.resolve_implementation("xla", dtype) == "xla"
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU.*'auto'"):
        attention.resolve_implementation("cudnn", "bfloat16")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.resolve_implementation("flash", "bfloat16")
