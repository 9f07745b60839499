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


# --- EditedEmbedding: a table with a few rows replaced (a LoRA model's trained marker rows) ---

EDITED_IDS = (29, 3, 11)


def _edited(v, d, seed=2):
    _, table, _ = _inputs(1, v, d, seed=seed)
    rows = jax.random.normal(jax.random.key(seed + 1), (len(EDITED_IDS), d))
    return heads.EditedEmbedding(table=table, rows=rows, row_ids=EDITED_IDS)


class EditedEmbeddingTest(chex.TestCase):
    """Every head gives on an EditedEmbedding what it gives on the edited table itself (`dense`)."""

    def test_dense_and_unedited(self):
        e = _edited(30, 8)
        dense = e.dense()
        np.testing.assert_array_equal(dense[np.asarray(EDITED_IDS)], e.rows)
        others = np.setdiff1d(np.arange(30), EDITED_IDS)
        np.testing.assert_array_equal(dense[others], e.table[others])
        plain = heads.EditedEmbedding.unedited(e.table)
        assert plain.row_ids == () and plain.dense() is e.table

    @chex.all_variants
    def test_replace_rows(self):
        table = jnp.arange(12.0).reshape(6, 2)
        rows = -jnp.arange(4.0).reshape(2, 2) - 1
        ids = jnp.asarray([[5, 0, 2], [2, 2, 1]])
        got = self.variant(lambda v, i, r: heads.replace_rows(v, i, (2, 5), r))(table[ids], ids, rows)
        np.testing.assert_array_equal(got, table.at[jnp.asarray([2, 5])].set(rows)[ids])

    @chex.all_variants
    def test_heads_equal_the_dense_table(self):
        e = _edited(30, 8)
        h, _, targets = _inputs(21, 30, 8, seed=4)
        targets = targets.at[:3].set(jnp.asarray(EDITED_IDS))  # edited rows as targets too
        dense = e.dense()
        ids = jnp.asarray([3, 0, 29, 3, 12])
        np.testing.assert_allclose(self.variant(heads.row_logits)(h, e, ids), heads.row_logits(h, dense, ids),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(self.variant(heads.all_logits)(h, e), jnp.dot(h, dense.T), rtol=1e-5, atol=1e-5)
        for chunk in (4, 64):
            got = self.variant(lambda a, b, c, n=chunk: heads.token_log_probs_and_entropy(a, b, c, chunk=n))(
                h, e, targets)
            want = _naive_log_probs_and_entropy(h, dense, targets)
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
            _, argmax = self.variant(lambda a, b, c, n=chunk: heads.token_log_probs_and_argmax(a, b, c, chunk=n))(
                h, e, targets)
            np.testing.assert_array_equal(argmax, jnp.argmax(jnp.dot(h, dense.T), axis=-1))

    @chex.all_variants
    def test_gradients_equal_the_dense_table(self):
        e = _edited(30, 8)
        h, _, targets = _inputs(21, 30, 8, seed=5)
        ids = jnp.asarray(EDITED_IDS[:2] + (7,))

        def objective(embedding_of):
            def f(h, table, rows):
                embedding = embedding_of(heads.EditedEmbedding(table=table, rows=rows, row_ids=EDITED_IDS))
                logp, ent = heads.token_log_probs_and_entropy(h, embedding, targets, chunk=4)
                return jnp.sum(logp) + 0.3 * jnp.sum(ent) + jnp.sum(heads.row_logits(h, embedding, ids) ** 2)
            return f

        got = self.variant(jax.grad(objective(lambda x: x), argnums=(0, 1, 2)))(h, e.table, e.rows)
        want = jax.grad(objective(heads.EditedEmbedding.dense), argnums=(0, 1, 2))(h, e.table, e.rows)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)  # replaced table rows take none


def test_edited_head_backward_has_no_table_gradient():
    """The reason heads take an EditedEmbedding: with the table frozen, the backward pass of the chunked head costs
    what the unedited head's does, while going through the dense edited table adds its full [V, D] gradient."""
    n, v, d, chunk = 1024, 8192, 256, 256
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    table = jax.ShapeDtypeStruct((v, d), jnp.float32)
    rows = jax.ShapeDtypeStruct((len(EDITED_IDS), d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(embedding_of):
        def loss(h, table, rows, targets):
            logp, ent = heads.token_log_probs_and_entropy(h, embedding_of(table, rows), targets, chunk=chunk)
            return jnp.sum(logp) + jnp.sum(ent)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(h, table, rows, targets).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda t, r: t)
    edited = temp_bytes(lambda t, r: heads.EditedEmbedding(table=t, rows=r, row_ids=EDITED_IDS))
    dense = temp_bytes(lambda t, r: heads.EditedEmbedding(table=t, rows=r, row_ids=EDITED_IDS).dense())
    table_bytes = v * d * 4
    print(f"temp bytes: plain {plain / 1e6:.1f} MB, edited {edited / 1e6:.1f} MB, dense {dense / 1e6:.1f} MB")
    assert edited < plain + table_bytes // 4, (edited, plain)
    assert dense >= plain + table_bytes, (dense, plain)
