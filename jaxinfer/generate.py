"""The jitted static-batch `generate()`: prefill + a `lax.while_loop` of decode steps, one program.

Prompts of different lengths sit right-padded in one [B, T] block at their true positions, so
row b's first new token goes to slot len_b; every row then advances one slot per step. Junk that
padding writes past len_b is overwritten before any query can see it (a query at p sees s <= p).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxinfer.model import Model
from jaxinfer.models.llama import Decoder, init_cache
from jaxinfer.platform import use_compilation_cache
from jaxinfer.sampling import (
    SamplingArrays,
    SamplingParams,
    sample_rows,
    sampler_mode,
    sampling_arrays,
)
from jaxinfer.validate import as_int, as_sequence, as_token_ids

PAD = -1  # marks the slots of `out` after a row has stopped


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prefill(decoder: Decoder, params, cache, tokens: Int[Array, "B T"], lengths: Int[Array, "B"]):
    """Runs the prompts through an empty cache; returns last-prompt-token logits [B, V] and the cache.
    The padding past each row's length gets no expert work in an MoE model."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = decoder.apply(
        {"params": params},
        tokens,
        positions,
        cache,
        prefill=True,
        logits_at=lengths - 1,
        valid=positions < lengths[:, None],
    )
    return logits[:, 0], cache


def decode_step(
    decoder: Decoder, params, cache, tokens: Int[Array, "B"], positions: Int[Array, "B"]
):
    """One new token per row at `positions`; returns its logits [B, V] and the cache."""
    logits, cache = decoder.apply({"params": params}, tokens[:, None], positions[:, None], cache)
    return logits[:, 0], cache


def sample_step(
    logits: Float[Array, "B V"], arrays: SamplingArrays, step, mode: str, mesh=None
) -> Int[Array, "B"]:
    """The engine's per-row sampler at new-token index `step` (row b draws from its own seed),
    in a static mode (`sampling.sample_mode`): no on-device branch for the host to wait on.
    `mesh`: the one the logits' vocab is split over, if any."""
    arrays = arrays._replace(step=jnp.full_like(arrays.step, step))
    return sample_rows(logits, arrays, mode=mode, mesh=mesh).tokens


@functools.partial(
    jax.jit, static_argnames=("decoder", "out_len", "mode"), donate_argnames=("cache",)
)
def generate_arrays(
    decoder: Decoder,
    params,
    cache,
    tokens: Int[Array, "B T"],
    lengths: Int[Array, "B"],
    max_new: Int[Array, ""],
    eos: Int[Array, "E"],
    sampling: SamplingArrays,
    out_len: int,
    mode: str,
):
    """The one jitted program of `generate` on padded arrays (benchmarks time it directly).

    tokens [B, T] right-padded prompts of `lengths` [B] tokens; cache from `init_cache` (donated);
    decodes while step < `max_new` and some row has not produced an `eos` [E] id; `sampling` and
    static `mode` as from `row_sampling`. Returns out [B, out_len] (new tokens, PAD after a row
    stopped) and the cache.
    """
    logits, cache = prefill(decoder, params, cache, tokens, lengths)
    mesh = decoder.parallel.mesh
    first = sample_step(logits, sampling, 0, mode, mesh)
    out = jnp.full((tokens.shape[0], out_len), PAD, jnp.int32).at[:, 0].set(first)  # [B, out_len]
    done = jnp.isin(first, eos)

    def cond(state):
        _, _, _, _, done, step = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        cache, out, token, pos, done, step = state
        logits, cache = decode_step(decoder, params, cache, token, pos)
        token = sample_step(logits, sampling, step, mode, mesh)
        out = out.at[:, step].set(jnp.where(done, PAD, token))
        return cache, out, token, pos + 1, done | jnp.isin(token, eos), step + 1

    state = (cache, out, first, lengths, done, jnp.int32(1))
    cache, out, *_ = jax.lax.while_loop(cond, body, state)
    return out, cache  # returning the cache lets it alias the donated input: no copy


