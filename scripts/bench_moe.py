"""Grouped matmul at MoE prefill sizes on a GPU: ours (Pallas) vs `jax.lax.ragged_dot` vs a dense
matmul of the same total size, plus the MoE decode step (see bench_generate.py --models mixtral-8x7b).

    python scripts/bench_moe.py --tokens 512,2048,8192,16384 --out bench/results/moe-<card>.json
    python scripts/bench_moe.py --tokens 64 --d 64 --f 128 --repeats 2     # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def timed(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(5)]  # back-to-back, one sync
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / 5)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,2048,8192,16384")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference

    e, d, f, k = args.experts, args.d, args.f, args.top_k
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    key = jax.random.key(0)
    w = jax.random.normal(key, (e, d, 2 * f), jnp.bfloat16)  # gate_up of every expert
    for t in [int(x) for x in args.tokens.split(",")]:
        m = t * k
        routes = np.random.default_rng(t).integers(0, e, m)  # near-uniform, as random routers give
        sizes = jnp.asarray(np.bincount(routes, minlength=e), jnp.int32)
        x = jax.random.normal(key, (m, d), jnp.bfloat16)
        dense_w = w[0]
        flops = 2 * m * d * 2 * f
        ours = jax.jit(grouped_matmul)
        ref = jax.jit(grouped_matmul_reference)
        err = float(jnp.max(jnp.abs(ours(x, w, sizes).astype(jnp.float32) -
                                    ref(x, w, sizes).astype(jnp.float32))) /
                    jnp.max(jnp.abs(ref(x, w, sizes).astype(jnp.float32))))
        row = {"tokens": t, "rows": m, "K": d, "N": 2 * f, "max_rel_err_vs_ragged_dot": err}
        for name, fn, fargs in (("ours", ours, (x, w, sizes)), ("ragged_dot", ref, (x, w, sizes)),
                                ("dense", jax.jit(lambda a, b: a @ b), (x, dense_w))):
            sec = timed(fn, *fargs, repeats=args.repeats)
            row[f"{name}_ms"], row[f"{name}_TFLOPs"] = sec * 1e3, flops / sec / 1e12
        row["ours_vs_dense"] = row["ours_TFLOPs"] / row["dense_TFLOPs"]
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(f"\n{report['device']}  jax {report['jax']}  E={e} top-{k} D={d} 2F={2 * f}")
    for r in report["rows"]:
        print(f"tokens {r['tokens']:6d}: ours {r['ours_TFLOPs']:6.1f} TFLOP/s  ragged_dot "
              f"{r['ragged_dot_TFLOPs']:6.1f}  dense {r['dense_TFLOPs']:6.1f}  ours/dense "
              f"{r['ours_vs_dense']:.2f}  err {r['max_rel_err_vs_ragged_dot']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
