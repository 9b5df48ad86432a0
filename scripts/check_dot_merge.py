"""Which decode-matmul rotations XLA's GPU compiler joins when every call shares one x: the form
`bench_decode_matmul.py` timed before each call got its own x (x closed over, one dot a weight,
as many weights as fill 1 GiB), compiled as the timing compiled it, with XLA's GEMMs and with
cuBLAS forced; GEMM kernels and concatenates in the optimized program. Compile only.

    python scripts/check_dot_merge.py --out bench/results/decode-matmul-joined-rotations-<card>.json
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
from bench_decode_matmul import SHAPES, rotation_count  # a sibling script: sys.path[0] is scripts/

from jaxinfer import benchmark as bm
from jaxinfer.runner import CUBLAS_OPTIONS


def joined(m: int, k: int, n: int, options) -> dict:
    count = rotation_count(k, n, 1 << 30)  # the benchmark's default --min-bytes
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    ws = [jax.ShapeDtypeStruct((k, n), jnp.bfloat16)] * count
    group = jax.jit(lambda ss: [jnp.dot(x, w) for w in ss], compiler_options=options)
    text = group.lower(ws).compile().as_text()
    concats = len(re.findall(r"= \S+ concatenate\(", text))
    return {"calls": count, "gemm_kernels": bm.gemm_calls(text), "concatenates": concats}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=bm.int_list, default=[128, 100, 32])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for m in args.rows:
        for name, (k, n) in SHAPES.items():
            for form, options in (("xla", None), ("xla_cublas", CUBLAS_OPTIONS)):
                row = {"shape": name, "m": m, "form": form, **joined(m, k, n, options)}
                print(row, flush=True)
                rows.append(row)
    if args.out:
        bm.write_json(args.out, {**bm.report_header(), "rows": rows})


if __name__ == "__main__":
    main()
