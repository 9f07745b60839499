"""gopo_jax.models.heads: used-rows logits and the chunked log-prob/entropy head, against the full-vocabulary
computation (values and gradients), plus the memory bound that is the reason the chunked head exists."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.models import heads


def _naive_log_probs_and_entropy(h, embedding, targets):
    logp_all = jax.nn.log_softmax(jnp.dot(h, embedding.T).astype(jnp.float32), axis=-1)  # [N, V]
    logp = jnp.take_along_axis(logp_all, targets[:, None], axis=-1)[:, 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _inputs(n, v, d, seed=0):
    kh, ke, kt = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kh, (n, d), jnp.float32), 0.5 * jax.random.normal(ke, (v, d), jnp.float32),
            jax.random.randint(kt, (n,), 0, v))


class HeadsTest(chex.TestCase):

    @chex.all_variants
    def test_row_logits_equal_selected_columns_of_full_logits(self):
        h, emb, _ = _inputs(12, 40, 8)
        h = h.reshape(3, 4, 8)
        ids = jnp.asarray([7, 0, 39, 7])
        got = self.variant(heads.row_logits)(h, emb, ids)
        assert got.dtype == jnp.float32 and got.shape == (3, 4, 4)
        np.testing.assert_allclose(got, jnp.einsum("btd,vd->btv", h, emb)[..., ids], rtol=1e-5, atol=1e-5)

    @chex.all_variants
    def test_row_logits_bf16_matmul_fp32_result(self):
        h, emb, _ = _inputs(5, 16, 8)
        got = self.variant(heads.row_logits)(h.astype(jnp.bfloat16), emb, jnp.asarray([1, 2]))
        assert got.dtype == jnp.float32
        ref = jnp.dot(h.astype(jnp.bfloat16), emb.astype(jnp.bfloat16)[jnp.asarray([1, 2])].T).astype(jnp.float32)
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)  # bf16 rounding: jit may fuse differently

    @chex.all_variants
    def test_chunked_equals_full_log_softmax(self):
        # N = 37 is not a multiple of the chunk: the padding rows must not leak into the result.
        h, emb, targets = _inputs(37, 50, 16)
        for chunk in (1, 8, 37, 64):
            logp, ent = self.variant(lambda a, b, c, n=chunk: heads.token_log_probs_and_entropy(a, b, c, chunk=n))(
                h, emb, targets)
            ref_logp, ref_ent = _naive_log_probs_and_entropy(h, emb, targets)
            np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=1e-5, err_msg=f"chunk={chunk}")
            np.testing.assert_allclose(ent, ref_ent, atol=1e-5, rtol=1e-5, err_msg=f"chunk={chunk}")
            logp2, argmax = self.variant(lambda a, b, c, n=chunk: heads.token_log_probs_and_argmax(a, b, c, chunk=n))(
                h, emb, targets)
            np.testing.assert_allclose(logp2, ref_logp, atol=1e-5, rtol=1e-5, err_msg=f"chunk={chunk}")
            np.testing.assert_array_equal(argmax, jnp.argmax(jnp.dot(h, emb.T), axis=-1))

    @chex.all_variants
    def test_chunked_gradients_equal_full_log_softmax(self):
        h, emb, targets = _inputs(21, 30, 8, seed=1)
        w_lp, w_ent = jax.random.normal(jax.random.key(5), (2, 21))

        def objective(fn):
            def f(h, emb):
                logp, ent = fn(h, emb, targets)
                return jnp.sum(w_lp * logp) + jnp.sum(w_ent * ent)
            return f

        chunked = objective(lambda a, b, c: heads.token_log_probs_and_entropy(a, b, c, chunk=4))
        got = self.variant(jax.grad(chunked, argnums=(0, 1)))(h, emb)
        ref = jax.grad(objective(_naive_log_probs_and_entropy), argnums=(0, 1))(h, emb)
        for g, r, name in zip(got, ref, ("h", "embedding")):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)


def _forward_backward_temp_bytes(fn, h, emb, targets):
    def loss(h, emb, targets):
        logp, ent = fn(h, emb, targets)
        return jnp.sum(logp) + jnp.sum(ent)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, emb, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_forward_backward_never_holds_n_by_v():
    n, v, d, chunk = 4096, 8192, 32, 256
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    emb = jax.ShapeDtypeStruct((v, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)
    full = n * v * 4  # one fp32 [N, V] buffer: 128 MiB
    chunked = _forward_backward_temp_bytes(
        lambda a, b, c: heads.token_log_probs_and_entropy(a, b, c, chunk=chunk), h, emb, targets)
    naive = _forward_backward_temp_bytes(_naive_log_probs_and_entropy, h, emb, targets)
    # The check can fail: the naive head holds [N, V] (and more) in its backward pass.
    assert naive >= full, naive
    # A few [chunk, V] buffers (logits, probabilities and their cotangents), whatever N is.
    assert chunked <= 5 * chunk * v * 4 < full // 3, (chunked, full)
