"""Where one engine step's GPU time goes: a jax.profiler trace of real decode steps, summed per
XLA op and per kernel, with the step's byte and flop floors beside it.

    python scripts/profile_step.py --model llama3-8b --seqs 256 --prompt 200 --out prof.json
    python scripts/profile_step.py --model llama3-8b --seqs 32 --prompt 1024 --budget 8192 --prefill
    python scripts/profile_step.py --model tiny --seqs 4 --prompt 8      # CPU smoke

The engine (random weights, bf16) is filled with `--seqs` greedy requests of `--prompt` tokens and
stepped until every sequence decodes; then `--steps` engine steps run under the profiler. The
trace's device events (CUPTI kernels on a GPU, thunks on the CPU) are grouped by `hlo_op`. Every
figure is per decode step (one token for each sequence): an engine step that runs a multi-step
decode (`--num-decode-steps` k) counts as k of them. With `--prefill`, steps that only prefill
are traced instead (`profile_prefill`), figures per model step.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import glob
import gzip
import json
import os
import signal
import statistics
import sys
import tempfile
import time

from jaxinfer import benchmark as bm

# Op-name fragments → category, first match wins (XLA names fusions after their root op).
CATEGORIES = (
    # Tensor parallelism's communication (XLA's collectives, NCCL's kernels), timed, not assumed.
    ("collective", ("all-reduce", "all_reduce", "allreduce", "all-gather", "all_gather", "nccl")),
    ("attention", ("paged_decode", "ragged_paged", "flash_attention")),
    ("grouped_matmul", ("grouped_matmul",)),
    ("matmul", ("dot", "gemm", "cublas", "matmul", "convolution")),
    ("kv_write", ("scatter", "dynamic-update-slice", "dynamic_update_slice")),
    ("sort_topk", ("sort", "topk", "top_k")),
    ("reduce", ("reduce",)),
    ("copy", ("copy", "transpose")),
)


def category(op: str) -> str:
    low = op.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def device_events(trace_dir: str) -> tuple[list[dict], list[str]]:
    """Complete events of the device lines of the newest trace, and the process names seen."""
    path = max(
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    with gzip.open(path) as fh:
        events = json.load(fh)["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    if gpu:
        chosen = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu]
    else:  # CPU: the XLA thunks carry an hlo_op
        chosen = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    return chosen, sorted(set(names.values()))


def summarize(events: list[dict], steps: int, top: int) -> dict:
    """Per-step device time by hlo op, by kernel name and by category (microseconds)."""
    by_op, by_kernel = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for e in events:
        args = e.get("args", {})
        op = args.get("hlo_op") or e["name"]
        by_op[op] += e["dur"]
        count[op] += 1
        by_kernel[e["name"][:120]] += e["dur"]
    cats = collections.Counter()
    for op, us in by_op.items():
        cats[category(op)] += us
    busy = sum(by_op.values())
    return {
        "device_busy_us_per_step": busy / steps,
        "by_category_us_per_step": {c: v / steps for c, v in cats.most_common()},
        "top_ops": [
            {
                "op": op,
                "us_per_step": us / steps,
                "calls_per_step": count[op] / steps,
                "share": us / busy,
            }
            for op, us in by_op.most_common(top)
        ],
        "top_kernels": [
            {"kernel": k, "us_per_step": us / steps} for k, us in by_kernel.most_common(top)
        ],
    }


def kernel_sequence(events: list[dict], n: int) -> list[list]:
    """The first n device events in start order from the middle of the trace (steps there are
    warm): [kernel name, its hlo op, microseconds]."""
    ordered = sorted(events, key=lambda e: e["ts"])
    start = max(0, len(ordered) // 2 - n // 2)
    return [
        [e["name"][:80], e.get("args", {}).get("hlo_op", ""), round(e["dur"], 2)]
        for e in ordered[start : start + n]
    ]


def trace_report(trace_dir: str, steps: int, args) -> dict:
    """The trace's device time per step (`summarize`) and its processes; with --sequence the
    kernels in launch order, with --keep-trace the raw trace copied out."""
    events, processes = device_events(trace_dir)
    if args.keep_trace:
        import shutil

        shutil.copytree(trace_dir, args.keep_trace, dirs_exist_ok=True)
    out = {"trace_processes": processes, **summarize(events, steps, args.top)}
    if args.sequence:
        out["kernel_sequence"] = kernel_sequence(events, args.sequence)
    return out


def floors(cfg, seqs: int, context: float, copy_gbps: float, matmul_tflops: float) -> dict:
    """Bytes one decode step must move (`benchmark.decode_bytes`) and its matmul flops
    (2 per weight a token uses; the embedding table is only gathered from)."""
    used = cfg.active_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    out = {**bm.decode_bytes(cfg, seqs, context), "matmul_flops": 2 * seqs * used}
    if copy_gbps == copy_gbps:  # not NaN
        out["bytes_floor_ms"] = (out["weight_bytes"] + out["kv_bytes"]) / copy_gbps / 1e6
        out["flops_floor_ms"] = out["matmul_flops"] / matmul_tflops / 1e9
    return out


def jitted_step_alone(eng, n: int = 20) -> dict:
    """The jitted program of one decode plan, n calls back to back and one sync: the host's time
    to queue the n calls, and the wall of all n (the device's pace if the host keeps ahead), per
    decode step."""
    import jax

    eng.resolve()  # nothing in flight: the plan below holds real tokens only
    plan = eng.scheduler.schedule(eng.config.num_decode_steps)
    rows = [eng.requests[s.request_id].row() for s in plan.seqs]
    runner = eng.runner
    run = runner.prepare(plan, rows)
    k = max(s.num_steps for s in plan.seqs) if runner.multi_step(plan, rows) else 1
    jax.block_until_ready(run())
    t0 = time.perf_counter()
    for _ in range(n):  # same slots rewritten: the engine is not stepped after this
        out = run()
    t1 = time.perf_counter()
    jax.block_until_ready((runner.pages, out))
    t2 = time.perf_counter()
    per = n * k / 1e3
    return {"jitted_step_queue_ms": (t1 - t0) / per, "jitted_step_ms": (t2 - t0) / per}


def model_steps(eng, engine_steps: int) -> tuple[int, float]:
    """Runs `engine_steps` engine steps; returns the decode steps they ran and their wall."""
    before, t0 = eng.stats["model_steps"], time.perf_counter()
    for _ in range(engine_steps):
        eng.step()
    return eng.stats["model_steps"] - before, time.perf_counter() - t0


def time_phases(eng, steps: int) -> dict:
    """Wall ms per step inside each part of the engine step (wrappers on the instances only)."""
    totals = collections.Counter()
    parts = [
        (eng.scheduler, "schedule"),
        (eng.scheduler, "commit"),
        (eng.scheduler, "resolve"),
        (eng.runner, "build"),
        (eng.runner, "step"),
        (eng.runner, "decode"),
        (eng.runner, "collect"),
        (eng, "_advance"),
        (eng, "resolve"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name in parts]

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] += time.perf_counter() - t0

        return wrapper

    for obj, name, fn in originals:
        setattr(obj, name, timed(name, fn))
    n, totals["engine_step"] = model_steps(eng, steps)
    for obj, name, _ in originals:
        delattr(obj, name)  # back to the class's method
    return {k: v / n * 1e3 for k, v in totals.items()}


def cprofile_steps(eng, steps: int) -> str:
    """The host's view of `steps` engine steps: the top functions by own and cumulative time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(25)
    return text.getvalue()


def profile_prefill(eng, cfg, args, trace_dir: str) -> dict:
    """Engine steps that only prefill: a round of `--seqs` prompts of `--prompt` tokens (one
    output token each) compiles the step, a second of fresh prompts is timed and a third runs under
    the profiler. Per model step (a program run): wall, device time, and the matmul flops of its
    prompt tokens."""
    import jax
    import numpy as np

    from jaxinfer.sampling import SamplingParams

    rng = np.random.default_rng(0)

    def run_round(tag: str) -> tuple[int, float]:
        for i in range(args.seqs):
            prompt = rng.integers(0, cfg.vocab_size, args.prompt).tolist()  # no prefix hits
            params = SamplingParams(
                max_tokens=1, ignore_eos=True, prompt_logprobs=args.prompt_logprobs
            )
            eng.add_request(f"{tag}{i}", prompt, params)
        before, t0 = eng.stats["model_steps"], time.perf_counter()
        while eng.has_unfinished_requests():  # the last engine step only collects the outputs
            eng.step()
        return eng.stats["model_steps"] - before, time.perf_counter() - t0

    t0 = time.perf_counter()
    run_round("warm-")
    warm_s = time.perf_counter() - t0
    untraced_steps, untraced_s = run_round("untraced-")
    with jax.profiler.trace(trace_dir):
        steps, wall = run_round("traced-")
    flops = args.seqs * bm.prefill_flops(cfg, args.prompt)
    if untraced_steps != steps:
        raise RuntimeError(f"the rounds ran {untraced_steps} and {steps} model steps")
    return {
        "mode": "prefill",
        "steps_traced": steps,
        "prompt_tokens_per_step": args.seqs * args.prompt / steps,
        "engine_step_ms": untraced_s / steps * 1e3,
        "traced_step_ms": wall / steps * 1e3,
        "prefill_tok_per_s": args.seqs * args.prompt / untraced_s,
        "matmul_tflops_per_step": flops / steps / 1e12,
        "achieved_TFLOPs": flops / untraced_s / 1e12,
        "warmup_s": warm_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", choices=sorted(bm.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape")
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--budget", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --seqs")
    p.add_argument("--cprofile", type=int, default=0, help="also cProfile this many host steps")
    p.add_argument("--top", type=int, default=30)
    p.add_argument(
        "--sequence",
        type=int,
        default=0,
        help="also list this many device kernels in launch order (which op each one is)",
    )
    p.add_argument("--keep-trace", default=None, help="copy the raw trace to this folder")
    p.add_argument("--limits", action="store_true", help="measure copy bandwidth and matmul peak")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--mesh", action="store_true", help="a device mesh even at size 1")
    p.add_argument("--num-decode-steps", type=int, default=8, help="1: one step a program")
    p.add_argument(
        "--prefill",
        action="store_true",
        help="profile steps that only prefill (--seqs prompts of --prompt tokens, --budget a step)",
    )
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        default=None,
        help="with --prefill: the requests ask for this many prompt logprobs (a step then holds "
        "at most scheduler.ALL_LOGITS_TOKENS tokens)",
    )
    p.add_argument(
        "--penalties",
        action="store_true",
        help="the requests carry repetition and frequency penalties",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where it is stuck
    import jax
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.sampling import SamplingParams

    mesh = None
    if args.mesh or args.tensor_parallel_size > 1:
        from jaxinfer.sharding import make_mesh

        mesh = make_mesh(args.tensor_parallel_size)
    model = bm.random_model(args.model, "bfloat16", args.layers or 0, mesh)
    cfg = model.config
    limits = bm.NO_LIMITS
    if args.limits and jax.default_backend() == "gpu":  # before the engine takes the memory
        limits = bm.card_limits(3)
    eng = Engine(
        model,
        max_num_seqs=args.max_num_seqs or args.seqs,
        max_num_batched_tokens=args.budget,
        num_pages=args.num_pages,
        warmup=False,
        num_decode_steps=args.num_decode_steps,
    )
    if args.prefill:
        trace_dir = tempfile.mkdtemp(prefix="jaxinfer-trace-")
        report = bm.report_header()
        report.update(model=args.model, layers=cfg.num_layers, seqs=args.seqs)
        report.update(prompt=args.prompt, budget=args.budget, limits=limits)
        report.update(prompt_logprobs=args.prompt_logprobs)
        report.update(profile_prefill(eng, cfg, args, trace_dir))
        report.update(trace_report(trace_dir, report["steps_traced"], args))
        if args.out:
            bm.write_json(args.out, report)
        cats = {k: round(v / 1e3, 2) for k, v in report["by_category_us_per_step"].items()}
        print(
            f"{report['device']} {args.model} prefill {args.seqs} x {args.prompt}, budget "
            f"{args.budget}, prompt_logprobs {args.prompt_logprobs}: {report['engine_step_ms']:.1f} ms a step of "
            f"{report['prompt_tokens_per_step']:.0f} tokens, {report['achieved_TFLOPs']:.0f} "
            f"TFLOP/s; device busy {report['device_busy_us_per_step'] / 1e3:.1f} ms/step {cats}"
        )
        return 0
    rng = np.random.default_rng(0)
    for i in range(args.seqs):
        eng.add_request(
            str(i),
            rng.integers(0, cfg.vocab_size, args.prompt).tolist(),
            SamplingParams(
                max_tokens=eng.max_model_len - args.prompt,
                temperature=0,
                ignore_eos=True,
                **({"repetition_penalty": 1.1, "frequency_penalty": 0.2} if args.penalties else {}),
            ),
        )
    t0 = time.perf_counter()
    while eng.stats["decode_steps"] < 3:  # prefills done, the decode step compiled and warm
        eng.step()
    warm_s = time.perf_counter() - t0
    phases = time_phases(eng, 10)
    walls = []
    for _ in range(10):
        n, wall = model_steps(eng, 1)
        walls.append(wall / n)
    step_ms = statistics.median(walls) * 1e3
    host_profile = cprofile_steps(eng, args.cprofile) if args.cprofile else None
    context = args.prompt + eng.stats["model_steps"] + args.steps * args.num_decode_steps / 2
    trace_dir = tempfile.mkdtemp(prefix="jaxinfer-trace-")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        traced, _ = model_steps(eng, args.steps)
        eng.resolve()
        jax.block_until_ready(eng.runner.pages)
        traced_ms = (time.perf_counter() - t0) / traced * 1e3
    launch = jitted_step_alone(eng)  # last: leaves the engine's plan unresolved
    report = {
        "device": bm.default_device().device_kind,
        "jax": jax.__version__,
        "model": args.model,
        "layers": cfg.num_layers,
        "seqs": args.seqs,
        "prompt": args.prompt,
        "num_decode_steps": args.num_decode_steps,
        "penalties": args.penalties,
        "steps_traced": traced,
        "num_pages": eng.num_pages,
        "engine_step_ms": step_ms,
        "engine_step_ms_all": [w * 1e3 for w in walls],
        "traced_step_ms": traced_ms,
        "warmup_s": warm_s,
        "host_profile": host_profile,
        "host_phases_ms_per_step": phases,
        **launch,
    }
    report["limits"] = limits
    report["floors"] = floors(
        cfg, args.seqs, context, limits["copy_read_plus_write_GBps"], limits["bf16_matmul_TFLOPs"]
    )
    report.update(trace_report(trace_dir, traced, args))
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(
        f"{report['device']} {args.model} L{cfg.num_layers} seqs {args.seqs} prompt {args.prompt}: "
        f"engine step {step_ms:.2f} ms (traced {traced_ms:.2f}; jitted step alone "
        f"{launch['jitted_step_ms']:.2f}, queued in {launch['jitted_step_queue_ms']:.2f}), device busy {report['device_busy_us_per_step'] / 1e3:.2f} "
        f"ms/step; floors {report['floors']}"
    )
    if host_profile:
        print(host_profile)
    print("host phases (ms/step):", {k: round(v, 2) for k, v in phases.items()})
    for cat, us in report["by_category_us_per_step"].items():
        print(f"  {cat:16s} {us / 1e3:8.3f} ms")
    for r in report["top_ops"]:
        print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['op'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
