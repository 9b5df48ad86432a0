"""What the paged decode kernel's split-K combine costs inside a call: the kernel over 100 and
128 sequences of 1,750 tokens with 1-4 splits, each with the combine as it is, with the combine
swapped for a slice of the first split's partials (not a result: the cost without it), and with
a combine of one program per (sequence, kv head) instead of per query head. GPU only.

    python scripts/bench_decode_combine.py --out bench/results/kernels-decode-combine-<card>.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer import benchmark as bm
from pallas_kernels import common

pa = importlib.import_module("pallas_kernels.paged_attention")  # the package exports a function


def combine_bk(acc, m, l, dtype):
    """grid (B, K): one program per (sequence, kv head) over [Sp, Gp, Hp]."""
    s, b, k, g, h = acc.shape
    sp, gp, hp = pl.next_power_of_2(s), pl.next_power_of_2(g), pl.next_power_of_2(h)

    def kernel(acc_ref, m_ref, l_ref, o_ref):
        s_ok = jnp.arange(sp) < s
        g_ok = jnp.arange(gp) < g
        h_ok = jnp.arange(hp) < h
        sg = s_ok[:, None] & g_ok[None, :]
        mm = plgpu.load(m_ref, mask=sg, other=common.MASK_VALUE)
        ll = plgpu.load(l_ref, mask=sg, other=0.0)
        aa = plgpu.load(acc_ref, mask=sg[:, :, None] & h_ok[None, None, :], other=0.0)
        w = jnp.exp2(mm - jnp.max(mm, axis=0)[None, :])
        denom = jnp.sum(w * ll, axis=0)
        out = jnp.sum(w[:, :, None] * aa, axis=0) / jnp.where(denom == 0.0, 1.0, denom)[:, None]
        plgpu.store(o_ref, out.astype(o_ref.dtype), mask=g_ok[:, None] & h_ok[None, :])

    return pl.pallas_call(
        kernel,
        grid=(b, k),
        in_specs=[
            pl.BlockSpec((sp, None, None, gp, hp), lambda i, j: (0, i, j, 0, 0)),
            pl.BlockSpec((sp, None, None, gp), lambda i, j: (0, i, j, 0)),
            pl.BlockSpec((sp, None, None, gp), lambda i, j: (0, i, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, gp, hp), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, k, g, h), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(acc, m, l)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sys.path.insert(0, "scripts")
    import bench_decode_tiles as tiles

    current = pa._combine_call
    variants = {
        "current": current,
        "none": lambda acc, m, l, dtype, *, interpret: acc[0].astype(dtype),
        "grid_bk": lambda acc, m, l, dtype, *, interpret: combine_bk(acc, m, l, dtype),
    }
    rows = []
    for b in (100, 128):
        sets, kv_bytes = tiles.input_sets(b, 1750, 0, 4, 16)
        for splits in (1, 2, 3, 4):
            for name, combine in variants.items():
                if splits == 1 and name != "current":
                    continue
                pa._combine_call = combine  # what the kernel's wrapper calls
                jax.clear_caches()
                cfg = pa.PagedConfig(block_k=64, num_splits=splits, num_stages=2)
                fn = lambda *a, cfg=cfg: pa.paged_attention(*a, config=cfg)  # noqa: E731
                sec = bm.time_over_sets(fn, sets, repeats=3, min_time=0.1)
                row = dict(B=b, splits=splits, combine=name, us=sec * 1e6)
                row["GBps"] = kv_bytes / sec / 1e9
                print(json.dumps(row), flush=True)
                rows.append(row)
    pa._combine_call = current
    if args.out:
        report = {**bm.report_header(), "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
