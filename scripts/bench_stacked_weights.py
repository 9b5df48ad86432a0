"""Do weights stacked over layers cost device time? One jitted chain of L matmuls x @ W_l read
from L separate arrays, from one stacked [L, D, D] array by static slices, and through
`lax.scan`; the device time per call against reading the weights once, and the host time to
queue a call (fewer arrays: less of it, see `bench_dispatch.py`).

    python scripts/bench_stacked_weights.py --out bench/results/stacked-weights-nvidia-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def timed(fn, args, calls: int = 20, rounds: int = 5) -> tuple[float, float]:
    """(median seconds per call with calls queued back to back, median seconds to queue one)."""
    import jax

    jax.block_until_ready(fn(*args))
    per_call, queue = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        queued = time.perf_counter()
        jax.block_until_ready(out)
        end = time.perf_counter()
        per_call.append((end - start) / calls)
        queue.append((queued - start) / calls)
    return statistics.median(per_call), statistics.median(queue)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from jaxinfer.benchmark import default_device

    n, d = args.layers, args.width
    keys = jax.random.split(jax.random.key(0), n)
    separate = [0.02 * jax.random.normal(k, (d, d), jnp.bfloat16) for k in keys]
    stacked = jnp.stack(separate)  # [L, D, D]
    x = jax.random.normal(jax.random.key(1), (args.batch, d), jnp.bfloat16)

    @jax.jit
    def chain_separate(x, *ws):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x

    @jax.jit
    def chain_sliced(x, ws):
        for i in range(ws.shape[0]):
            x = jnp.tanh(x @ ws[i])
        return x

    @jax.jit
    def chain_scanned(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    bytes_read = n * d * d * 2
    rows = {}
    for name, fn, fn_args in (
        ("separate", chain_separate, (x, *separate)),
        ("static_slices", chain_sliced, (x, stacked)),
        ("scan", chain_scanned, (x, stacked)),
    ):
        per_call, queue = timed(fn, fn_args)
        rows[name] = {
            "ms_per_call": per_call * 1e3,
            "queue_us": queue * 1e6,
            "weight_GBps": bytes_read / per_call / 1e9,
        }
        print(name, json.dumps(rows[name]), flush=True)
    equal = bool(
        jnp.allclose(chain_separate(x, *separate), chain_sliced(x, stacked))
        and jnp.allclose(chain_separate(x, *separate), chain_scanned(x, stacked))
    )
    report = {
        "device": default_device().device_kind,
        "jax": jax.__version__,
        "layers": n,
        "width": d,
        "batch": args.batch,
        "weight_bytes": bytes_read,
        "results_equal": equal,
        "rows": rows,
    }
    if args.out:
        from jaxinfer.benchmark import write_json

        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
