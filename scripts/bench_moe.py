"""Grouped matmul at MoE sizes on a GPU: ours (Pallas) vs `jax.lax.ragged_dot` vs a dense matmul of
the same total size (prefill), and the weight-read bandwidth of decode-sized calls against the card's
copy bandwidth. The whole-model decode step is in bench_generate.py --models mixtral-8x7b.

    python scripts/bench_moe.py --out bench/results/moe-<card>.json
    python scripts/bench_moe.py --tokens 64 --d 64 --f 128 --decode-batches 1,2 --repeats 2 \\
        --configs 16,64,32,4,2 --interpret        # CPU smoke

Rows are routed uniformly at random (as random routers do), so every expert gets about
tokens * top_k / E rows. --configs sweeps tile sizes "bm,bn,bk,warps,stages" at the sweep sizes;
the table then uses the fastest per shape. Each config and peer of each shape is one unit of a
crash-resumable sweep (jaxinfer.benchmark): a native crash costs that figure, recorded as its
error, not the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import signal
import sys
import time

from jaxinfer import benchmark as bm

DEFAULT_CONFIGS = (
    "64,128,64,4,4;128,128,64,8,3;128,128,64,4,4;128,256,64,8,3;64,256,64,8,3;128,128,32,4,4"
)


def timed(fn, *args, repeats: int) -> float:
    """Seconds per call: 5 calls back to back, one sync, median of `repeats`."""
    return bm.pipelined_time(lambda _: fn(*args), repeats=repeats, calls=5)


def parse_configs(text: str):
    """ "bm,bn,bk,warps,stages[,split_k[,tail_m]]" items, ';'-separated."""
    from pallas_kernels.grouped_matmul import GroupedMatmulConfig

    out = []
    for item in filter(None, text.split(";")):
        block_m, bn, bk, warps, stages, *rest = (int(x) for x in item.split(","))
        out.append(
            GroupedMatmulConfig(
                block_m=block_m,
                block_n=bn,
                block_k=bk,
                num_warps=warps,
                num_stages=stages,
                split_k=rest[0] if rest else 1,
                tail_m=rest[1] if len(rest) > 1 else 0,
            )
        )
    return out


def time_configs(lhs, w, sizes, default, configs, args, journal, key, figures):
    """Our kernel with the default tiles, then each other config once, each one journal unit:
    yields (config, figures(jitted fn, seconds per call)), or (config, {"error": text}) for a
    config that fails."""
    import jax

    from pallas_kernels.grouped_matmul import grouped_matmul

    for cfg in dict.fromkeys([default, *configs]):  # default first, no repeats

        def run(c=cfg):
            fn = jax.jit(
                lambda a, b, s: grouped_matmul(a, b, s, config=c, interpret=args.interpret)
            )
            return figures(fn, timed(fn, lhs, w, sizes, repeats=args.repeats))

        yield cfg, journal.run(f"{key}/{cfg!r}", run, error_row={})


def _or_error(out: dict):
    return out["error"] if "error" in out else out


def routed_sizes(rows: int, experts: int, seed: int):
    import jax.numpy as jnp
    import numpy as np

    routes = np.random.default_rng(seed).integers(0, experts, rows)
    return jnp.asarray(np.bincount(routes, minlength=experts), jnp.int32)


def check_empty_groups(interpret: bool) -> dict:
    """Zero-row experts holding NaN weights: ours must stay finite and match ragged_dot."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_dense_loop

    key = jax.random.key(1)
    sizes = jnp.asarray([0, 300, 0, 0, 211, 1, 0, 0], jnp.int32)
    x = jax.random.normal(key, (520, 256), jnp.bfloat16)  # 8 padding rows
    w = jax.random.normal(key, (8, 256, 384), jnp.bfloat16)
    poisoned = jnp.where((sizes == 0)[:, None, None], jnp.nan, w).astype(jnp.bfloat16)
    out = grouped_matmul(x, poisoned, sizes, interpret=interpret)
    ref = grouped_matmul_dense_loop(x, w, sizes)
    return {
        "finite": bool(np.isfinite(np.asarray(out, np.float32)).all()),
        "padding_rows_zero": bool((np.asarray(out[512:], np.float32) == 0).all()),
        "max_rel_err": float(bm.max_rel_err(out, ref)),
    }


