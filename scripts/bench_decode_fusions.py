"""The matmul half of a decode layer -- o, add + RMSNorm, gate/up, SiLU x up, down, add + RMSNorm --
at a decode program's rows over L layers of Llama-3-8B's weights (distinct weights, more bytes
than L2), in two forms:

  xla     XLA's dots (cuBLAS, as the engine compiles its decode programs of 128 rows and more),
          SiLU x up by XLA, the Pallas add + RMSNorm kernel
  swiglu  the same with gate/up and SiLU x up in one Mosaic GPU kernel
          (`pallas_kernels.decode_matmul.decode_swiglu`): the [M, 2F] product never leaves the SMs

Reports each form's time per layer against the weights' read floor and its error against a
float32 layer, and the fused kernel alone over its configs against XLA's gate/up and SiLU x up
(us a call over rotating weights).

    python scripts/bench_decode_fusions.py --out bench/results/decode-fusions-<card>.json
    python scripts/bench_decode_fusions.py --smoke   # CPU: tiny shapes, Mosaic GPU interpreter
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp

from jaxinfer import benchmark as bm
from jaxinfer.runner import CUBLAS_OPTIONS
from pallas_kernels.rms_norm import rms_norm

dm = importlib.import_module("pallas_kernels.decode_matmul")
FORMS = ("xla", "swiglu")
EPS = 1e-5


def config_list(text: str) -> list:
    """ "tile_n,tile_k,stages,splits[,cluster];..." -> [DecodeMatmulConfig]."""
    return [dm.DecodeMatmulConfig(*(int(v) for v in c.split(","))) for c in text.split(";") if c]


def cfg_row(c) -> list[int]:
    return [c.tile_n, c.tile_k, c.stages, c.splits, c.cluster]


def make_layers(count: int, d: int, f: int, o_nk: bool) -> list[tuple]:
    """count layers of (o, gate_up, down, two norm scales): o [D, D] as W [N, K] (the decoder's
    layout) or [K, N]; gate_up [D, 2, F]; down [F, D]; scaled so activations stay ~1."""
    layers = []
    for i in range(count):
        k = jax.random.split(jax.random.key(i), 5)

        def normal(key, shape, fan_in):
            w = jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5
            return w.astype(jnp.bfloat16)

        o = normal(k[0], (d, d), d)
        scales = [(1 + 0.1 * jax.random.normal(kk, (d,))).astype(jnp.bfloat16) for kk in k[3:]]
        o = o if o_nk else o.T.copy()
        layers.append((o, normal(k[1], (d, 2, f), d), normal(k[2], (f, d), f), *scales))
    return layers


def xla_swiglu(h, gate_up):
    gu = jnp.einsum("MD,DCF->MCF", h, gate_up)
    return jax.nn.silu(gu[:, 0]) * gu[:, 1]


def tail(form: str, cfg, o_nk: bool, interpret: bool):
    """One layer's matmul half as `form` computes it: (x, a, weights) -> (x, a), x the residual
    stream, a the attention's output (for the next layer: the stream's norm)."""

    def mlp_in(h, gate_up):
        if form == "swiglu":
            return dm.decode_swiglu(h, gate_up, config=cfg, interpret=interpret)
        return xla_swiglu(h, gate_up)

    def layer(x, a, weights):
        o, gate_up, down, scale1, scale2 = weights
        h, x = rms_norm(x, scale1, EPS, jnp.dot(a, o.T) if o_nk else jnp.dot(a, o))
        a, x = rms_norm(x, scale2, EPS, jnp.dot(mlp_in(h, gate_up), down))
        return x, a

    return layer


def reference_layer(x, a, weights, o_nk: bool):
    """The same layer in float32 (the weights' bf16 values, no rounding between steps)."""
    o, gate_up, down, scale1, scale2 = (w.astype(jnp.float32) for w in weights)
    hp = jax.lax.Precision.HIGHEST

    def norm(v, s):
        return v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + EPS) * s

    x = x.astype(jnp.float32) + jnp.dot(a.astype(jnp.float32), o.T if o_nk else o, precision=hp)
    gu = jnp.einsum("MD,DCF->MCF", norm(x, scale1), gate_up, precision=hp)
    x = x + jnp.dot(jax.nn.silu(gu[:, 0]) * gu[:, 1], down, precision=hp)
    return x, norm(x, scale2)


