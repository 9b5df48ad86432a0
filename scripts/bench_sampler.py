"""The engine's sampler program alone: us a call at B rows of a V-token vocabulary, in each
static mode, without LogitBias entries and with N of them a row (logit_bias, or min_tokens' ban
on the stop ids). What a request with logit_bias or min_tokens adds to its steps' sampling.

`--adjust` times a step's logit adjustments (16 LogitBias entries a row, penalties over a
history of H tokens, both) as the engine runs them, a program of their own before the sampler
(`Runner.step`), against the same in one sampler program: queued back to back, and synced
after each call as a step with penalties is.

`--blocks` times the sampler with each top-k block ($JAXINFER_TOP_K_BLOCK; 0: `jax.lax.top_k`
over whole rows, the form before the blockwise top-k), `--top-k` times `sampling.top_k` alone against
`jax.lax.top_k`, and `--prompt-tokens` the prompt logprobs of a step of T tokens.

    python scripts/bench_sampler.py --rows 1,64,256 --vocab 128256 --entries 16,300 --out bench/results/sampler-bias-<card>.json
    python scripts/bench_sampler.py --rows 64,256,512 --entries "" --blocks 0,64,128 --top-k 20,256 --prompt-tokens 1024 --out bench/results/sampler-topk-<card>.json
    python scripts/bench_sampler.py --rows 1,512 --entries "" --modes greedy,sample --adjust 8192 --out bench/results/sampler-adjust-<card>.json
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer import sampling
from jaxinfer.sampling import (
    SAMPLE_MODES,
    SamplingParams,
    logit_bias_arrays,
    sample_rows,
    sampling_arrays,
)


def _use_block(block: int) -> None:
    os.environ["JAXINFER_TOP_K_BLOCK"] = str(block)  # read when a program is traced


def _logits(b: int, v: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).normal(size=(b, v)), jnp.float32)


def _entries(rng, v: int, n: int) -> sampling.Entries:
    """A row's n LogitBias entries: -1 on n distinct ids, always live."""
    ids = rng.choice(v, n, replace=False).astype(np.int32)
    return ids, np.full(n, -1.0, np.float32), np.full(n, 2**31 - 1, np.int32)


def time_sampler(b: int, v: int, mode: str, entries: int, repeats: int, block: int = 0) -> float:
    """Median us a call; `entries` 0: no LogitBias (the program every other batch runs)."""
    rng = np.random.default_rng(0)
    logits = _logits(b, v)
    params = SamplingParams(temperature=0.0 if mode == "greedy" else 0.8, top_k=50, logprobs=5)
    arrays = jax.device_put(sampling_arrays([params] * b, range(b), [0] * b, b))
    bias = None
    if entries:
        bias = jax.device_put(logit_bias_arrays([_entries(rng, v, entries)] * b, b))
    _use_block(block)
    fn = jax.jit(functools.partial(sample_rows, mode=mode))
    seconds = bm.pipelined_time(
        lambda _: fn(logits, arrays, bias=bias), repeats=repeats, min_time=0.2
    )
    return seconds * 1e6


