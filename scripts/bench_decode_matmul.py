"""A decode batch's matmuls (M rows, Llama-3-8B's weights): XLA's dot over W [K, N] and W [N, K]
(as XLA chooses, and with cuBLAS forced, as the engine compiles its decode programs), torch's
(cuBLAS, what a PyTorch engine runs) over both, the Triton grouped matmul
(`pallas_kernels.grouped_matmul`) with one group over a sweep of its tiles, and with `--mgpu` the
Mosaic GPU decode matmul (`pallas_kernels.decode_matmul`, Hopper only) over a sweep of its
configs, in the layout the decoder stores each weight in. Time per call over rotating (x,
weight) sets (more bytes than L2), one sync per run; the weight-read floor beside them. Each
call has its own x: with one x for all, XLA merged the calls into one matmul.

    python scripts/bench_decode_matmul.py --rows 100 --out bench/results/decode-matmul-m100-<card>.json
    python scripts/bench_decode_matmul.py --rows 128 --mgpu --no-triton --out bench/results/decode-matmul-m128-mgpu-<card>.json
    python scripts/bench_decode_matmul.py --rows 128 --no-triton --shapes qkv,o,gate_up,qkv_o_gate_up --out bench/results/decode-matmul-m128-one-kernel-<card>.json
    python scripts/bench_decode_matmul.py --rows 16 --quick --shapes o   # CPU smoke (interpret mode)

Each row: shape, k, n, m, w_nk (the decoder's layout is W [N, K]), xla_us, xla_nk_us,
xla_cublas_us, xla_cublas_nk_us, torch_us, torch_nk_us (GPU with torch only), gemms_per_call
(GPU: GEMM kernels in each XLA form's compiled rotation over its calls, 1.0 unless XLA joined
calls), `triton`:
[{cfg: [block_n, block_k, warps, stages, split_k], us, err}] fastest first, then the configs
that failed with their error (err: largest error against the float32 product, relative to its
largest value), and `mgpu` likewise with cfg [tile_n, tile_k, stages, splits, cluster].
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer.models.layers import dense
from jaxinfer.runner import CUBLAS_OPTIONS

gm = importlib.import_module("pallas_kernels.grouped_matmul")  # the package exports a function
dm = importlib.import_module("pallas_kernels.decode_matmul")
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "down": (14336, 4096), "gate_up": (4096, 28672)}
W_NK = {"qkv": True, "o": True, "down": False, "gate_up": False}  # the decoder's layouts
# Not a weight of the model: q/k/v, o and gate/up side by side (the three with K = 4,096), one
# matmul for their bytes, against the three apart: what two kernels' boundaries cost.
SHAPES["qkv_o_gate_up"], W_NK["qkv_o_gate_up"] = (4096, 6144 + 4096 + 28672), False


def tiles(quick: bool) -> list:
    """block_m 128 (one work item holds the batch); (block_n, warps) x block_k x stages x split."""

    def cfg(bn, bk, warps, stages, split):  # by name: the config's fields are not in this order
        return gm.GroupedMatmulConfig(
            block_m=128, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split_k=split
        )

    if quick:
        return [cfg(64, 64, 4, 2, 2)]
    grid = itertools.product(((64, 4), (128, 4), (128, 8), (256, 8)), (64, 128), (3, 4), (1, 2, 4))
    return [cfg(bn, bk, w, st, sk) for (bn, w), bk, st, sk in grid]


def mgpu_configs(quick: bool, n: int, clusters: list[int]) -> list:
    """(tile_n, tile_k, stages) x splits x cluster of the Mosaic GPU kernel, those that make
    64-264 CTAs (one or two waves of 132 SMs)."""
    if quick:
        return [dm.DecodeMatmulConfig(128, 64, 4, 2)]
    tiles = ((64, 128, 4), (64, 64, 6), (128, 64, 4), (128, 64, 6), (128, 128, 3), (128, 128, 4))
    tiles += ((256, 64, 3), (256, 64, 4))
    grid = itertools.product(tiles, (1, 2, 4), clusters)
    cfgs = [dm.DecodeMatmulConfig(*t, splits=s, cluster=c) for t, s, c in grid]
    return [c for c in cfgs if 64 <= n // c.tile_n * c.splits <= 264]


def sweep(fn_for, cfgs, cfg_row, sets, exact, timed) -> list[dict]:
    """Each config's time and error, fastest first, then the configs that failed (their error)."""
    tried = []
    for c in cfgs:
        fn = fn_for(c)
        try:
            out = np.asarray(jax.jit(fn)(*sets[0]), np.float32)
            err = float(np.abs(out - exact).max() / np.abs(exact).max())
            tried.append({"cfg": cfg_row(c), "us": timed(fn, sets), "err": err})
        except Exception as e:  # noqa: BLE001 -- a config the compiler rejects: its error is its row
            tried.append({"cfg": cfg_row(c), "error": f"{type(e).__name__}: {e}"[:160]})
    ok = sorted((r for r in tried if "us" in r), key=lambda r: r["us"])
    return ok + [r for r in tried if "us" not in r]


def torch_us(k: int, n: int, m: int, nk: bool, count: int) -> float:
    """torch: x @ W [K, N], or F.linear(x, W [N, K]) over `count` weights; 10 passes over them a
    run, median of 5."""
    import torch

    shape = (n, k) if nk else (k, n)
    ws = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    x = torch.randn((m, k), device="cuda", dtype=torch.bfloat16)
    f = (lambda w: torch.nn.functional.linear(x, w)) if nk else (lambda w: x @ w)
    for w in ws:
        f(w)
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            for w in ws:
                f(w)
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / (10 * count))
    return float(np.median(runs)) * 1e6


