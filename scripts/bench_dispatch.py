"""What one jitted call costs the host, by the number of array arguments (the engine's step
passes ~290 weight arrays and 64 page pools of a Llama-3-8B besides its batch).

    python scripts/bench_dispatch.py --out bench/results/dispatch-nvidia-h200.json

For each count N: a jitted function of N small arrays (with and without donating them), called
back to back; the figure is the host time to queue one call (median over rounds), with the
device idle enough not to hold the queue back (each call does one tiny add).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def queue_time(fn, args, donate: bool, calls: int = 50, rounds: int = 7) -> float:
    """Median seconds to queue one call of fn over `rounds` of `calls` calls."""
    import jax

    times = []
    for _ in range(rounds):
        jax.block_until_ready(args)
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
            if donate:
                args = out
        times.append((time.perf_counter() - start) / calls)
        jax.block_until_ready(out)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--counts", default="1,8,64,128,256,384")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from jaxinfer.benchmark import default_device

    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        arrays = tuple(jnp.full((1024,), i, jnp.float32) for i in range(n))
        body = lambda *xs: tuple(x + 1 for x in xs)  # noqa: E731
        kept = jax.jit(body)
        donated = jax.jit(body, donate_argnums=tuple(range(n)))
        jax.block_until_ready(kept(*arrays))
        fresh = tuple(jnp.array(a) for a in arrays)
        jax.block_until_ready(donated(*fresh))
        row = {
            "arrays": n,
            "queue_us": queue_time(kept, arrays, False) * 1e6,
            "queue_donated_us": queue_time(donated, tuple(jnp.array(a) for a in arrays), True)
            * 1e6,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": default_device().device_kind, "jax": jax.__version__, "rows": rows}
    if args.out:
        from jaxinfer.benchmark import write_json

        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
