"""The add + RMSNorm kernel's tiles at a decode step's rows: rows a program x warps against the
default tiles and XLA's fusion of the jnp form, Llama-3-8B's width (4,096), bf16.

A decode step runs this kernel twice a layer; at 100-128 rows an H200 profile showed ~5 us a
call (`add_rms_norm_d4096`, 321 us of a 10.6 ms step), where its bytes (x, h in; the sum and
the output out: 4 MB at 128 rows) take ~1 us. The default puts 2 rows in a program from 64
rows up, so 128 rows make 64 programs on 132 SMs. Each timed call runs `--layers` norms in a
chain, as a decoder does (each add takes the norm before it's output and sum), in one jit;
reports us a norm and each config's largest difference from the default's output.

    python scripts/bench_rms_norm.py --out bench/results/kernels-rms-norm-tiles-<card>.json
    python scripts/bench_rms_norm.py --rows 3,70 --width 256 --layers 2 --block-rows 1,2 --warps 1,4   # CPU smoke
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxinfer import benchmark as bm
from pallas_kernels.rms_norm import default_tiles, rms_norm, rms_norm_reference

EPS = 1e-5


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def chain(norm, scales):
    """(x, h) -> (x, h) after len(scales) adds + norms, each fed by the one before."""

    @jax.jit
    def run(state):
        x, h = state
        for scale in scales:
            out, x = norm(x, scale, h)
            h = out
        return x, h

    return run


def time_form(norm, rows: int, width: int, layers: int, interpret: bool) -> tuple[float, jax.Array]:
    """(us a norm, the first norm's output on fixed inputs)."""
    keys = jax.random.split(jax.random.key(rows), layers + 2)
    scales = [1 + 0.1 * jax.random.normal(k, (width,), jnp.bfloat16) for k in keys[2:]]
    setup = lambda: (
        jax.random.normal(keys[0], (rows, width), jnp.bfloat16),
        jax.random.normal(keys[1], (rows, width), jnp.bfloat16),
    )
    x, h = setup()
    first = norm(x, scales[0], h)[0]
    sec = bm.pipelined_time(
        chain(norm, scales), setup=setup, repeats=3, min_time=None if interpret else 0.1
    )
    return sec / layers * 1e6, first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,32,100,128,256,512,8192")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=64, help="norms a timed call (2 a layer)")
    p.add_argument("--block-rows", default="1,2,4,8")
    p.add_argument("--warps", default="1,2,4,8,16")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    rows_out = []
    for rows in ints(args.rows):
        default = default_tiles(rows, args.width)
        forms = {"default": lambda x, s, h: rms_norm(x, s, EPS, h, interpret=interpret)}
        forms["xla"] = lambda x, s, h: rms_norm_reference(x, s, EPS, h)
        for br in ints(args.block_rows):
            for w in ints(args.warps):
                if (br, w) != default and br <= max(rows, 1):
                    forms[f"{br}x{w}"] = lambda x, s, h, t=(br, w): rms_norm(
                        x, s, EPS, h, tiles=t, interpret=interpret
                    )
        base = None
        for name, norm in forms.items():
            try:
                us, out = time_form(norm, rows, args.width, args.layers, interpret)
            except Exception as e:  # a config the card can't launch: recorded, not fatal
                row = dict(rows=rows, form=name, error=f"{type(e).__name__}: {e}"[:300])
            else:
                base = out if name == "default" else base
                diff = None
                if base is not None:
                    diff = float(
                        jnp.max(jnp.abs(out.astype(jnp.float32) - base.astype(jnp.float32)))
                    )
                row = dict(
                    rows=rows, width=args.width, form=name, us=us, max_abs_diff_vs_default=diff
                )
                if name == "default":
                    row["tiles"] = list(default)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    if args.out:
        bm.write_json(args.out, {**bm.report_header(), "args": vars(args), "rows": rows_out})


if __name__ == "__main__":
    main()