def row_sampling(
    batch: int, temperature: float, top_k: int, top_p: float, seed: int
) -> tuple[SamplingArrays, str]:
    """Per-row settings for `generate`/`stream` and the sampler's static mode. Row 0 draws from
    `seed` itself, as an engine request with SamplingParams(seed=seed) does (so one prompt
    samples the same tokens either way); row b > 0 from a seed derived from (seed, b) alone.
    Every value is checked (ValueError naming it)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    seed = as_int("seed", seed, 0)
    derived = [int(np.random.SeedSequence([seed, b]).generate_state(1)[0]) for b in range(batch)]
    seeds = [seed, *derived[1:]]
    arrays = sampling_arrays([params] * batch, seeds, [0] * batch, batch)
    return jax.tree.map(jnp.asarray, arrays), sampler_mode([params])


def check_prompts(model: Model, prompts, max_new_tokens: int) -> list[list[int]]:
    """Validates a batch of token-id prompts against the model; returns them as lists of ints."""
    cfg = model.config
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1)
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)  # a [B, T] block of equal-length prompts
    prompts = as_sequence("prompts", prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = as_token_ids(f"prompt {i}", prompt, vocab_size=cfg.vocab_size)
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the model's context of {cfg.max_position_embeddings} tokens"
            )
        checked.append(ids)
    return checked


def bucket_lengths(model: Model, longest: int, max_new_tokens: int) -> tuple[int, int]:
    """Padded prompt length T and cache length S of a `generate` call, rounded so that few
    shapes get compiled."""
    t = round_up(longest, 64)
    s = min(round_up(t + max_new_tokens, 256), round_up(model.config.max_position_embeddings, 64))
    return t, round_up(max(s, t, longest + max_new_tokens), 64)  # whole pages of 64


def _stop_ids(model: Model, stop_token_ids) -> np.ndarray:
    ids = set(model.config.eos_token_ids) | set(
        as_token_ids(
            "stop_token_ids", stop_token_ids, allow_empty=True, vocab_size=model.config.vocab_size
        )
    )
    return np.asarray(sorted(ids) or [PAD - 1], np.int32)  # a sentinel no token equals


def generate(
    model: Model,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    impl: str | None = None,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` after each prompt in one jitted program.

    Args:
      prompts: token-id lists of any lengths (each >= 1 token).
      temperature: 0 = greedy; top_k 0 = off; top_p in (0, 1].
      stop_token_ids: stop ids beside the model's own EOS ids.
    Returns:
      Each prompt's new tokens, ending with the stop token when one was produced.
    """
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1)
    prompts = check_prompts(model, prompts, max_new_tokens)
    use_compilation_cache()
    sampling, mode = row_sampling(len(prompts), temperature, top_k, top_p, seed)
    batch, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
    t, s = bucket_lengths(model, int(lengths.max()), max_new_tokens)
    tokens = np.zeros((batch, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cache = init_cache(model.config, batch, s, model.dtype, model.parallel)
    out, _ = generate_arrays(
        model.decoder(impl),
        model.params,
        cache,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.int32(max_new_tokens),
        jnp.asarray(_stop_ids(model, stop_token_ids)),
        sampling,
        out_len=round_up(max_new_tokens, 32),
        mode=mode,
    )
    return [_trim(row[:max_new_tokens]) for row in np.asarray(out)]


def _trim(row: np.ndarray) -> list[int]:
    stop = np.flatnonzero(row == PAD)
    return row[: stop[0] if stop.size else len(row)].tolist()


# The host-driven steps of `stream` (benchmarks time prefill_jit alone: one prompt's prefill).
prefill_jit = jax.jit(prefill, static_argnames=("decoder",), donate_argnames=("cache",))
_decode_jit = jax.jit(decode_step, static_argnames=("decoder",), donate_argnames=("cache",))
_sample_jit = jax.jit(sample_step, static_argnames=("mode", "mesh"))


def stream(
    model: Model,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    impl: str | None = None,
) -> Iterator[int]:
    """Yields one prompt's new tokens as they are made (the same steps as `generate`, host-driven)."""
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1)
    (ids,) = check_prompts(model, [prompt], max_new_tokens)
    use_compilation_cache()
    sampling, mode = row_sampling(1, temperature, top_k, top_p, seed)
    stop = set(_stop_ids(model, stop_token_ids).tolist())
    t, s = bucket_lengths(model, len(ids), max_new_tokens)
    tokens = jnp.asarray(np.pad(np.asarray([ids], np.int32), ((0, 0), (0, t - len(ids)))))
    decoder = model.decoder(impl)
    cache = init_cache(model.config, 1, s, model.dtype, model.parallel)
    logits, cache = prefill_jit(
        decoder, model.params, cache, tokens, jnp.asarray([len(ids)], jnp.int32)
    )
    for step in range(max_new_tokens):
        token = _sample_jit(logits, sampling, step, mode, model.parallel.mesh)
        value = int(token[0])
        yield value
        if value in stop or step == max_new_tokens - 1:
            return
        logits, cache = _decode_jit(
            decoder, model.params, cache, token, jnp.asarray([len(ids) + step], jnp.int32)
        )
