"""Where the engine's start-up goes: weights, page pool, and each program's trace, compile and
first call, with JAX's persistent compilation cache cold or warm.

    python scripts/profile_startup.py --cache /tmp/xla --mode serial --out cold.json
    python scripts/profile_startup.py --cache /tmp/xla --mode engine      # Engine(...) as users run it

Modes: `serial` lowers and compiles each program in turn (AOT), then calls it through jit;
`parallel` lowers all, compiles them in a thread pool, then calls them; `engine` times the plain
`Engine(...)` constructor. Random weights of a named shape, bf16.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

T0 = time.perf_counter()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--cache", required=True)
    p.add_argument("--mode", choices=["serial", "parallel", "engine"], default="serial")
    # 0: the device's default (`engine.device_defaults`)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax
    import jax.numpy as jnp

    import jaxinfer
    from jaxinfer.benchmark import SHAPES, default_device, write_json
    from jaxinfer.config import ModelConfig
    from jaxinfer.engine import Engine

    report = {"mode": args.mode, "jax": jax.__version__, "device": default_device().device_kind}
    report["import_s"] = time.perf_counter() - T0
    jax.config.update("jax_compilation_cache_dir", args.cache)
    cfg = ModelConfig(**SHAPES[args.model])
    t = time.perf_counter()
    params = jax.block_until_ready(jaxinfer.init_params(cfg, "bfloat16"))
    report["init_params_s"] = time.perf_counter() - t
    model = jaxinfer.Model(cfg, params, None, jnp.bfloat16)
    opts = dict(
        max_num_seqs=args.max_num_seqs or None,
        max_num_batched_tokens=args.max_num_batched_tokens or None,
        enable_prefix_caching=False,
        compilation_cache_dir=args.cache,
    )
    t = time.perf_counter()
    compiles = count_compiles()
    engine = Engine(model, warmup=args.mode == "engine", **opts)
    report["engine_s"] = time.perf_counter() - t
    report.update(compiles)
    c = engine.config
    report.update(max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens)
    if args.mode != "engine":
        report["programs"] = profile_programs(engine.runner, args.mode == "parallel", args.workers)
        report["programs_total_s"] = time.perf_counter() - t - report["engine_s"]
    report["total_s"] = time.perf_counter() - T0
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


def count_compiles() -> dict:
    """From now on, XLA programs compiled or loaded from the persistent cache (each jitted
    program and each small op's) and their seconds, counted into the returned dict."""
    import jax

    stats = {"xla_compiles": 0, "xla_compile_s": 0.0}

    def listener(event: str, seconds: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":  # jax._src.dispatch's name
            stats["xla_compiles"] += 1
            stats["xla_compile_s"] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    return stats


def profile_programs(runner, parallel: bool, workers: int) -> list[dict]:
    """Each warm-up program's trace + lowering, compile (serial, or all at once in a thread pool)
    and first call through jit."""
    import jax

    programs = runner.warmup_programs()
    rows = [
        {
            "program": getattr(fn, "__name__", str(fn)),
            "mode": next((a for a in args if isinstance(a, str)), None),  # a sampler's mode
            "shapes": str(
                jax.tree.map(
                    lambda x: getattr(x, "shape", x), args[-1] if fn is runner._forward else args[0]
                )
            ),
        }
        for fn, args in programs
    ]
    lowered = []
    for row, (fn, args) in zip(rows, programs):
        t = time.perf_counter()
        lowered.append(fn.lower(*args))
        row["lower_s"] = time.perf_counter() - t
        if not parallel:
            t = time.perf_counter()
            lowered[-1].compile()
            row["compile_s"] = time.perf_counter() - t
    if parallel:  # each compile's own seconds too (in a thread among `workers`)

        def compile_one(row_low):
            t = time.perf_counter()
            row_low[1].compile()
            row_low[0]["compile_s"] = time.perf_counter() - t

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(compile_one, zip(rows, lowered)))
        rows[0]["parallel_compile_all_s"] = time.perf_counter() - t
    for row, (fn, args) in zip(rows, programs):
        t = time.perf_counter()
        if fn in (runner._forward, runner._decode, runner._decode_cublas):  # donate the pool
            runner.pages, *out = fn(args[0], runner.pages, *args[2:])
        else:
            out = fn(*args)
        jax.block_until_ready(out)
        row["jit_call_s"] = time.perf_counter() - t
    return rows


if __name__ == "__main__":
    sys.exit(main())