def time_adjusted(b: int, v: int, mode: str, what: str, history: int, repeats: int) -> dict:
    """Median us a call of the sampler with `what` ("bias", "penalties", "both"; "none": the
    logits twice, as a step without adjustments passes them) as one program ("fused") and as
    the engine's programs ("split"), pipelined and synced after each call."""
    rng = np.random.default_rng(0)
    logits = _logits(b, v)
    params = SamplingParams(
        temperature=0.0 if mode == "greedy" else 0.8,
        logprobs=5,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
    )
    arrays = jax.device_put(sampling_arrays([params] * b, range(b), [0] * b, b))
    bias = hist = is_out = None
    if what in ("bias", "both"):
        bias = jax.device_put(logit_bias_arrays([_entries(rng, v, 16)] * b, b))
    if what in ("penalties", "both"):
        ids = np.full((b, history), -1, np.int32)
        ids[:, : history // 2] = rng.integers(0, v, (b, history // 2))  # half full
        hist = jax.device_put(ids)
        is_out = jax.device_put(np.arange(history)[None].repeat(b, 0) >= history // 4)
    fused = jax.jit(functools.partial(sample_rows, mode=mode))
    add_bias = jax.jit(sampling.apply_logit_bias)
    penalize = jax.jit(sampling.apply_penalties)
    sample = jax.jit(functools.partial(sampling.sample_adjusted, mode=mode))

    def split():
        x = logits if bias is None else add_bias(logits, bias, arrays.step)
        x = x if hist is None else penalize(x, arrays, hist, is_out)
        return sample(logits, x, arrays)

    calls = {"fused": lambda: fused(logits, arrays, hist, is_out, bias=bias), "split": split}
    out = {}
    for name, call in calls.items():
        queued = functools.partial(lambda f, _: f(), call)
        synced = functools.partial(lambda f, _: jax.block_until_ready(f()), call)
        for tag, fn in (("", queued), ("_synced", synced)):
            us = bm.pipelined_time(fn, repeats=repeats, min_time=0.2) * 1e6
            out[f"{name}{tag}_us"] = round(us, 1)
    return out


def time_top_k(b: int, v: int, k: int, block: int, repeats: int) -> float:
    """Median us of `sampling.top_k` (block 0: `jax.lax.top_k`) over [b, v] float32."""
    x = _logits(b, v)
    fn = jax.jit(lambda x: sampling.top_k(x, k, block))  # block 0 takes lax.top_k itself
    return bm.pipelined_time(lambda _: fn(x), repeats=repeats, min_time=0.2) * 1e6


def time_prompt_logprobs(t: int, v: int, block: int, repeats: int) -> float:
    """Median us of `sampling.prompt_logprobs` over a step's [t, v] bf16 logits."""
    logits = _logits(t, v).astype(jnp.bfloat16)
    targets = jnp.arange(t, dtype=jnp.int32) % v
    _use_block(block)
    fn = jax.jit(functools.partial(sampling.prompt_logprobs))  # a new trace for each block
    return bm.pipelined_time(lambda _: fn(logits, targets), repeats=repeats, min_time=0.2) * 1e6


def check_top_k(v: int, ks: list[int]) -> None:
    """The blockwise top-k equals jax.lax.top_k on this backend, ties included."""
    rng = np.random.default_rng(1)
    for k in ks:
        for x in (rng.normal(size=(64, v)), rng.integers(0, 4, size=(64, v))):
            x = jnp.asarray(x, jnp.float32)
            want, got = jax.lax.top_k(x, k), sampling.top_k(x, k, sampling.TOP_K_BLOCK)
            for a, b in zip(want, got):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=bm.int_list, default=[1, 64, 256])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--entries", type=bm.int_list, default=[16, 300])
    p.add_argument("--modes", default=",".join(SAMPLE_MODES))
    p.add_argument("--blocks", type=bm.int_list, default=[sampling.TOP_K_BLOCK])
    p.add_argument("--top-k", type=bm.int_list, default=[], help="k to time top_k alone at")
    p.add_argument("--prompt-tokens", type=bm.int_list, default=[])
    p.add_argument(
        "--adjust", type=int, default=0, help="history tokens: time the adjustments (> 0)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {**bm.report_header(), "vocab": args.vocab, "results": []}

    def record(row: dict) -> None:
        print(row, flush=True)
        report["results"].append(row)
        if args.out:
            bm.write_json(args.out, report)

    if args.top_k:
        check_top_k(args.vocab, args.top_k)
        report["top_k_checked"] = args.top_k
    for b in args.rows:
        for mode in [m for m in args.modes.split(",") if m]:
            for block in args.blocks:
                row = {"rows": b, "mode": mode, "block": block}
                row["us_no_bias"] = round(
                    time_sampler(b, args.vocab, mode, 0, args.repeats, block), 1
                )
                for n in args.entries:
                    us = time_sampler(b, args.vocab, mode, n, args.repeats, block)
                    row[f"us_{n}_entries"] = round(us, 1)
                record(row)
        for mode in [m for m in args.modes.split(",") if m] if args.adjust else ():
            for what in ("none", "bias", "penalties", "both"):
                row = {"rows": b, "mode": mode, "adjust": what, "history": args.adjust}
                record({**row, **time_adjusted(b, args.vocab, mode, what, args.adjust, 5)})
        for k in args.top_k:
            for block in args.blocks:
                us = time_top_k(b, args.vocab, k, block, args.repeats)
                record({"rows": b, "top_k": k, "block": block, "us": round(us, 1)})
    for t in args.prompt_tokens:
        for block in args.blocks:
            us = time_prompt_logprobs(t, args.vocab, block, args.repeats)
            record({"prompt_tokens": t, "block": block, "us": round(us, 1)})
    os.environ.pop("JAXINFER_TOP_K_BLOCK", None)


if __name__ == "__main__":
    main()
