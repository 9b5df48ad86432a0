"""The engine's sampler program alone: us a call at B rows of a V-token vocabulary, in each
static mode, without LogitBias entries and with N of them a row (logit_bias, or min_tokens' ban
on the stop ids). What a request with logit_bias or min_tokens adds to its steps' sampling.

    python scripts/bench_sampler.py --rows 1,64,256 --vocab 128256 --entries 16,300 --out bench/results/sampler-bias-<card>.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer.sampling import (
    SAMPLE_MODES,
    SamplingParams,
    logit_bias_arrays,
    sample_rows,
    sampling_arrays,
)


def time_sampler(b: int, v: int, mode: str, entries: int, repeats: int) -> float:
    """Median us a call; `entries` 0: no LogitBias (the program every other batch runs)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(b, v)), jnp.float32)
    params = SamplingParams(temperature=0.0 if mode == "greedy" else 0.8, top_k=50, logprobs=5)
    arrays = jax.device_put(sampling_arrays([params] * b, range(b), [0] * b, b))
    bias = None
    if entries:
        rows = [[(int(t), -1.0, 2**31 - 1) for t in rng.choice(v, entries, replace=False)]] * b
        bias = jax.device_put(logit_bias_arrays(rows, b))
    fn = jax.jit(functools.partial(sample_rows, mode=mode))
    seconds = bm.pipelined_time(
        lambda _: fn(logits, arrays, bias=bias), repeats=repeats, min_time=0.2
    )
    return seconds * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=bm.int_list, default=[1, 64, 256])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--entries", type=bm.int_list, default=[16, 300])
    p.add_argument("--modes", default=",".join(SAMPLE_MODES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {**bm.report_header(), "vocab": args.vocab, "results": []}
    for b in args.rows:
        for mode in args.modes.split(","):
            base = time_sampler(b, args.vocab, mode, 0, args.repeats)
            row = {"rows": b, "mode": mode, "us_no_bias": round(base, 1)}
            for n in args.entries:
                row[f"us_{n}_entries"] = round(
                    time_sampler(b, args.vocab, mode, n, args.repeats), 1
                )
            print(row, flush=True)
            report["results"].append(row)
            if args.out:
                bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
