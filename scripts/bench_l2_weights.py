"""What a decode matmul gains when its weight is already in L2: the bound on prefetching a weight
(o's 33.5 MB is the only Llama-3-8B weight that fits the 50 MB L2 of an H100 / H200) while the
kernel before it streams. A chain of `sets` dependent `x @ W` (each call's x the output before,
as o follows the attention in a step), [M, 4096] x [4096, 4096] bf16 through cuBLAS (as the
engine compiles its decode programs), time per call: over distinct weights (read from HBM, as a
decode step reads them) against one weight for every call (after the first, from L2), beside
the weight-read floor at the card's read bandwidth. A dependent chain, so that XLA can't merge
the dots that share a weight into one.

    python scripts/bench_l2_weights.py --out bench/results/decode-matmul-l2-hot-<card>.json
    python scripts/bench_l2_weights.py --rows 8 --sets 2 --quick   # CPU smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxinfer import benchmark as bm
from jaxinfer.runner import CUBLAS_OPTIONS


def time_chain(m: int, k: int, sets: int, hot: bool, args) -> float:
    """Seconds per matmul of a chain of `sets` dependent [m, k] x [k, k] bf16 matmuls; `hot`
    gives every matmul the same weight."""
    keys = jax.random.split(jax.random.key(0), sets + 1)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    scale = k**-0.5  # keeps the chain's values finite
    distinct = 1 if hot else sets
    made = [scale * jax.random.normal(key, (k, k), jnp.bfloat16) for key in keys[1 : 1 + distinct]]
    ws = made * (sets // distinct)  # hot: the one weight, `sets` times

    def chain(x, ws):
        for w in ws:
            x = x @ w
        return x

    options = None if jax.default_backend() == "cpu" else CUBLAS_OPTIONS
    fn = jax.jit(chain, compiler_options=options)
    total = bm.pipelined_time(lambda _: fn(x, ws), repeats=args.repeats, min_time=args.min_time)
    return total / sets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=bm.int_list, default=[128, 32])
    p.add_argument("--sets", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    report = bm.report_header()
    if not args.quick:
        report["limits"] = bm.card_limits(repeats=args.repeats)
    rows = []
    k = 64 if args.quick else 4096
    for m in args.rows:
        cold, hot = (1e6 * time_chain(m, k, args.sets, h, args) for h in (False, True))
        row = {"k": k, "n": k, "m": m, "sets": args.sets, "cold_us": cold, "hot_us": hot}
        if "limits" in report:
            row["floor_us"] = 1e6 * 2 * k * k / (1e9 * report["limits"]["read_GBps"])
        rows.append(row)
        print(row, flush=True)
    report["rows"] = rows
    if args.out:
        bm.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
