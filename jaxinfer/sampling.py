"""A jitted per-row sampler: temperature, top-k, top-p; greedy where temperature is 0.

Every setting is an array with one value per row, so a new value never recompiles.
"""

from __future__ import annotations

import dataclasses

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


# ---------------------------------------------------------------------------------------------
# Per-request sampling for the engine


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. Invalid values raise ValueError naming the field.

    temperature 0 is greedy; top_k 0 and top_p 1 and min_p 0 are off; penalties follow vLLM:
    repetition_penalty (> 0, 1 = off) over prompt and output tokens, presence/frequency penalties
    (in [-2, 2]) over output tokens. `seed` makes the request's samples independent of its batch.
    `logprobs` = n returns the top-n log-probabilities (raw model distribution) of every new token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int(self, "max_tokens", 1)
        check_sampling(self.temperature, self.top_k, self.top_p)
        _check_range(self, "min_p", 0.0, 1.0)
        _check_range(self, "presence_penalty", -2.0, 2.0)
        _check_range(self, "frequency_penalty", -2.0, 2.0)
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None:
            _check_int(self, "seed", 0)
        if self.logprobs is not None:
            _check_int(self, "logprobs", 0, MAX_LOGPROBS)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")


MAX_LOGPROBS = 20  # top-n logprobs computed on device for every row; a request takes its n


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(params, name: str, low: int, high: int | None = None) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or \
            (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _check_range(params, name: str, low: float, high: float) -> None:
    value = getattr(params, name)
    if not (_is_number(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
