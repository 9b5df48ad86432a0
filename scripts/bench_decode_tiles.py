"""The paged decode kernel's tiles at an engine's shapes: block tables as wide as the context
(8,192 tokens: 512 pages of 16 tokens), sequences of varied length, KV-read GB/s of the real
lengths, for each page size, block_k, warps, stages and split count (None: the kernel's own
choice) of the lists given.

    python scripts/bench_decode_tiles.py --out bench/results/kernels-decode-splits-<card>.json
    python scripts/bench_decode_tiles.py --cases 100x1500x0 --block-k 64,128 --warps 4,8 --stages 2,3,4,5 --splits 1,2
    python scripts/bench_decode_tiles.py --cases 100x1750x0 --page-size 16,32,64 --block-k 64,128
    python scripts/bench_decode_tiles.py --cases 4x40x8            # CPU smoke (interpret mode)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm

pa = importlib.import_module("pallas_kernels.paged_attention")  # the package exports a function
K, N, H, CONTEXT = 8, 32, 128, 8192
CASES = "100x1750x250,256x420x100,1x512x0,64x3000x500,32x1024x200"  # B x ctx x spread


def input_sets(b: int, ctx: int, spread: int, count: int, page: int) -> tuple[list, float]:
    """`count` sets (q, k_pages, v_pages, tables, lengths), pages of `page` tokens, lengths uniform
    in ctx +- spread, pages shuffled; and the mean KV bytes a call reads."""
    rng = np.random.default_rng(b + ctx)
    sets, width = [], CONTEXT // page
    for i in range(count):
        lens = rng.integers(ctx - spread, ctx + spread + 1, b).astype(np.int32)
        need = [-(-int(n) // page) for n in lens]
        pool = int(sum(need) * 1.1) + 8
        perm, table, at = rng.permutation(pool), np.zeros((b, width), np.int32), 0
        for row, p in enumerate(need):
            table[row, :p], at = perm[at : at + p], at + p
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(i), 3)
        sets.append(
            (
                jax.random.normal(kq, (b, N, H), jnp.bfloat16),
                jax.random.normal(kk, (K, pool, page, H), jnp.bfloat16),
                jax.random.normal(kv, (K, pool, page, H), jnp.bfloat16),
                jnp.asarray(table),
                jnp.asarray(lens),
            )
        )
    tokens = float(np.mean([int(s[4].sum()) for s in sets]))
    return sets, tokens * K * H * 2 * 2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=CASES, help="comma list of BxCTXxSPREAD")
    p.add_argument("--page-size", type=bm.int_list, default=[16])
    p.add_argument("--block-k", type=bm.int_list, default=[32, 64])
    p.add_argument("--warps", type=bm.int_list, default=[4])
    p.add_argument("--stages", type=bm.int_list, default=[4])
    p.add_argument(
        "--splits", type=bm.int_list, default=None, help="default: None,1,2,4,8 (B 1: None,16,33)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    rows = []
    for case, page in itertools.product(args.cases.split(","), args.page_size):
        b, ctx, spread = (int(x) for x in case.split("x"))
        sets, kv_bytes = input_sets(b, ctx, spread, 2 if interpret else 4, page)
        ref = pa.paged_attention_reference(*sets[0])
        split_list = args.splits or ([None, 1, 2, 4, 8] if b > 1 else [None, 16, 33])
        grid = itertools.product(args.block_k, args.warps, args.stages, split_list)
        for block_k, warps, stages, splits in grid:
            if block_k % page and page % block_k:
                continue
            cfg = pa.PagedConfig(
                block_k=block_k, num_splits=splits, num_warps=warps, num_stages=stages
            )

            def fn(*a, cfg=cfg):
                return pa.paged_attention(*a, config=cfg, interpret=interpret)

            err = jnp.max(jnp.abs(jax.jit(fn)(*sets[0]).astype(float) - ref.astype(float)))
            sec = bm.time_over_sets(fn, sets, repeats=3, min_time=None if interpret else 0.1)
            row = dict(B=b, ctx=ctx, spread=spread, page_size=page, block_k=block_k, splits=splits)
            row.update(warps=warps, stages=stages)
            row.update(us=sec * 1e6, GBps=kv_bytes / sec / 1e9, err=float(err))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        report = {**bm.report_header(), "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
