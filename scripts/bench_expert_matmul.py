"""One MoE layer's expert work on a Hopper GPU: the grouped-matmul dispatch (Pallas Triton,
`moe.dispatch`) against the block-aligned Mosaic GPU kernels (`moe.aligned_dispatch`), each
as a whole (layout, gathers, gate/up, SiLU x up, down, the weighted sum), plus each aligned
kernel alone over a sweep of tiles. Mixtral-8x7B's sizes by default.

    python scripts/bench_expert_matmul.py --out bench/results/expert-matmul-<card>.json

Cases: decode batches B (2B pairs, experts drawn uniformly), prefill tokens (likewise), and,
with --routed FILE (`moe-routing-random-mixtral-*.json`), the 32 layers' expert sizes of a
random-weight Mixtral's decode step at 500 sequences, summed over the layers. Floors: the
weights of the experts that got rows at the read bandwidth measured here, and the flops at the
matmul peak measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxinfer import benchmark as bm


def parse_tiles(text: str):
    """ "tile_n,tile_k,stages[,splits]" items, ';'-separated."""
    from pallas_kernels.decode_matmul import DecodeMatmulConfig

    out = []
    for item in filter(None, text.split(";")):
        tn, tk, stages, *rest = (int(v) for v in item.split(","))
        out.append(DecodeMatmulConfig(tn, tk, stages, rest[0] if rest else 1))
    return out


def assignments(sizes, seed: int):
    """An expert per pair with these counts, shuffled: int32 [sum(sizes)]."""
    import numpy as np

    ex = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    np.random.default_rng(seed).shuffle(ex)
    return ex


def cases(args):
    """(name, [expert arrays of one pair count]): one array per layer of the case."""
    import numpy as np

    out = []
    for b in bm.int_list(args.decode_batches):
        ex = np.random.default_rng(b).integers(0, args.experts, 2 * b).astype(np.int32)
        out.append((f"decode_B{b}", [ex]))
    for t in bm.int_list(args.prefill_tokens):
        ex = np.random.default_rng(t).integers(0, args.experts, 2 * t).astype(np.int32)
        out.append((f"prefill_T{t}", [ex]))
    if args.routed:
        routed = json.load(open(args.routed))["decode_sizes"]
        out.append(("routed_500_seqs", [assignments(s, i) for i, s in enumerate(routed)]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--decode-batches", default="1,8,32,64,100,128,256,500")
    p.add_argument("--prefill-tokens", default="2048,8192")
    p.add_argument("--routed", default="")
    p.add_argument("--gate-tiles", default="128,64,4;128,64,3;64,64,6;128,128,2;256,64,2")
    p.add_argument("--down-tiles", default="128,64,4;128,64,4,2;128,64,4,4;64,64,6;128,128,3")
    p.add_argument("--sweep-cases", default="decode_B1,decode_B100,decode_B500,prefill_T8192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls queued per timed run")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.models import moe

    limits = bm.card_limits(3) if jax.default_backend() == "gpu" else bm.NO_LIMITS
    read_bw = limits["copy_read_plus_write_GBps"] * 1e9
    peak = limits["bf16_matmul_TFLOPs"] * 1e12
    e, d, f = args.experts, args.d, args.f
    key = jax.random.key(0)
    gate_up = (jax.random.normal(key, (e, d, 2, f), jnp.float32) * d**-0.5).astype(jnp.bfloat16)
    down = (jax.random.normal(key, (e, f, d), jnp.float32) * f**-0.5).astype(jnp.bfloat16)
    report = {"device": bm.default_device().device_kind, "jax": jax.__version__}
    report.update(limits=limits, args=vars(args), cases={})

    def timed(fn, *a):
        return bm.pipelined_time(lambda _: fn(*a), repeats=args.repeats, calls=args.calls)

    triton = jax.jit(lambda x, w, ex, gu, dn: moe.dispatch(x, w, ex, gu, dn, "pallas"))
    aligned = jax.jit(moe.aligned_dispatch)
    gate_tiles, down_tiles = parse_tiles(args.gate_tiles), parse_tiles(args.down_tiles)

    for name, layers in cases(args):
        r = layers[0].shape[0]
        t = r // 2
        x = jax.random.normal(jax.random.key(r), (t, d), jnp.bfloat16)
        w = jax.nn.softmax(jax.random.normal(jax.random.key(r + 1), (t, 2)), axis=-1)
        row = {"pairs": r, "layers": len(layers), "us": {}}
        active = sum(len(np.unique(ex)) for ex in layers)
        row["floor_bytes_us"] = active * 3 * d * f * 2 / read_bw * 1e6
        row["floor_flops_us"] = len(layers) * r * 6 * d * f / peak * 1e6
        exs = [jnp.asarray(ex.reshape(t, 2)) for ex in layers]
        outs = {}
        for impl, fn in (("triton", triton), ("aligned", aligned)):
            try:
                t0 = time.perf_counter()
                outs[impl] = jax.block_until_ready(fn(x, w, exs[0], gate_up, down))
                row[f"{impl}_first_call_s"] = time.perf_counter() - t0
                row["us"][impl] = sum(timed(fn, x, w, ex, gate_up, down) for ex in exs) * 1e6
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                row[f"{impl}_error"] = bm.error_text(err)
        if len(outs) == 2:
            row["max_rel_err_aligned_vs_triton"] = float(
                bm.max_rel_err(outs["aligned"], outs["triton"])
            )
        if name in args.sweep_cases.split(","):
            row["sweep"] = sweep(args, layers, x, gate_up, down, gate_tiles, down_tiles, timed)
        report["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        bm.write_json(args.out, report)
    print(f"\n{report['device']}  jax {report['jax']}  {limits}")
    for name, row in report["cases"].items():
        us = row["us"]
        tri, ali = us.get("triton", float("nan")), us.get("aligned", float("nan"))
        print(
            f"{name:18s} triton {tri:9.1f} us  aligned {ali:9.1f} us  ({tri / ali:.2f}x)  "
            f"floors: bytes {row['floor_bytes_us']:8.1f}  flops {row['floor_flops_us']:8.1f}"
        )
    return 0


def sweep(args, layers, x, gate_up, down, gate_tiles, down_tiles, timed) -> dict:
    """Each aligned kernel alone per tile config, summed over the case's layers (us)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import expert_matmul as em
    from pallas_kernels.grouped_matmul import grouped_matmul

    e = gate_up.shape[0]
    t = x.shape[0]
    token = jnp.arange(2 * t, dtype=jnp.int32) // 2
    prepared = []
    for ex in layers:
        lay = em.aligned_layout(jnp.asarray(ex), e)
        xa = em.to_layout(x, token, lay)
        h = em.expert_swiglu(lay.block_expert, xa, gate_up)
        prepared.append((lay.block_expert, xa, h))
    out = {"gate": {}, "down": {}}
    # The grouped matmul (Pallas Triton) on each projection alone, its default tiles: the peer.
    gmm = jax.jit(grouped_matmul)
    w1 = gate_up.reshape(e, gate_up.shape[1], -1)
    for kind, w, width in (("gate", w1, gate_up.shape[1]), ("down", down, down.shape[1])):
        us = 0.0
        for ex in layers:
            sizes = jnp.bincount(jnp.asarray(ex), length=e).astype(jnp.int32)
            rows = jax.random.normal(jax.random.key(1), (ex.shape[0], width), jnp.bfloat16)
            us += timed(gmm, rows, w, sizes)
        out[kind]["grouped_matmul (Triton)"] = us * 1e6
    for kind, tiles in (("gate", gate_tiles), ("down", down_tiles)):
        for cfg in tiles:
            label = f"{cfg.tile_n},{cfg.tile_k},{cfg.stages},{cfg.splits}"
            try:
                if kind == "gate":
                    fn = jax.jit(lambda b, a, w, c=cfg: em.expert_swiglu(b, a, w, config=c))
                    us = sum(timed(fn, be, xa, gate_up) for be, xa, _ in prepared)
                else:
                    fn = jax.jit(lambda b, a, w, c=cfg: em.expert_matmul(b, a, w, config=c))
                    us = sum(timed(fn, be, h, down) for be, _, h in prepared)
                out[kind][label] = us * 1e6
            except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                out[kind][label] = bm.error_text(err)
    return out


if __name__ == "__main__":
    sys.exit(main())
