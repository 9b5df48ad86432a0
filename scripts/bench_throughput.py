"""Offline throughput of the continuous-batching engine on a GPU, beside the card's limits and HF.

    python scripts/bench_throughput.py --model llama3-8b --workloads 128x128:1000,1000x1000:200,mix:500 --hf
    python scripts/bench_throughput.py --model tiny --workloads 16x16:20,mix:10 --num-pages 64   # CPU smoke

Random weights of a real model shape, bf16, greedy with ignore_eos (every request makes exactly
its output length). Reports output tokens/s, TTFT and TPOT p50/p99, KV pages used, and the
compute limit (bf16 matmul peak over 2 x params flops per token) and memory limit of the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import sys
import time

import numpy as np

from jaxinfer import benchmark as bm


def workload(spec: str, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """`INxOUT:N` (fixed lengths) or `mix:N` (long-tailed lengths from a fixed seed)."""
    kind, n = spec.split(":")
    rng = np.random.default_rng(seed)
    if kind == "mix":  # log-normal prompt and output lengths, clipped to [4, 2048] / [4, 1024]
        ins = np.clip(rng.lognormal(5.5, 0.9, int(n)), 4, 2048).astype(int)
        outs = np.clip(rng.lognormal(4.8, 0.9, int(n)), 4, 1024).astype(int)
    else:
        i, o = (int(x) for x in kind.split("x"))
        ins, outs = np.full(int(n), i), np.full(int(n), o)
    return [(rng.integers(0, vocab, a).tolist(), int(b)) for a, b in zip(ins, outs)]


def percentiles(values) -> dict:
    v = np.asarray(values, float)
    return (
        {
            "p50": float(np.percentile(v, 50)),
            "p99": float(np.percentile(v, 99)),
            "mean": float(v.mean()),
            # TPOT's min: a request no other prompt's prefill follows after its first token
            "min": float(v.min()),
            "max": float(v.max()),
        }
        if v.size
        else {}
    )


# What `--biased` requests carry (each request's options, from its max_tokens).
ADJUSTED_OPTIONS = {
    "logit_bias": lambda n: {"logit_bias": {0: -1.0}},
    "penalties": lambda n: {"repetition_penalty": 1.1, "frequency_penalty": 0.2},
    "min_tokens": lambda n: {"min_tokens": n // 2},
}


def run_engine(
    engines,
    requests,
    biased: int = 0,
    prompt_logprobs: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    option: str = "logit_bias",
) -> dict:
    """The requests through one engine, or spread over data-parallel replicas (round robin by
    queued tokens, each stepped in turn). `biased` of them, spread evenly, carry `option`
    (ADJUSTED_OPTIONS: a one-entry logit_bias by default; their steps, and all others' beside
    them, then run one a program); with
    `prompt_logprobs` every request asks for its prompt's (as an lm-eval loglikelihood);
    `temperature` > 0 samples (seeded by request), through a top-p filter if `top_p` < 1 and a
    top-k one if `top_k` > 0."""
    from jaxinfer.sampling import SamplingParams

    engines = engines if isinstance(engines, list) else [engines]
    engine = engines[0]
    start = time.perf_counter()
    load = [0] * len(engines)
    for i, (prompt, out_len) in enumerate(requests):
        r = load.index(min(load))
        load[r] += len(prompt) + out_len
        adjusted = biased and i % max(1, len(requests) // biased) == 0
        params = SamplingParams(
            max_tokens=out_len,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=i if temperature else None,
            ignore_eos=True,
            prompt_logprobs=prompt_logprobs,
            **(ADJUSTED_OPTIONS[option](out_len) if adjusted else {}),
        )
        engines[r].add_request(str(i), prompt, params)
    done = {}
    keys = ("steps", "decode_steps", "decode_row_steps", "decode_planned_tokens", "runner_s")
    before = {k: sum(e.stats[k] for e in engines) for k in keys + ("decode_wait_s",)}
    for e in engines:
        e.stats["max_pages_used"] = 0  # this workload's peak, not an earlier one's
    seen = {}  # request id -> (time its tokens last grew, how many it had)
    gaps = []  # seconds per token between a request's deliveries, as a stream shows them
    while any(e.has_unfinished_requests() for e in engines):
        for e in engines:
            outs = e.step()
            now = time.perf_counter()
            for out in outs:
                n = len(out.token_ids)
                last = seen.get(out.request_id)
                if last is not None and n > last[1]:
                    gaps += [(now - last[0]) / (n - last[1])] * (n - last[1])
                if last is None or n > last[1]:
                    seen[out.request_id] = (now, n)
                if out.finished:
                    done[out.request_id] = out
    wall = time.perf_counter() - start
    outs = [done[str(i)] for i in range(len(requests))]
    assert all(len(o.token_ids) == n for o, (_, n) in zip(outs, requests))
    n_out = sum(len(o.token_ids) for o in outs)
    return {
        "requests": len(requests),
        "input_tokens": sum(len(p) for p, _ in requests),
        "output_tokens": n_out,
        "wall_s": wall,
        "out_tok_per_s": n_out / wall,
        "total_tok_per_s": (n_out + sum(len(p) for p, _ in requests)) / wall,
        **{k: sum(e.stats[k] for e in engines) - before[k] for k in keys},
        # the host's waits for the device, for decode-only programs and for steps with prefills
        "wait_decode_s": sum(e.stats["decode_wait_s"] for e in engines) - before["decode_wait_s"],
        "ttft_s": percentiles([o.first_token_time - o.arrival_time for o in outs]),
        "tpot_s": percentiles(
            [
                (o.finish_time - o.first_token_time) / (len(o.token_ids) - 1)
                for o in outs
                if len(o.token_ids) > 1
            ]
        ),
        # Inter-token latency, one value per token after a request's first: TPOT's median is
        # the decode step plus every later prompt's prefill spread over a request's tokens;
        # this one's median is the decode step as a streaming client sees it.
        "itl_s": percentiles(gaps),
        "max_pages_used": max(e.stats["max_pages_used"] for e in engines),
        "num_pages": engine.num_pages,
        "preemptions": sum(e.stats["preemptions"] for e in engines),
    }


def limits_for(cfg, requests, limits, tp: int = 1, dp: int = 1, seats: int = 1) -> dict:
    """Output tok/s the cards could reach at best (matmul peak of tp x dp of them), and the HBM
    roofline of a decode step (one GPU's share of the weights + the live KV at mid-output over
    the copy bandwidth): at batch 1, and at min(requests, seats) sequences (all running)."""
    flops = sum(2 * cfg.active_params * (len(p) + n) for p, n in requests)
    n_out = sum(n for _, n in requests)
    context = float(np.mean([len(p) + n / 2 for p, n in requests]))
    batch = min(len(requests), seats)

    def roofline_ms(seqs: int) -> float:
        need = bm.decode_bytes(cfg, seqs, context)
        bandwidth = limits["copy_read_plus_write_GBps"] * 1e9
        return (need["weight_bytes"] + need["kv_bytes"]) / bandwidth / tp * 1e3

    return {
        "compute_bound_out_tok_per_s": tp
        * dp
        * n_out
        / (flops / (limits["bf16_matmul_TFLOPs"] * 1e12)),
        "weights_GB": 2 * cfg.num_params / 1e9,
        "batch1_roofline_ms": roofline_ms(1),
        "running_seqs": batch,
        "running_roofline_ms": roofline_ms(batch),
    }


def bench_hf(shape: dict, requests, batch: int) -> dict:
    """HF transformers generate on the same requests, `batch` at a time (left padding)."""
    import torch

    model, device = bm.hf_random_model(shape)
    while True:  # HF's batched expert path gathers weights per token: halve the batch on OOM
        try:
            return _hf_generate(model, device, requests, batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"HF out of memory at batch {batch}; retrying at {batch // 2}", file=sys.stderr)
            batch //= 2
            torch.cuda.empty_cache()


def _hf_generate(model, device, requests, batch: int) -> dict:
    import torch
    import transformers

    start, n_out = time.perf_counter(), 0
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):
            ids[j, width - len(p) :], mask[j, width - len(p) :] = torch.tensor(p), 1
        new = max(n for _, n in chunk)  # HF's static batch runs to its longest output
        with torch.no_grad():
            model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
        n_out += sum(n for _, n in chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "requests": len(requests),
        "batch": batch,
        "output_tokens": n_out,
        "wall_s": wall,
        "out_tok_per_s": n_out / wall,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--workloads", default="128x128:1000,1000x1000:200,mix:500")
    p.add_argument("--max-num-seqs", default="512", help="a list (256,512): each in turn")
    p.add_argument(
        "--max-num-batched-tokens", default="8192", help="a list (4096,8192): each in turn"
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--impl", default=None)
    p.add_argument("--hf", action="store_true")
    p.add_argument("--hf-requests", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument(
        "--hf-workloads",
        default=None,
        help="workloads HF runs (default: all; HF's long ones can take many minutes)",
    )
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="override the shape's layer count (both engines; e.g. Mixtral on an H100)",
    )
    p.add_argument(
        "--sync-too",
        action="store_true",
        help="rerun the first workload with async_scheduling off (same engine)",
    )
    p.add_argument(
        "--num-decode-steps",
        default="8",
        help="decode steps a program; a list (8,1) runs every workload with each, fresh engines",
    )
    p.add_argument(
        "--env",
        default="",
        help="a list of VAR=VALUE switches (JAXINFER_ROPE_DECODE=1,JAXINFER_ROPE_DECODE=0): every "
        "workload with each set in turn, fresh engines",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas")
    p.add_argument("--moe-parallel", default="expert", choices=["expert", "ffn"])
    p.add_argument(
        "--mesh",
        action="store_true",
        help="place the model on a device mesh even at size 1 (the sharded code path)",
    )
    p.add_argument(
        "--biased",
        type=bm.int_list,
        default=[0],
        help="a list (0,1): every workload with that many requests carrying --biased-with",
    )
    p.add_argument(
        "--biased-with",
        default="logit_bias",
        choices=sorted(ADJUSTED_OPTIONS),
        help="what --biased requests carry: a one-entry logit_bias, repetition and frequency "
        "penalties, or min_tokens of half their max_tokens (keys -biasedN, -penaltiesN, "
        "-min_tokensN)",
    )
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        default=None,
        help="every request asks for its prompt's logprobs, top n (each workload's key ends -plpN)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="> 0: every request samples at it (each workload's key ends -tT)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature (key: -pP)")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature (key: -kK)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape = bm.shape(args.model, args.layers)
    specs = [w for w in args.workloads.split(",") if w]
    hf_specs = [w for w in (args.hf_workloads or args.workloads).split(",") if w]
    if set(hf_specs) - set(specs):
        p.error(f"--hf-workloads {sorted(set(hf_specs) - set(specs))} not in --workloads {specs}")
    if args.hf_only:
        res = {
            s: bench_hf(shape, workload(s, shape["vocab_size"])[: args.hf_requests], args.hf_batch)
            for s in hf_specs
        }
        bm.emit_result(res)
        return 0
    peers = run_hf(args) if args.hf else {}
    hf_error = peers.pop("error", None)  # kept in the report, not dropped
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    report = {
        "device": bm.default_device().device_kind,
        "jax": jax.__version__,
        "model": args.model,
        "args": vars(args),
        "limits": bm.card_limits(3),
        "workloads": {},
    }
    if hf_error:
        report["hf_error"] = hf_error
        print("HF peer failed:\n" + hf_error, flush=True)
    # Every combination of the listed settings, fresh engines each; rows of all but the first
    # are keyed `<workload>@k1@s512@b4096@VAR=VALUE` by the settings that differ from the first.
    switches = [e for e in args.env.split(",") if e]
    for switch in switches:
        if switch.count("=") != 1:
            p.error(f"--env takes VAR=VALUE items, got {switch!r}")
    switches = switches or [""]  # one run in the environment as it is
    combos = list(
        itertools.product(
            *(
                [int(v) for v in a.split(",")]
                for a in (args.num_decode_steps, args.max_num_seqs, args.max_num_batched_tokens)
            ),
            switches,
        )
    )
    saved = dict(os.environ)
    for *combo, switch in combos:
        os.environ.clear()  # each switch alone over the starting environment
        os.environ.update(saved)
        if switch:
            name, value = switch.split("=")
            os.environ[name] = value
        engines = make_engines(args, *combo)
        suffix = "".join(
            f"@{tag}{v}" for tag, v, first in zip("ksb", combo, combos[0]) if v != first
        ) + (f"@{switch}" if switch != combos[0][-1] else "")
        run_workloads(args, engines, specs, peers, report, suffix)
        for e in engines:  # pools and weights go before the next engines take the memory
            e.close()  # (dropping an engine frees nothing: `Engine.close`)
            for x in jax.tree.leaves(e.runner.params):
                x.delete()
        del engines
        gc.collect()
    print_table(report)
    return 0


def run_workloads(args, engines, specs, peers, report, suffix: str) -> None:
    engine, cfg = engines[0], engines[0].model.config
    report["startup_s" + suffix] = engines[0].startup_s
    print(
        json.dumps(
            {
                "startup_s": engines[0].startup_s,
                "num_decode_steps": engine.config.num_decode_steps,
                "num_pages": engine.num_pages,
                "buckets": engine.runner.buckets,
            }
        ),
        flush=True,
    )
    runs = [(spec, True) for spec in specs] + ([(specs[0], False)] if args.sync_too else [])
    runs = [(spec, overlap, n) for spec, overlap in runs for n in args.biased]
    for spec, overlap, biased in runs:
        requests = workload(spec, cfg.vocab_size)
        for e in engines:
            e.config = dataclasses.replace(e.config, async_scheduling=overlap)
        row = run_engine(
            engines,
            requests,
            biased,
            args.prompt_logprobs,
            args.temperature,
            args.top_p,
            args.top_k,
            args.biased_with,
        )
        if biased:
            row[f"requests_with_{args.biased_with}"] = min(biased, len(requests))
        row.update(
            limits_for(
                cfg,
                requests,
                report["limits"],
                args.tensor_parallel_size,
                args.data_parallel_size,
                engine.config.max_num_seqs,
            ),
            async_scheduling=overlap,
            num_decode_steps=engine.config.num_decode_steps,
            max_num_seqs=engine.config.max_num_seqs,
            max_num_batched_tokens=engine.config.max_num_batched_tokens,
        )
        if row["decode_row_steps"]:
            row["decode_row_use"] = row["decode_planned_tokens"] / row["decode_row_steps"]
        tpot_ms = row["tpot_s"].get("p50", float("nan")) * 1e3
        row["x_running_roofline"] = tpot_ms / row["running_roofline_ms"]
        itl_ms = row["itl_s"].get("p50", float("nan")) * 1e3
        row["itl_x_running_roofline"] = itl_ms / row["running_roofline_ms"]
        if len(requests) == 1:
            row["x_batch1_roofline"] = tpot_ms / row["batch1_roofline_ms"]
        tag = "biased" if args.biased_with == "logit_bias" else args.biased_with
        key = (spec if overlap else spec + "-sync") + (f"-{tag}{biased}" if biased else "")
        key += "" if args.prompt_logprobs is None else f"-plp{args.prompt_logprobs}"
        key += f"-t{args.temperature:g}" if args.temperature else ""
        key += f"-k{args.top_k}" if args.top_k > 0 else ""
        key += (f"-p{args.top_p:g}" if args.top_p < 1 else "") + suffix
        if not suffix and key in peers:
            row["hf"] = peers[key]
        report["workloads"][key] = row
        report["num_compiles" + suffix] = sum(e.runner.num_compiles for e in engines)
        print(json.dumps({key: row}), flush=True)
        if args.out:
            bm.write_json(args.out, report)


def make_engines(args, num_decode_steps: int, max_num_seqs: int, budget: int) -> list:
    """One engine per data-parallel replica, each over its own tensor-parallel devices (a mesh
    when --mesh or a size > 1); `startup_s` of the first includes making its weights."""
    from jaxinfer.engine import Engine
    from jaxinfer.sharding import replica_meshes

    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    meshes = replica_meshes(tp, dp) if (tp > 1 or dp > 1 or args.mesh) else [None]
    engines = []
    for mesh in meshes:
        t0 = time.perf_counter()
        model = bm.random_model(args.model, "bfloat16", args.layers, mesh, args.moe_parallel)
        engine = Engine(
            model,
            max_num_seqs=max_num_seqs,
            page_size=args.page_size,
            max_num_batched_tokens=budget,
            num_pages=args.num_pages,
            attention_impl=args.impl,
            enable_prefix_caching=False,
            num_decode_steps=num_decode_steps,
        )
        engine.startup_s = time.perf_counter() - t0
        engines.append(engine)
    return engines


def run_hf(args) -> dict:
    """The HF peer in its own process (it never shares the GPU with JAX's pool)."""
    return bm.run_isolated(
        [
            __file__,
            "--hf-only",
            "--model",
            args.model,
            "--layers",
            str(args.layers),
            "--workloads",
            args.workloads,
            "--hf-workloads",
            args.hf_workloads or args.workloads,
            "--hf-requests",
            str(args.hf_requests),
            "--hf-batch",
            str(args.hf_batch),
        ]
    )


def print_table(report: dict) -> None:
    lim = report["limits"]
    print(
        f"\n{report['device']}  jax {report['jax']}  {report['model']}  bf16 matmul "
        f"{lim['bf16_matmul_TFLOPs']:.0f} TFLOP/s  copy {lim['copy_read_plus_write_GBps']:.0f} GB/s  "
        f"compiles {report['num_compiles']}"
    )
    nan = float("nan")
    for spec, r in report["workloads"].items():
        hf = r.get("hf", {}).get("out_tok_per_s", nan)
        tpot = {k: 1e3 * r["tpot_s"].get(k, nan) for k in ("p50", "p99")}  # none at 1 token
        print(
            f"{spec:14s} {r['out_tok_per_s']:9.0f} out tok/s (compute bound "
            f"{r['compute_bound_out_tok_per_s']:7.0f})  TTFT p50 {r['ttft_s']['p50']:.2f}s "
            f"p99 {r['ttft_s']['p99']:.2f}s  TPOT p50 {tpot['p50']:.1f}ms "
            f"p99 {tpot['p99']:.1f}ms  pages {r['max_pages_used']}/{r['num_pages']}  "
            f"preempt {r['preemptions']}  HF {hf:7.0f} tok/s"
        )
        print(
            f"{'':14s} k={r['num_decode_steps']}  TPOT p50 = {r['x_running_roofline']:.2f}x the "
            f"roofline of a step of {r['running_seqs']} ({r['running_roofline_ms']:.2f} ms); "
            f"inter-token latency p50 {1e3 * r['itl_s'].get('p50', float('nan')):.2f} ms "
            f"({r['itl_x_running_roofline']:.2f}x)"
        )
        if "x_batch1_roofline" in r:
            print(
                f"{'':14s} batch-1 TPOT {tpot['p50']:.2f} ms = "
                f"{r['x_batch1_roofline']:.2f}x the HBM roofline {r['batch1_roofline_ms']:.2f} ms"
            )


if __name__ == "__main__":
    sys.exit(main())
