"""The paged decode kernel's tiles at an engine's shapes: block tables as wide as the context
(8,192 tokens: 512 pages of 16 tokens), sequences of varied length, KV-read GB/s of the real
lengths, for each page size, block_k, warps, stages and split count (None: the kernel's own
choice) of the lists given; `--programs-per-sm` adds the balanced (stream-K) form at each
count of programs an SM (0: the split form), `--prefetch 0,1` the block-table loads a step
ahead, `--contiguous` each sequence's pages in order (with `--identity-pages`, a diagnostic:
the kernels compute each token's page instead of loading it), and `--limits` the card's read
bandwidth.

    python scripts/bench_decode_tiles.py --out bench/results/kernels-decode-splits-<card>.json
    python scripts/bench_decode_tiles.py --cases 100x1500x0 --block-k 64,128 --warps 4,8 --stages 2,3,4,5 --splits 1,2
    python scripts/bench_decode_tiles.py --cases 100x1750x0 --page-size 16,32,64 --block-k 64,128
    python scripts/bench_decode_tiles.py --cases 100x1750x0 --block-k 64 --stages 2,4 --splits 1 --programs-per-sm 0,1,2,3,4 --limits
    python scripts/bench_decode_tiles.py --cases 128x1750x0x100 --block-k 64,128 --stages 2,4 --splits 1
    python scripts/bench_decode_tiles.py --cases 4x40x8            # CPU smoke (interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
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


def input_sets(
    b: int,
    ctx: int,
    spread: int,
    count: int,
    page: int,
    live: int | None = None,
    contiguous: bool = False,
) -> tuple[list, float]:
    """`count` sets (q, k_pages, v_pages, tables, lengths), pages of `page` tokens, lengths uniform
    in ctx +- spread, pages shuffled (or each sequence's in order, `contiguous`); and the mean KV
    bytes a call reads. Rows from `live` on are an engine program's padding: length 1 in page 0."""
    rng = np.random.default_rng(b + ctx)
    sets, width = [], CONTEXT // page
    for i in range(count):
        lens = rng.integers(ctx - spread, ctx + spread + 1, b).astype(np.int32)
        if live is not None:
            lens[live:] = 1
        need = [-(-int(n) // page) for n in lens]
        pool = int(sum(need) * 1.1) + 8
        perm = np.arange(pool) if contiguous else rng.permutation(pool)
        table, at = np.zeros((b, width), np.int32), 0
        for row, p in enumerate(need[:live]):
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


def identity_pages(bt_ref, bt_row, first_token, *, block_k, page_size, valid):
    """A diagnostic stand-in for the kernels' block-table lookup, right for contiguous tables
    only: each token's page from the sequence's first entry, no per-token load."""
    del valid
    tok = first_token + jnp.arange(block_k, dtype=jnp.int32)
    first = bt_ref[0] if bt_row is None else bt_ref[bt_row, 0]
    return first + jax.lax.div(tok, page_size)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--cases", default=CASES, help="comma list of BxCTXxSPREAD[xLIVE] (LIVE: rows not padding)"
    )
    p.add_argument("--page-size", type=bm.int_list, default=[16])
    p.add_argument("--block-k", type=bm.int_list, default=[32, 64])
    p.add_argument("--warps", type=bm.int_list, default=[4])
    p.add_argument("--stages", type=bm.int_list, default=[4])
    p.add_argument(
        "--splits", type=bm.int_list, default=None, help="default: None,1,2,4,8 (B 1: None,16,33)"
    )
    p.add_argument(
        "--programs-per-sm", type=bm.int_list, default=[0], help="0: split form; n: balanced"
    )
    p.add_argument(
        "--prefetch", type=bm.int_list, default=[0], help="1: block-table entries a step ahead"
    )
    p.add_argument("--contiguous", action="store_true", help="each sequence's pages in order")
    p.add_argument(
        "--identity-pages",
        action="store_true",
        help="diagnostic, with --contiguous: kernels compute pages instead of loading them",
    )
    p.add_argument("--limits", action="store_true", help="measure the card's read bandwidth")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.identity_pages:
        if not args.contiguous:
            p.error("--identity-pages needs --contiguous (it ignores the block tables)")
        pa._tile_pages = identity_pages
    interpret = jax.default_backend() == "cpu"
    limits = bm.card_limits(repeats=3) if args.limits else {}
    if limits:
        print(json.dumps(limits), flush=True)
    rows = []
    for case, page in itertools.product(args.cases.split(","), args.page_size):
        b, ctx, spread, *live = (int(x) for x in case.split("x"))
        live = live[0] if live else None
        count = 2 if interpret else 4
        sets, kv_bytes = input_sets(b, ctx, spread, count, page, live, args.contiguous)
        ref = pa.paged_attention_reference(*sets[0])
        split_list = args.splits or ([None, 1, 2, 4, 8] if b > 1 else [None, 16, 33])
        forms = [(0, s) for s in split_list] if 0 in args.programs_per_sm else []
        forms += [(n, None) for n in args.programs_per_sm if n]
        grid = itertools.product(args.block_k, args.warps, args.stages, forms, args.prefetch)
        for block_k, warps, stages, (per_sm, splits), prefetch in grid:
            if block_k % page and page % block_k:
                continue
            cfg = pa.PagedConfig(
                block_k=block_k,
                num_splits=splits,
                num_warps=warps,
                num_stages=stages,
                prefetch_pages=bool(prefetch),
            )
            if per_sm:
                cfg = dataclasses.replace(cfg, stream=True, programs_per_sm=per_sm)

            def fn(*a, cfg=cfg):
                return pa.paged_attention(*a, config=cfg, interpret=interpret)

            err = jnp.max(jnp.abs(jax.jit(fn)(*sets[0]).astype(float) - ref.astype(float)))
            sec = bm.time_over_sets(fn, sets, repeats=3, min_time=None if interpret else 0.1)
            row = dict(B=b, live=live, ctx=ctx, spread=spread, page_size=page, block_k=block_k)
            row.update(splits=splits)
            row.update(programs_per_sm=per_sm, prefetch=prefetch)
            row.update(warps=warps, stages=stages)
            row.update(us=sec * 1e6, GBps=kv_bytes / sec / 1e9, err=float(err))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        layout = dict(contiguous=args.contiguous, identity_pages=args.identity_pages)
        report = {**bm.report_header(), **layout, "limits": limits, "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