def rotation_count(k: int, n: int, min_bytes: int) -> int:
    """Weights [k, n] bf16 in a rotation: at least `min_bytes` of them, at least 2."""
    return max(2, -(-min_bytes // (k * n * 2)))


def rotation(k: int, n: int, m: int, count: int) -> list[tuple]:
    """`count` (x [m, k], W [k, n]) sets, each with its own x: calls that shared one x (a
    closure constant) were merged by XLA's dot merger into one matmul over the concatenated
    weights, which timed a wide matmul (Triton) or a copy of every weight and then one
    (cuBLAS), not a call."""
    keys = jax.random.split(jax.random.key(k + n), 2 * count)
    xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in keys[count:]]
    return [(x, jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.02) for x, kk in zip(xs, keys)]


def measure(name: str, k: int, n: int, m: int, args, interpret: bool) -> dict:
    count = rotation_count(k, n, args.min_bytes)
    sets = rotation(k, n, m, count)
    nk_sets = [(x, w.T.copy()) for x, w in sets]
    x = sets[0][0]
    min_time = None if interpret else 0.05

    def timed(fn, ss, options=None, name=None):
        texts = [] if name else None
        t = bm.time_over_sets(
            fn, ss, repeats=5, min_time=min_time, compiler_options=options, compiled_text=texts
        )
        if name and not interpret:  # 1.0 unless XLA joined calls (the row's time is not a call's)
            row.setdefault("gemms_per_call", {})[name] = bm.gemm_calls(texts[0]) / len(ss)
        return t * 1e6

    exact = jnp.dot(x.astype(jnp.float32), sets[0][1].astype(jnp.float32), precision="highest")
    exact = np.asarray(exact)
    row = {"shape": name, "k": k, "n": n, "m": m, "w_nk": W_NK[name]}
    nk_dot = lambda x, w: dense(x, w, 1)  # noqa: E731 -- W [N, K] as the decoder contracts it
    row["xla_us"] = timed(jnp.dot, sets, name="xla")
    row["xla_nk_us"] = timed(nk_dot, nk_sets, name="xla_nk")
    if not interpret:
        row["xla_cublas_us"] = timed(jnp.dot, sets, CUBLAS_OPTIONS, "xla_cublas")
        row["xla_cublas_nk_us"] = timed(nk_dot, nk_sets, CUBLAS_OPTIONS, "xla_cublas_nk")
    if not interpret and args.torch:
        row["torch_us"] = torch_us(k, n, m, False, count)
        row["torch_nk_us"] = torch_us(k, n, m, True, count)
    if args.triton:
        sizes = jnp.array([m], jnp.int32)
        # split_k > 1 only where the output tiles are few
        cfgs = [c for c in tiles(args.quick) if n < 16384 or c.split_k == 1]

        def triton_fn(c):
            work = gm.make_work_list(sizes, m, c.block_m)  # built once, outside the timed call
            return lambda x, w: gm._gmm_call(x, w[None], work, config=c, interpret=interpret)

        triton_row = lambda c: [c.block_n, c.block_k, c.num_warps, c.num_stages, c.split_k]
        row["triton"] = sweep(triton_fn, cfgs, triton_row, sets, exact, timed)
    if args.mgpu:
        w_nk, mine = W_NK[name], nk_sets if W_NK[name] else sets
        cfgs = [
            c
            for c in mgpu_configs(args.quick, n, args.clusters)
            if dm.why_not(m, k, n, x.dtype, c) is None
        ]
        mgpu_fn = lambda c: lambda x, w: dm.decode_matmul(x, w, w_nk=w_nk, config=c)
        mgpu_row = lambda c: [c.tile_n, c.tile_k, c.stages, c.splits, c.cluster]
        row["mgpu"] = sweep(mgpu_fn, cfgs, mgpu_row, mine, exact, timed)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100, help="M, the decode batch")
    p.add_argument("--quick", action="store_true", help="one Triton tile")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--no-triton", dest="triton", action="store_false", help="skip the Triton sweep")
    p.add_argument("--mgpu", action="store_true", help="sweep the Mosaic GPU kernel (Hopper)")
    p.add_argument("--clusters", type=bm.int_list, default=[1, 2, 4], help="its cluster sizes")
    p.add_argument("--min-bytes", type=int, default=1 << 30, help="weight bytes a rotation holds")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    if interpret:
        args.min_bytes = 1
        if args.mgpu:
            p.error("--mgpu runs on a Hopper GPU only (Mosaic GPU has no interpret mode)")
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        row = measure(name, k, n, args.rows, args, interpret)
        floor = k * n * 2 / 4.4e12 * 1e6  # the read bandwidth a sum reaches on an H200
        peers = {key: round(v, 1) for key, v in row.items() if key.endswith("_us")}
        print(f"{name} [{args.rows} x {k}] x [{k} x {n}]: {peers}, read floor {floor:.1f} us")
        if joined := {f: g for f, g in row.get("gemms_per_call", {}).items() if g != 1}:
            print(f"   XLA joined calls ({joined} GEMM kernels a call): not a call's time")
        for kind in ("triton", "mgpu"):
            for r in row.get(kind, [])[:4]:
                print(f"   {kind}", json.dumps(r), flush=True)
        rows.append(row)
    if args.out:
        report = {**bm.report_header(), "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
