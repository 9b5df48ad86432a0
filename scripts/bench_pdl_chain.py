"""Kernel boundaries in a chain of dependent decode matmuls: L matmuls of 128 rows, each
W_i [8192, 8192] bf16 (128 CTAs of 64 columns, one wave) fed the one before's output, run as
XLA's dot (cuBLAS, the peer), as the Mosaic GPU decode matmul (also with wider tiles and K
split), as it with `pdl` (the next kernel launches at once and loads its first weight tiles
before it waits for the one before), and as one persistent kernel (`decode_matmul_chain`: the
CTAs stay resident and meet at a grid barrier between layers, each layer's first weight tiles
loaded before it). XLA, the decode matmul and `pdl` also run with a small elementwise kernel (a
scale, like a norm's) between the matmuls, as in a layer. The control: the same weights side
by side as one wide weight, one matmul with no dependencies (`xla_wide`, `mosaic_wide`, and
`mosaic_wide_n256` with 256-column tiles). Time per matmul of each against the read floor, and
whether the Mosaic chains' outputs are bitwise equal to the kernel's one by one. Hopper only;
run once as is and once under XLA_FLAGS=--xla_gpu_enable_pdl=true; `--rows` below 128 shows
the tensor cores' share (the Mosaic kernel computes 128 rows whatever x has).

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


def chain_fn(impl: str, between: bool):
    """The chain x -> x @ W_1 -> ... as one jitted function; `impl` is xla or a key of the
    decode matmul configs below."""
    cfg = {
        "mosaic": dm.DecodeMatmulConfig(64, 128, 4),
        "pdl": dm.DecodeMatmulConfig(64, 128, 4, pdl=True),
        # wider tiles, K split in two: half the x bytes per weight byte, f32 partials summed
        "mosaic_n128_s2": dm.DecodeMatmulConfig(128, 64, 5, 2),
        # 256-column tiles (x 1 byte in 3), K split in four to keep one wave of 128 CTAs
        "mosaic_n256_s4": dm.DecodeMatmulConfig(256, 64, 3, 4),
    }.get(impl)

    def matmul(x, w):
        if impl == "xla":
            return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        return dm.decode_matmul(x, w, w_nk=False, config=cfg)

    def chain(x, *ws):
        for w in ws:
            x = matmul(x, w)
            if between:  # one small kernel of its own between two matmuls
                scale = jax.lax.rsqrt(1.0 + jnp.abs(x[:, :1].astype(jnp.float32)))
                x = (x.astype(jnp.float32) * scale).astype(x.dtype)
        return x

    return chain


def persistent(x, ws, layers: int, want, report: dict) -> None:
    """The chain as one persistent kernel, over two tilings of one wave; `want` is the
    Mosaic kernels' chain one by one (the same tiles: the same bits)."""
    for name, cfg in (
        ("chain", dm.DecodeMatmulConfig(64, 128, 4)),
        ("chain_k64", dm.DecodeMatmulConfig(64, 64, 8)),
    ):
        fn = lambda x, ws, cfg=cfg: dm.decode_matmul_chain(x, ws, config=cfg)  # noqa: E731
        try:
            got = np.asarray(jax.jit(fn)(x, ws).astype(jnp.float32))
            report[f"{name}_finite"] = bool(np.isfinite(got).all())
            if want is not None:
                report[f"{name}_equal"] = bool(np.array_equal(got, want))
            sec = bm.time_over_sets(fn, [(x, ws)], repeats=5, min_time=0.2)
            report[f"{name}_us_per_matmul"] = sec * 1e6 / layers
        except Exception as e:  # noqa: BLE001 - a failed variant is a result, not the end
            report[f"{name}_error"] = bm.error_text(e)
        print(json.dumps(report), flush=True)


def wide(x, ws, report: dict) -> None:
    """The control: the same weights side by side as one [K, L * N] weight, one matmul (no
    dependency between the parts), per part; what the chain's dependencies cost is the gap."""
    w = jnp.concatenate(ws, axis=1)
    cfg = dm.DecodeMatmulConfig(64, 128, 4)
    wide_tiles = dm.DecodeMatmulConfig(256, 64, 4, 1, 2)  # gate/up's best at 128 rows
    fns = {
        "xla_wide": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
        "mosaic_wide": lambda x, w: dm.decode_matmul(x, w, w_nk=False, config=cfg),
        "mosaic_wide_n256": lambda x, w: dm.decode_matmul(x, w, w_nk=False, config=wide_tiles),
    }
    for name, fn in fns.items():
        try:
            sec = bm.time_over_sets(fn, [(x, w)], repeats=5, min_time=0.2)
            report[f"{name}_us_per_matmul"] = sec * 1e6 / len(ws)
        except Exception as e:  # noqa: BLE001 - a failed variant is a result, not the end
            report[f"{name}_error"] = bm.error_text(e)
        print(json.dumps(report), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16, help="matmuls in the chain")
    p.add_argument("--size", type=int, default=8192, help="K = N of each weight")
    p.add_argument("--rows", type=int, default=128, help="x's rows, at most 128")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    n = args.size
    keys = jax.random.split(jax.random.key(0), args.layers + 1)
    x = jax.random.normal(keys[0], (args.rows, n), jnp.bfloat16)
    ws = [jax.random.normal(k, (n, n), jnp.bfloat16) * (n**-0.5) for k in keys[1:]]
    report = bm.report_header()
    report["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    report["rows"] = args.rows
    report["floor_us"] = n * n * 2 / 4.4e12 * 1e6
    for between in (False, True):
        outs = {}
        more = () if between else ("mosaic_n128_s2", "mosaic_n256_s4")
        for impl in ("xla", "mosaic", "pdl") + more:
            chain = chain_fn(impl, between)
            name = f"{impl}{'_between' if between else ''}"
            try:
                outs[impl] = np.asarray(jax.jit(chain)(x, *ws).astype(jnp.float32))
                sec = bm.time_over_sets(chain, [(x, *ws)], repeats=5, min_time=0.2)
                report[f"{name}_us_per_matmul"] = sec * 1e6 / args.layers
            except Exception as e:  # noqa: BLE001 - a failed variant is a result, not the end
                report[f"{name}_error"] = bm.error_text(e)
            print(json.dumps(report), flush=True)
        if "mosaic" in outs and "pdl" in outs:
            tag = "_between" if between else ""
            report[f"pdl_equal{tag}"] = bool(np.array_equal(outs["mosaic"], outs["pdl"]))
            report[f"pdl_finite{tag}"] = bool(np.isfinite(outs["pdl"]).all())
        if not between:
            persistent(x, jnp.stack(ws), args.layers, outs.get("mosaic"), report)
            wide(x, ws, report)
    print(json.dumps(report), flush=True)
    if args.out:
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