def mgpu_ragged_dot():
    """JAX's Hopper (Mosaic GPU) grouped matmul as a peer: what that backend reaches here."""
    import warnings

    import jax

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return jax.jit(
        lambda a, b, s: ragged_dot_mgpu.ragged_dot(
            a,
            b,
            group_sizes=s,
            block_m=128,
            block_n=128,
            block_k=64,
            max_concurrent_steps=4,
            grid_block_n=2,
        )
    )


def prefill_rows(args, configs, limits, journal) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import GroupedMatmulConfig, grouped_matmul_reference

    e, d, f, k = args.experts, args.d, args.f, args.top_k
    key = jax.random.key(0)
    rows = []
    for name, kd, nd in (("gate_up", d, 2 * f), ("down", f, d)):
        w = jax.random.normal(key, (e, kd, nd), jnp.bfloat16)
        for t in [int(x) for x in args.tokens.split(",")]:
            m = t * k
            sizes = routed_sizes(m, e, t)
            x = jax.random.normal(key, (m, kd), jnp.bfloat16)
            flops = 2 * m * kd * nd
            ref = jax.jit(grouped_matmul_reference)
            row = {"proj": name, "tokens": t, "rows": m, "K": kd, "N": nd, "configs": {}}
            default = GroupedMatmulConfig.default(m, e, jnp.bfloat16, kd, nd)

            def figures(fn, sec, x=x, w=w, sizes=sizes, flops=flops, ref=ref):
                return {
                    "ms": sec * 1e3,
                    "TFLOPs": flops / sec / 1e12,
                    "max_rel_err_vs_ragged_dot": float(
                        bm.max_rel_err(fn(x, w, sizes), ref(x, w, sizes))
                    ),
                }

            unit = f"prefill/{name}/T{t}"
            for cfg, out in time_configs(
                x, w, sizes, default, configs, args, journal, unit, figures
            ):
                row["configs"][repr(cfg)] = _or_error(out)
            timed_ok = {c: v for c, v in row["configs"].items() if isinstance(v, dict)}
            best = min(timed_ok, key=lambda c: timed_ok[c]["ms"])
            row.update(
                best_config=best,
                default_config=repr(default),
                ours_ms=timed_ok[best]["ms"],
                ours_TFLOPs=timed_ok[best]["TFLOPs"],
                default_TFLOPs=timed_ok.get(repr(default), {}).get("TFLOPs"),
                max_rel_err_vs_ragged_dot=timed_ok[best]["max_rel_err_vs_ragged_dot"],
            )
            peers = [
                ("ragged_dot", ref, (x, w, sizes)),
                ("dense", jax.jit(lambda a, b: a @ b), (x, w[0])),
            ]
            if not args.interpret:
                peers.append(("jax_mgpu_ragged_dot", mgpu_ragged_dot(), (x, w, sizes)))
            for peer, fn, fargs in peers:

                def run(peer=peer, fn=fn, fargs=fargs, flops=flops):
                    sec = timed(fn, *fargs, repeats=args.repeats)
                    return {f"{peer}_ms": sec * 1e3, f"{peer}_TFLOPs": flops / sec / 1e12}

                row.update(journal.run(f"{unit}/{peer}", run, error_key=f"{peer}_error"))
            row["ours_vs_dense"] = row["ours_TFLOPs"] / row.get("dense_TFLOPs", float("nan"))
            row["x_matmul_peak"] = row["ours_TFLOPs"] / limits["bf16_matmul_TFLOPs"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
    return rows


def decode_rows(args, limits, journal) -> list[dict]:
    """gate_up + down of one layer at decode sizes: bytes of the experts that got rows / time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_matmul import GroupedMatmulConfig, grouped_matmul

    e, d, f, k = args.experts, args.d, args.f, args.top_k
    key = jax.random.key(0)
    t0 = time.perf_counter()
    gate_up = jax.random.normal(key, (e, d, 2 * f), jnp.bfloat16)
    down = jax.random.normal(key, (e, f, d), jnp.bfloat16)
    jax.block_until_ready((gate_up, down))
    print(f"random weights: {time.perf_counter() - t0:.1f} s", flush=True)

    # Weights are arguments, not closed over: closed-over arrays become constants of the
    # executable, and 2.8 GB of constants took XLA 71 s to compile (H100, 2026-11-26).
    def layer(x, s, w1, w2, gmm):
        h = gmm(x, w1, s)
        return gmm(jax.nn.silu(h[:, :f]) * h[:, f:], w2, s)

    def ours_with(split_k: int):
        def gmm(a, b, c):
            cfg = GroupedMatmulConfig.default(a.shape[0], b.shape[0], a.dtype, *b.shape[1:])
            cfg = dataclasses.replace(cfg, split_k=split_k)
            return grouped_matmul(a, b, c, config=cfg, interpret=args.interpret)

        return jax.jit(lambda x, s, w1, w2: layer(x, s, w1, w2, gmm))

    ours = ours_with(1)
    impls = {"ours": ours, **{f"ours_sk{n}": ours_with(n) for n in args.decode_split_k if n > 1}}
    ragged = jax.jit(
        lambda x, s, w1, w2: layer(
            x,
            s,
            w1,
            w2,
            lambda a, b, c: jax.lax.ragged_dot(a, b, c, preferred_element_type=jnp.float32).astype(
                a.dtype
            ),
        )
    )
    rows = []
    for batch in [int(x) for x in args.decode_batches.split(",")]:
        m = batch * k
        sizes = routed_sizes(m, e, batch)
        x = jax.random.normal(key, (m, d), jnp.bfloat16)
        active = int(np.count_nonzero(np.asarray(sizes)))
        need = active * 3 * d * f * 2  # bf16 weights of the experts that got rows
        row = {
            "batch": batch,
            "rows": m,
            "active_experts": active,
            "weight_bytes": need,
            "floor_us": need / (limits["copy_read_plus_write_GBps"] * 1e9) * 1e6,
            "all_experts_floor_us": e
            * 3
            * d
            * f
            * 2
            / (limits["copy_read_plus_write_GBps"] * 1e9)
            * 1e6,
        }
        for name, fn in (*impls.items(), ("ragged_dot", ragged)):
            if name.split("_sk")[0] in args.decode_impls.split(","):

                def run(name=name, fn=fn, x=x, sizes=sizes, need=need):
                    t0 = time.perf_counter()
                    fn.lower(x, sizes, gate_up, down).compile()  # compile, first run apart
                    t1 = time.perf_counter()
                    jax.block_until_ready(fn(x, sizes, gate_up, down))
                    t2 = time.perf_counter()
                    sec = timed(fn, x, sizes, gate_up, down, repeats=args.repeats)
                    return {
                        f"{name}_compile_s": t1 - t0,
                        f"{name}_first_run_s": t2 - t1,
                        f"{name}_us": sec * 1e6,
                        f"{name}_GBps_of_needed": need / sec / 1e9,
                    }

                row.update(journal.run(f"decode/B{batch}/{name}", run, error_key=f"{name}_error"))
        if args.decode_configs:
            row["per_proj"] = decode_tile_sweep(args, x, sizes, gate_up, down, limits, journal)
        if "ours_us" in row:
            row["ours_x_floor"] = row["ours_us"] / row["floor_us"]
        if "ours_us" in row and "ragged_dot_us" in row:
            row["max_rel_err_vs_ragged_dot"] = float(
                bm.max_rel_err(ours(x, sizes, gate_up, down), ragged(x, sizes, gate_up, down))
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_tile_sweep(args, x, sizes, gate_up, down, limits, journal) -> dict:
    """Each projection alone at decode size, per tile config: us and GB/s of the weight bytes
    of the experts that got rows (which projection is off the floor, and which tiles fix it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.grouped_matmul import GroupedMatmulConfig

    active = int(np.count_nonzero(np.asarray(sizes)))
    f = args.f
    h = jax.random.normal(jax.random.key(2), (x.shape[0], f), jnp.bfloat16)
    out = {}
    for name, lhs, w in (("gate_up", x, gate_up), ("down", h, down)):
        need = active * w.shape[1] * w.shape[2] * 2
        default = GroupedMatmulConfig.default(lhs.shape[0], w.shape[0], lhs.dtype, *w.shape[1:])
        res = {
            "weight_bytes": need,
            "floor_us": need / (limits["copy_read_plus_write_GBps"] * 1e9) * 1e6,
        }

        def figures(fn, sec, need=need):
            return {"us": sec * 1e6, "GBps": need / sec / 1e9}

        for cfg, got in time_configs(
            lhs,
            w,
            sizes,
            default,
            parse_configs(args.decode_configs),
            args,
            journal,
            f"decode/M{x.shape[0]}/{name}",
            figures,
        ):
            res[("default " if cfg == default else "") + repr(cfg)] = _or_error(got)
        out[name] = res
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,2048,8192,16384")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--decode-batches", default="1,8,32")
    p.add_argument("--decode-impls", default="ours,ragged_dot")
    p.add_argument(
        "--decode-split-k",
        default="1",
        type=lambda t: [int(x) for x in t.split(",")],
        help="also time ours with these split_k (decode section)",
    )
    p.add_argument(
        "--decode-configs",
        default="",
        help="decode section: also time each projection alone with these tiles "
        "('bm,bn,bk,warps,stages[,split_k[,tail_m]]', ';'-separated)",
    )
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="tile configs swept, ';'-separated ('' = the default only)",
    )
    p.add_argument("--sections", default="check,decode,prefill")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    p.add_argument("--out", default=None)
    bm.add_sweep_args(p)
    args = p.parse_args()
    status, journal = bm.sweep_journal(args, args.out and args.out + ".journal")
    if journal is None:
        return status
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where it is stuck
    import jax

    gpu = jax.default_backend() == "gpu"
    limits = journal.run("limits", bm.card_limits, 3) if gpu else bm.NO_LIMITS
    report = {
        "device": bm.default_device().device_kind,
        "jax": jax.__version__,
        "limits": limits,
        "args": vars(args),
    }
    sections = args.sections.split(",")
    if "check" in sections:
        report["empty_groups_check"] = journal.run("check", check_empty_groups, args.interpret)
        print(json.dumps(report["empty_groups_check"]), flush=True)
    report["decode"] = decode_rows(args, limits, journal) if "decode" in sections else []
    report["prefill"] = (
        prefill_rows(args, parse_configs(args.configs), limits, journal)
        if "prefill" in sections
        else []
    )
    if args.out:
        bm.write_json(args.out, report)
    print(
        f"\n{report['device']}  jax {report['jax']}  E={args.experts} top-{args.top_k} "
        f"D={args.d} F={args.f}  matmul {limits['bf16_matmul_TFLOPs']:.0f} TFLOP/s  copy "
        f"{limits['copy_read_plus_write_GBps']:.0f} GB/s"
    )
    nan = float("nan")
    for r in report["prefill"]:
        print(
            f"{r['proj']:8s} tokens {r['tokens']:6d}: ours {r['ours_TFLOPs']:6.1f} TFLOP/s  "
            f"ragged_dot {r.get('ragged_dot_TFLOPs', nan):6.1f}  "
            f"dense {r.get('dense_TFLOPs', nan):6.1f}  "
            f"jax mgpu {r.get('jax_mgpu_ragged_dot_TFLOPs', nan):6.1f}  "
            f"ours/dense {r['ours_vs_dense']:.2f}  ({r['best_config']})"
        )
    for r in report["decode"]:
        print(
            f"decode B{r['batch']:3d}: {r['active_experts']} experts, ours "
            f"{r.get('ours_us', nan):7.1f} us ({r.get('ours_x_floor', nan):.2f}x floor "
            f"{r['floor_us']:.1f} us), ragged_dot {r.get('ragged_dot_us', nan):7.1f} us "
            f"(all-experts floor {r['all_experts_floor_us']:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
