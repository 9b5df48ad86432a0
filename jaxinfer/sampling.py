"""A jitted per-row sampler: temperature, top-k, top-p; greedy where temperature is 0.

Every setting is an array with one value per row, so a new value never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ValueError naming the first out-of-range setting."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: Float[Array, "B V"], key: Array, temperature: Float[Array, "B"],
           top_k: Int[Array, "B"], top_p: Float[Array, "B"]) -> Int[Array, "B"]:
    """One token per row. Rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(
        jnp.all(temperature == 0),
        lambda: greedy,  # skip the sort when nobody samples
        lambda: jnp.where(temperature == 0, greedy,
                          _sample_filtered(logits, key, temperature, top_k, top_p)),
    )


def _sample_filtered(logits, key, temperature, top_k, top_p) -> Int[Array, "B"]:
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V], most likely first
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = rank < jnp.where(top_k > 0, top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < top_p[:, None])
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
