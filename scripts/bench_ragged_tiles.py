"""The ragged paged kernel at prefill shapes (the engine's prompt chunks): TFLOP/s of the causal
flops for each block_rows, block_k, warps and stages of the lists given, beside the dense flash
kernels on the same tokens (cache-free cases only: ours packed and batched, cuDNN).

    python scripts/bench_ragged_tiles.py --out bench/results/kernels-ragged-tiles-<card>.json
    python scripts/bench_ragged_tiles.py --cases 8x1024x0 --block-rows 64,128 --block-k 32,64
    python scripts/bench_ragged_tiles.py --cases 2x40x24 --block-rows 64 --block-k 16   # CPU smoke

A case `SxQxP` is S sequences of Q new tokens each after P cached ones, pages shuffled; the error
column is the max abs difference from the f32 reference over the first sequence's rows.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm

pa = importlib.import_module("pallas_kernels.paged_attention")  # the package exports a function
fa = importlib.import_module("pallas_kernels.flash_attention")
common = importlib.import_module("pallas_kernels.common")
K, N, H, L = 8, 32, 128, 16  # Llama-3-8B's heads, the engine's page
CASES = "8x1024x0,1x8192x0,2x2048x2048"


def input_sets(s: int, q: int, p: int, count: int) -> list:
    """`count` sets (q [S*Q, N, H], k_pages, v_pages, tables, kv_lens, cu_q_lens)."""
    rng = np.random.default_rng(s * q + p)
    pages = -(-(p + q) // L)
    pool = s * pages + 8
    lens = np.full(s, p + q, np.int32)
    cu = np.arange(s + 1, dtype=np.int32) * q
    sets = []
    for i in range(count):
        table = rng.permutation(pool)[: s * pages].reshape(s, pages).astype(np.int32)
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(i), 3)
        sets.append(
            (
                jax.random.normal(kq, (s * q, N, H), jnp.bfloat16),
                jax.random.normal(kk, (K, pool, L, H), jnp.bfloat16),
                jax.random.normal(kv, (K, pool, L, H), jnp.bfloat16),
                jnp.asarray(table),
                jnp.asarray(lens),
                jnp.asarray(cu),
            )
        )
    return sets


def causal_flops(s: int, q: int, p: int) -> float:
    """QK^T and PV over the visible (query, key) pairs: 4 x N x H flops a pair."""
    pairs = s * (q * p + q * (q + 1) // 2)
    return 4.0 * N * H * pairs


def first_seq_reference(inputs) -> jax.Array:
    """The f32 reference of sequence 0's rows [Q, N, H], over its own pages."""
    q, k_pages, v_pages, table, lens, cu = inputs
    q0 = int(cu[1])
    k = pa.gather_contiguous(k_pages, table[:1])[:, : int(lens[0])]  # [1, S, K, H]
    v = pa.gather_contiguous(v_pages, table[:1])[:, : int(lens[0])]
    s = k.shape[1]
    visible = jnp.arange(s)[None, :] <= (s - q0 + jnp.arange(q0))[:, None]  # [Q, S]
    return common.attention_reference(q[None, :q0], k, v, visible[None])[0][0]


def first_seq_error(out, ref) -> float:
    """Max abs error of out's first rows against `first_seq_reference`'s [Q, N, H]."""
    return float(jnp.max(jnp.abs(out[: ref.shape[0]].astype(jnp.float32) - ref)))


def dense_peers(s: int, q: int, sets: list, interpret: bool) -> tuple[dict, list]:
    """Flash attention over the same tokens with no cache (P = 0), K/V gathered beforehand:
    name -> fn of (q [S, Q, N, H], k [S, Q, K, H], v), and those sets."""
    dense = [
        (
            x.reshape(s, q, N, H),
            pa.gather_contiguous(kp, table)[:, :q],
            pa.gather_contiguous(vp, table)[:, :q],
        )
        for x, kp, vp, table, _, _ in sets
    ]
    cu = jnp.arange(s + 1, dtype=jnp.int32) * q

    def packed(x, k, v):
        flat = lambda a: a.reshape(s * q, *a.shape[2:])
        return fa.flash_attention(flat(x), flat(k), flat(v), cu_seqlens=cu, interpret=interpret)

    peers = {
        "flash_packed": packed,
        "flash_batched": lambda x, k, v: fa.flash_attention(x, k, v, interpret=interpret),
    }
    if jax.default_backend() == "gpu":
        peers["cudnn"] = lambda x, k, v: jax.nn.dot_product_attention(
            x, k, v, is_causal=True, implementation="cudnn"
        )
    return peers, dense


def time_it(fn, sets, interpret: bool) -> float:
    return bm.time_over_sets(fn, sets, repeats=3, min_time=None if interpret else 0.1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=CASES, help="comma list of SxQxP")
    p.add_argument("--block-rows", type=bm.int_list, default=[64, 128, 256])
    p.add_argument("--block-k", type=bm.int_list, default=[32, 64, 128])
    p.add_argument("--warps", type=bm.int_list, default=[4, 8])
    p.add_argument("--stages", type=bm.int_list, default=[2, 4])
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    rows = []

    def emit(row):
        print(json.dumps(row), flush=True)
        rows.append(row)

    def measure(row: dict, fn, sets: list, flops: float, check=None) -> None:
        """Times fn over sets into row, with `check` of its output on the first set as "err";
        a tile the card cannot hold, or a failing peer, is recorded and the sweep goes on."""
        try:
            err = None if check is None else check(jax.jit(fn)(*sets[0]))
            sec = time_it(fn, sets, interpret)
        except Exception as e:
            emit({**row, "error": bm.error_text(e)})
            return
        row.update(us=sec * 1e6, TFLOPs=flops / sec / 1e12)
        emit(row if err is None else {**row, "err": err})

    for case in args.cases.split(","):
        s, q, prior = (int(x) for x in case.split("x"))
        sets = input_sets(s, q, prior, 2)
        flops = causal_flops(s, q, prior)
        check = functools.partial(first_seq_error, ref=first_seq_reference(sets[0]))
        grid = itertools.product(args.block_rows, args.block_k, args.warps, args.stages)
        for block_rows, block_k, warps, stages in grid:
            cfg = pa.PagedConfig(
                block_k=block_k, block_rows=block_rows, num_warps=warps, num_stages=stages
            )
            row = dict(case=case, block_rows=block_rows, block_k=block_k)
            row.update(warps=warps, stages=stages)

            def fn(*a, cfg=cfg):
                return pa.ragged_paged_attention(*a, config=cfg, interpret=interpret)

            measure(row, fn, sets, flops, check)
        if args.peers and prior == 0:
            peers, dense = dense_peers(s, q, sets, interpret)
            for name, fn in peers.items():
                measure(dict(case=case, peer=name), fn, dense, flops)
    if args.out:
        report = {**bm.report_header(), "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
