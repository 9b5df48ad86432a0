"""The engine's sampler program alone: us a call at B rows of a V-token vocabulary, in each
static mode, without LogitBias entries and with N of them a row (logit_bias, or min_tokens' ban
on the stop ids). What a request with logit_bias or min_tokens adds to its steps' sampling.

`--blocks` times the sampler with each top-k block ($JAXINFER_TOP_K_BLOCK; 0: `jax.lax.top_k`
over whole rows, the form before the blockwise top-k), `--top-k` times `sampling.top_k` alone against
`jax.lax.top_k`, and `--prompt-tokens` the prompt logprobs of a step of T tokens.

    python scripts/bench_sampler.py --rows 1,64,256 --vocab 128256 --entries 16,300 --out bench/results/sampler-bias-<card>.json
    python scripts/bench_sampler.py --rows 64,256,512 --entries "" --blocks 0,64,128 --top-k 20,256 --prompt-tokens 1024 --out bench/results/sampler-topk-<card>.json
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


def time_sampler(b: int, v: int, mode: str, entries: int, repeats: int, block: int = 0) -> float:
    """Median us a call; `entries` 0: no LogitBias (the program every other batch runs)."""
    rng = np.random.default_rng(0)
    logits = _logits(b, v)
    params = SamplingParams(temperature=0.0 if mode == "greedy" else 0.8, top_k=50, logprobs=5)
    arrays = jax.device_put(sampling_arrays([params] * b, range(b), [0] * b, b))
    bias = None
    if entries:
        rows = [[(int(t), -1.0, 2**31 - 1) for t in rng.choice(v, entries, replace=False)]] * b
        bias = jax.device_put(logit_bias_arrays(rows, b))
    _use_block(block)
    fn = jax.jit(functools.partial(sample_rows, mode=mode))
    seconds = bm.pipelined_time(
        lambda _: fn(logits, arrays, bias=bias), repeats=repeats, min_time=0.2
    )
    return seconds * 1e6


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