def time_tail(layer, layers, x, a, interpret: bool, repeats: int) -> float:
    """Seconds per layer of the L-layer tail as one program, calls chained."""

    def program(state, ws):
        x, a = state
        for w in ws:
            x, a = layer(x, a, w)
        return x, a

    fn = jax.jit(program, compiler_options=None if interpret else CUBLAS_OPTIONS)
    min_time = None if interpret else 0.2
    seconds = bm.pipelined_time(
        lambda s: fn(s, layers), repeats=repeats, setup=lambda: (x, a), min_time=min_time
    )
    return seconds / len(layers)


def sweep_swiglu(cfgs, layers, h, interpret: bool, repeats: int) -> list[dict]:
    """The fused kernel alone per config, and XLA's gate/up + SiLU x up (cfg "xla"), us a call
    over the layers' rotating weights, fastest first, then the configs that failed."""
    # Each call its own h: with one h for all, XLA's dot merger joins the calls into one matmul.
    keys = jax.random.split(jax.random.key(1), len(layers))
    hs = [h] + [jax.random.normal(kk, h.shape, h.dtype) for kk in keys[1:]]
    sets = [(hh, w[1]) for hh, w in zip(hs, layers)]

    def timed(fn, options=None):
        t = bm.time_over_sets(
            fn,
            sets,
            repeats=repeats,
            min_time=None if interpret else 0.05,
            compiler_options=options,
        )
        return 1e6 * t

    rows = [{"cfg": "xla", "us": timed(xla_swiglu, CUBLAS_OPTIONS)}]
    for c in cfgs:
        fn = lambda h, gu, c=c: dm.decode_swiglu(h, gu, config=c, interpret=interpret)  # noqa: E731
        try:
            rows.append({"cfg": cfg_row(c), "us": timed(fn)})
        except Exception as e:  # noqa: BLE001 -- a config the compiler rejects: its error is its row
            rows.append({"cfg": cfg_row(c), "error": bm.error_text(e)})
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    return ok + [r for r in rows if "us" not in r]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=128, help="M: a decode program's rows")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--configs",
        type=config_list,
        default=config_list("128,64,4,1;128,64,4,1,2;128,64,3,1;64,64,6,1"),
        help="decode_swiglu's configs: tile_n,tile_k,stages,1[,cluster];...",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    if interpret and not args.smoke:
        p.error("a GPU run (Hopper); on the CPU pass --smoke")
    d, f, o_nk = (4096, 14336, True) if not args.smoke else (128, 128, False)
    if args.smoke:
        args.rows, args.layers, args.repeats = 100, 2, 1
        args.configs = [dm.DecodeMatmulConfig(64, 64, 2, 1)]
    layers = make_layers(args.layers, d, f, o_nk)
    keys = jax.random.split(jax.random.key(99), 2)
    x = (3 * jax.random.normal(keys[0], (args.rows, d))).astype(jnp.bfloat16)
    a = jax.random.normal(keys[1], (args.rows, d)).astype(jnp.bfloat16)
    h = rms_norm(x, layers[0][3], EPS)[0]

    kernel = sweep_swiglu(args.configs, layers, h, interpret, args.repeats)
    print("swiglu alone", json.dumps(kernel), flush=True)
    ours = [r for r in kernel if "us" in r and r["cfg"] != "xla"]
    best = dm.DecodeMatmulConfig(*ours[0]["cfg"]) if ours else None
    read_floor_us = (d * d + 3 * d * f) * 2 / 4.4e12 * 1e6  # a `sum`'s read rate on an H200
    want_x, want_a = reference_layer(x, a, layers[0], o_nk)
    forms = {}
    for form in FORMS if best else FORMS[:1]:
        layer = tail(form, best, o_nk, interpret)
        us = time_tail(layer, layers, x, a, interpret, args.repeats) * 1e6
        got_x, got_a = jax.jit(layer)(x, a, layers[0])
        forms[form] = {
            "us_per_layer": us,
            "over_floor": us / read_floor_us,
            "err_x": bm.max_rel_err(got_x, want_x),
            "err_norm": bm.max_rel_err(got_a, want_a),
        }
        print(form, json.dumps(forms[form]), flush=True)
    print(f"read floor {read_floor_us:.1f} us a layer; swiglu config {best}")
    if args.out:
        report = {**bm.report_header(), "rows": args.rows, "layers": args.layers}
        report |= {"read_floor_us": read_floor_us, "config": best and cfg_row(best)}
        bm.write_json(args.out, {**report, "swiglu_alone": kernel, "forms": forms})


if __name__ == "__main__":
    main()
