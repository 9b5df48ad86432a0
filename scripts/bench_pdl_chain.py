"""Programmatic dependent launch between decode matmuls: a chain of L matmuls of 128 rows, each
W_i [8192, 8192] bf16 (128 CTAs of 64 columns, one wave) fed the one before's output, with the
Mosaic GPU decode matmul as is and with `pdl` (the next kernel launches at once and loads its
first weight tiles before it waits for the one before). Time per matmul of the chain, its read
floor, and whether the two chains' outputs are bitwise equal. Hopper only; run once as is and
once under XLA_FLAGS=--xla_gpu_enable_pdl=true.

    XLA_FLAGS=--xla_gpu_enable_pdl=true python scripts/bench_pdl_chain.py --out pdl-on.json
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from pallas_kernels import decode_matmul as dm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16, help="matmuls in the chain")
    p.add_argument("--size", type=int, default=8192, help="K = N of each weight")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    n = args.size
    keys = jax.random.split(jax.random.key(0), args.layers + 1)
    x = jax.random.normal(keys[0], (128, n), jnp.bfloat16)
    ws = [jax.random.normal(k, (n, n), jnp.bfloat16) * (n**-0.5) for k in keys[1:]]
    report = {"device": bm.default_device().device_kind, "jax": jax.__version__}
    report["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    report["floor_us"] = n * n * 2 / 4.4e12 * 1e6
    outs = {}
    for pdl in (False, True):
        cfg = dm.DecodeMatmulConfig(64, 128, 4, 1, 1, pdl=pdl)

        def chain(x, *ws, cfg=cfg):
            for w in ws:
                x = dm.decode_matmul(x, w, w_nk=False, config=cfg)
            return x

        outs[pdl] = np.asarray(jax.jit(chain)(x, *ws).astype(jnp.float32))
        sec = bm.time_over_sets(chain, [(x, *ws)], repeats=5, min_time=0.2)
        report[f"pdl_{pdl}_us_per_matmul"] = sec * 1e6 / args.layers
        print(json.dumps(report), flush=True)
    report["outputs_equal"] = bool(np.array_equal(outs[False], outs[True]))
    report["outputs_finite"] = bool(np.isfinite(outs[True]).all())
    print(json.dumps(report), flush=True)
    if args.out:
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
