"""The one dispatch point between the model and its attention implementations.

`impl` picks the implementation: "xla" (plain einsums, softmax in f32), "reference" (the same in
f32 throughout, the yardstick), "cudnn" (prefill through `jax.nn.dot_product_attention`) and
"pallas" (the kernels in `pallas_kernels/`). Grouped-query attention never repeats K/V: the
N query heads are viewed as [K, G].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

IMPLS = ("xla", "reference", "cudnn", "pallas")


def default_impl() -> str:
    return "xla" if jax.default_backend() == "cpu" else "cudnn"


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return impl


def causal_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"],
                     v: Float[Array, "B T K H"], *, impl: str) -> Float[Array, "B T N H"]:
    """Causal self-attention over the T tokens given (prefill, or a forward with no cache)."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention
        return flash_attention(q, k, v, causal=True)
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None]  # [1, T, S]
    return masked_attention(q, k, v, mask, reference=impl == "reference")


def cached_attention(q: Float[Array, "B T N H"], k_cache: Float[Array, "B S K H"],
                     v_cache: Float[Array, "B S K H"], q_positions: Int[Array, "B T"], *,
                     impl: str) -> Float[Array, "B T N H"]:
    """Attention of new tokens over a contiguous cache; key s is visible to a query at p iff s <= p."""
    s = k_cache.shape[1]
    mask = jnp.arange(s)[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
    return masked_attention(q, k_cache, v_cache, mask, reference=impl == "reference")


def masked_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"],
                     v: Float[Array, "B S K H"], mask: Bool[Array, "B T S"], *,
                     reference: bool = False) -> Float[Array, "B T N H"]:
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    dtype = q.dtype
    if reference:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(dtype)
