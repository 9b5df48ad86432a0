"""The model's paged-attention dispatch: a mixed step (decodes beside prefill chunks) through the
Pallas kernels, split between the decode and the ragged kernel, and through the chunked XLA path,
equals the reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import PagedMeta, paged_attention


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_mixed_step_splits_decodes_from_chunks(impl):
    rng = np.random.default_rng(0)
    kv_heads, heads, head_dim, page, num_pages = 2, 8, 64, 16, 32
    # decodes, a prefill chunk, a one-token chunk after it, another chunk, then 2 padding rows
    kv_lens = np.array([37, 5, 60, 21, 16, 0, 0], np.int32)
    q_lens = np.array([1, 1, 12, 1, 16, 0, 0], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = 48  # bucket: 17 padding tokens past cu[-1] = 31 (the XLA path runs 3 chunks of 16)
    tables = rng.permutation(num_pages)[: 7 * 4].reshape(7, 4).astype(np.int32)
    slots = np.full(t, -1, np.int32)
    for b in range(7):
        pos = np.arange(kv_lens[b] - q_lens[b], kv_lens[b])
        slots[cu[b] : cu[b + 1]] = tables[b, pos // page] * page + pos % page
    meta = PagedMeta(jnp.asarray(slots), jnp.asarray(tables), jnp.asarray(kv_lens), jnp.asarray(cu))
    shape = (kv_heads, num_pages, page, head_dim)
    pools = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)]
    q = jnp.asarray(rng.standard_normal((t, heads, head_dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((t, kv_heads, head_dim)), jnp.float32) for _ in range(2)
    )
    out, (kp, vp) = paged_attention(q, k, v, *pools, meta, impl=impl)
    ref, (kp_ref, vp_ref) = paged_attention(q, k, v, *pools, meta, impl="reference")
    np.testing.assert_array_equal(np.asarray(kp), np.asarray(kp_ref))
    live = slice(0, cu[-1])
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(ref)[live], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    if impl == "xla":  # padding tokens give 0
        assert (np.asarray(out)[cu[-1] :] == 0).all()
