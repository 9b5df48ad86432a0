"""Batch-1 GEMVs of a decoder layer: the Pallas GEMVs (`pallas_kernels.gemv`) against XLA's dot.

For each weight shape (Llama-3-8B's by default), the time per call and the weight-read GB/s of
  xla            jnp.dot(x[None], W) in the dtype, W [K, N] (XLA's GEMV and its split-K sum),
  xla_nk         the same with W stored [N, K],
  xla_reduce     the GEMV written as multiply + sum over K in float32 (XLA's reduction
                 kernel: one kernel, no split-K sum), both layouts (`xla_nk_reduce`: the
                 model's own one-token form, `jaxinfer.models.layers.dense`),
  xla_m{M}       M tokens (--batch), both layouts,
  xla_split{S}   XLA's batched dot over S splits of K, float32 partials (--xla-splits),
  rows           the Pallas GEMV of W [N, K], output in the dtype, for each tile of a sweep,
  pallas         the Pallas split-K partials of W [K, N] alone (what a consumer that adds them
                 reads; one tile, or a sweep with --split-k-sweep), and `pallas+`: summed by XLA;
and the card's bandwidths measured in the same run. Timing: back-to-back calls over rotating
weight sets (more bytes than L2), one sync.

  python scripts/bench_gemv.py [--out PATH] [--split-k-sweep] [--xla-splits 2,4,8,16]
  python scripts/bench_gemv.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import itertools
import platform

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer.models.layers import dense
from pallas_kernels.gemv import GemvConfig, GemvRowsConfig, gemv_partials, gemv_reference, gemv_rows

LLAMA3_8B = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}


def configs(quick: bool):
    if quick:
        return [GemvConfig()]
    out = []
    grid = itertools.product((32, 64, 128), (256, 512, 1024, 2048), (64, 128, 256), (4, 8))
    for bn, bk, ck, warps in grid:
        if ck <= bk and ck * bn <= 8192:  # a loop of more than one step is pipelined
            out.append(GemvConfig(bn, bk, ck, warps, 1 if bk == ck else 3))
    return out


def split_dot(x, w, splits):
    """x @ W as [splits, N] float32 partial sums, by XLA: a batched dot over the K splits."""
    k, n = w.shape
    xs, ws = x.reshape(splits, k // splits), w.reshape(splits, k // splits, n)
    return jnp.einsum("sk,skn->sn", xs, ws, preferred_element_type=jnp.float32)


def column_reduce_gemv(x, w):
    """x @ W [K, N] as a float32 multiply and sum over K (a column reduction), in x's dtype;
    over W [N, K] the same form is `dense(x, W, 1, row_gemv=True)`."""
    prod = x[:, None].astype(jnp.float32) * w.astype(jnp.float32)
    return jnp.sum(prod, axis=0).astype(x.dtype)


def row_reduce_gemv(x, w):  # W [N, K]: the model's one-token form
    return dense(x, w, 1, row_gemv=True)


def rows_configs(quick: bool):
    if quick:
        return [GemvRowsConfig()]
    grid = itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (3, 4))
    return [GemvRowsConfig(*g) for g in grid if 2048 <= g[0] * g[1] <= 16384]


def sets_for(k, n, dtype, min_bytes):
    count = max(2, -(-min_bytes // (k * n * jnp.dtype(dtype).itemsize)))
    keys = jax.random.split(jax.random.key(k + n), count)
    x = jax.random.normal(keys[0], (k,), dtype)
    return [(x, jax.random.normal(kk, (k, n), dtype) * 0.02) for kk in keys]


def rel_err(got, ref) -> float:
    """Largest error against the float32 reference, relative to its largest value."""
    return float(np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max())


def sweep(kernel, cfgs, shape, sets, ref, timer, gbps) -> list[dict]:
    """Each config that fits `shape`: its time, GB/s and error against ref (best first), or the
    error that stopped it (a config Triton cannot compile: its figure is its error)."""
    tried = []
    for c in cfgs:
        if not c.fits(*shape):
            continue
        try:
            err = rel_err(kernel(*sets[0], c), ref)
            sec = timer(lambda x, w, c=c: kernel(x, w, c))
        except Exception as e:  # noqa: BLE001
            tried.append({"config": c.__dict__, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        tried.append({"config": c.__dict__, "us": sec * 1e6, "GBps": gbps(sec), "err": err})
    ok = sorted((r for r in tried if "us" in r), key=lambda r: r["us"])
    return ok + [r for r in tried if "us" not in r]


def measure_shape(k: int, n: int, args, dtype, min_bytes: int) -> dict:
    sets = sets_for(k, n, dtype, min_bytes)  # W [K, N]
    rows_sets = [(x, w.T.copy()) for x, w in sets]  # W stored [N, K]
    gbps = lambda sec: k * n * 2 / sec / 1e9
    t = lambda fn: bm.time_over_sets(fn, sets, repeats=args.repeats, min_time=0.05)
    tr = lambda fn: bm.time_over_sets(fn, rows_sets, repeats=args.repeats, min_time=0.05)
    row = {"k": k, "n": n, "sets": len(sets)}

    def put(name, sec):
        row[f"{name}_us"], row[f"{name}_GBps"] = sec * 1e6, gbps(sec)

    put("xla", t(lambda x, w: jnp.dot(x[None], w)))
    put("xla_nk", tr(lambda x, w: jnp.dot(x[None], w.T)))
    put("xla_reduce", t(column_reduce_gemv))
    put("xla_nk_reduce", tr(row_reduce_gemv))
    for s in args.xla_splits:
        put(f"xla_split{s}", t(lambda x, w, s=s: split_dot(x, w, s)))
    for m in args.batch:  # m tokens (the add keeps the sets' calls distinct)
        xm = jax.random.normal(jax.random.key(m), (m, k), dtype)
        put(f"xla_m{m}", t(lambda x, w, xm=xm: jnp.dot(xm + x[:1], w)))
        put(f"xla_nk_m{m}", tr(lambda x, w, xm=xm: jnp.dot(xm + x[:1], w.T)))
    ref = np.asarray(gemv_reference(*sets[0]))
    row["xla_reduce_err"] = rel_err(column_reduce_gemv(*sets[0]), ref)
    row["xla_nk_reduce_err"] = rel_err(row_reduce_gemv(*rows_sets[0]), ref)
    one_tile = args.quick or args.cpu_smoke
    rows_cfgs = rows_configs(one_tile)
    row["rows_configs"] = sweep(gemv_rows, rows_cfgs, (n, k), rows_sets, ref, tr, gbps)
    partials = lambda x, w, c: gemv_partials(x, w, c).sum(0)
    split_cfgs = configs(one_tile or not args.split_k_sweep)
    row["configs"] = sweep(partials, split_cfgs, (k, n), sets, ref, t, gbps)
    if "us" in row["configs"][0]:
        best = GemvConfig(**row["configs"][0]["config"])
        put("pallas_plus_sum", t(lambda x, w: gemv_partials(x, w, best).sum(0).astype(x.dtype)))
    return row


def report(name: str, row: dict, args) -> None:
    print(f"{name} [{row['k']} x {row['n']}] xla {row['xla_us']:.2f} us {row['xla_GBps']:.0f} GB/s")
    print(f"  xla, W [N, K]: {row['xla_nk_us']:.2f} us")
    kn, nk = row["xla_reduce_us"], row["xla_nk_reduce_us"]
    print(f"  xla multiply + sum: W [K, N] {kn:.2f} us, W [N, K] {nk:.2f} us")
    for s in args.xla_splits:
        print(f"  xla, {s} K splits as a batch: {row[f'xla_split{s}_us']:.2f} us")
    for m in args.batch:
        us, us_nk = row[f"xla_m{m}_us"], row[f"xla_nk_m{m}_us"]
        print(f"  xla {m} tokens: W [K, N] {us:.2f} us, W [N, K] {us_nk:.2f} us")
    for kind in ("rows_configs", "configs"):
        for r in [r for r in row[kind] if "us" in r][: args.top]:
            print(
                f"  {kind} {r['config']} {r['us']:.2f} us {r['GBps']:.0f} GB/s err {r['err']:.1e}"
            )
    if "pallas_plus_sum_us" in row:
        print(f"  split-K partials + XLA sum {row['pallas_plus_sum_us']:.2f} us", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="one tile of each kernel")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=6)
    p.add_argument(
        "--batch", type=bm.int_list, default=[16, 128], help="token counts for XLA's dot"
    )
    p.add_argument("--xla-splits", type=bm.int_list, default=[])
    p.add_argument("--split-k-sweep", action="store_true", help="sweep the [K, N] kernel's tiles")
    args = p.parse_args()
    dtype = jnp.bfloat16
    shapes = {"small": (1024, 512)} if args.cpu_smoke else LLAMA3_8B
    min_bytes = 1 << 20 if args.cpu_smoke else 1 << 29
    res = {
        "device": bm.default_device().device_kind,
        "jax": jax.__version__,
        "host": platform.node(),
    }
    res["limits"] = bm.card_limits(args.repeats)
    print(res, flush=True)
    for name, (k, n) in shapes.items():
        res[name] = measure_shape(k, n, args, dtype, min_bytes)
        report(name, res[name], args)
    if args.out:
        bm.write_json(args.out, res)


if __name__ == "__main__":
    main()
