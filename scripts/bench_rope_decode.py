"""The decode step's attention as one kernel against two: `rope_paged_decode` (RoPE, the K/V
write and the paged decode attention in one launch; also with `new_token_last`, the new token
joining after the kv loop) against `rope_write` then `paged_attention`, at Llama-3-8B's heads
(32 query, 8 kv, H 128), pages of 16 tokens.

Each timed call runs `--layers` layers' attention back to back, each over a pool of its own
(as an engine's step does: a small batch's KV then comes from HBM, not from the L2 of the layer
before), the pools donated and updated in place. Reports us a layer for each form, the KV-read
GB/s of the fused ones, and how far their outputs are from the two kernels' (the first form:
bit for bit) and whether their pools are the same.

    python scripts/bench_rope_decode.py --out bench/results/kernels-rope-decode-<card>.json
    python scripts/bench_rope_decode.py --cases 2x40 --layers 2     # CPU smoke (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer.models.layers import rope_inv_freq
from pallas_kernels.rope_write import rope_write

pa = importlib.import_module("pallas_kernels.paged_attention")  # the package exports a function
K, G, H, PAGE = 8, 4, 128, 16
CASES = "1x600,8x1000,32x1000,100x1500,256x420"  # B x context (the new token included)


def inputs(b: int, ctx: int, layers: int, seed: int = 0):
    """Per layer (qkv [B, K, G + 2, H], k_pages, v_pages) and the step's shared block tables
    [B, W], lengths, positions and slots (each sequence's pages shuffled in the pool)."""
    rng = np.random.default_rng(seed)
    per_seq = -(-ctx // PAGE)
    pool = b * per_seq + 8
    table = rng.permutation(pool)[: b * per_seq].reshape(b, per_seq).astype(np.int32)
    last = ctx - 1
    slots = table[:, last // PAGE] * PAGE + last % PAGE
    keys = jax.random.split(jax.random.key(seed), 3 * layers)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16)
    per_layer = [
        (
            normal(keys[3 * i], (b, K, G + 2, H)),
            normal(keys[3 * i + 1], (K, pool, PAGE, H)),
            normal(keys[3 * i + 2], (K, pool, PAGE, H)),
        )
        for i in range(layers)
    ]
    shared = (
        jnp.asarray(table),
        jnp.full((b,), ctx, jnp.int32),
        jnp.full((b,), last, jnp.int32),
        jnp.asarray(slots, jnp.int32),
    )
    return per_layer, shared


FORMS = {  # name: None for the two kernels, else the fused kernel's config
    "two_kernels": None,
    "fused": pa.PagedConfig(),
    "fused_last": pa.PagedConfig(new_token_last=True),
}


def step_fn(form: str, qkvs, shared, inv_freq, interpret: bool):
    """pools (a tuple over layers of (k_pages, v_pages)) -> (outputs, pools): every layer's
    attention, in one jit that donates the pools."""
    table, lengths, positions, slots = shared
    config = FORMS[form]

    def layer(qkv, kp, vp):
        if config is not None:
            return pa.rope_paged_decode(
                qkv,
                kp,
                vp,
                table,
                lengths,
                positions,
                slots,
                inv_freq,
                config=config,
                interpret=interpret,
            )
        q, kp, vp = rope_write(qkv, kp, vp, positions, slots, inv_freq, interpret=interpret)
        return pa.paged_attention(q, kp, vp, table, lengths, interpret=interpret), kp, vp

    @functools.partial(jax.jit, donate_argnums=0)
    def step(pools):
        outs, new_pools = [], []
        for qkv, (kp, vp) in zip(qkvs, pools):
            out, kp, vp = layer(qkv, kp, vp)
            outs.append(out)
            new_pools.append((kp, vp))
        return outs, tuple(new_pools)

    return step


def run_case(b: int, ctx: int, layers: int, interpret: bool) -> dict:
    per_layer, shared = inputs(b, ctx, layers)
    qkvs = [p[0] for p in per_layer]
    fresh_pools = lambda: tuple((kp.copy(), vp.copy()) for _, kp, vp in per_layer)
    inv_freq = jnp.asarray(rope_inv_freq(H, 500000.0, None))
    row = dict(B=b, ctx=ctx, layers=layers)
    results = {}
    for name in FORMS:
        step = step_fn(name, qkvs, shared, inv_freq, interpret)
        outs, pools = step(fresh_pools())
        results[name] = (outs, pools)
        sec = bm.pipelined_time(
            lambda pools, step=step: step(pools)[1],
            setup=fresh_pools,
            repeats=3,
            min_time=None if interpret else 0.2,
        )
        row[f"{name}_us"] = sec / layers * 1e6
    o2, p2 = results["two_kernels"]
    same = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))
    kv_bytes = b * ctx * K * H * 2 * 2  # K and V, bf16, one layer
    for name in ("fused", "fused_last"):
        o1, p1 = results[name]
        # the new token last sums in another order: its output within rounding, its pools equal
        row[f"{name}_bitwise_equal"] = same(o1, o2)
        row[f"{name}_pools_equal"] = same(jax.tree.leaves(p1), jax.tree.leaves(p2))
        row[f"{name}_max_abs_diff"] = max(
            float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
            for x, y in zip(o1, o2)
        )
        row[f"{name}_saved_us"] = row["two_kernels_us"] - row[f"{name}_us"]
        row[f"{name}_GBps"] = kv_bytes / (row[f"{name}_us"] * 1e-6) / 1e9
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=CASES, help="comma list of BxCONTEXT")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    interpret = jax.default_backend() == "cpu"
    rows = []
    for case in args.cases.split(","):
        b, ctx = (int(x) for x in case.split("x"))
        row = run_case(b, ctx, args.layers, interpret)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        report = {**bm.report_header(), "rows": rows}
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
