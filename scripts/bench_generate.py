"""Benchmark of `jaxinfer.generate` on a GPU: decode ms/step and prefill tokens/s, beside the HBM
roofline and the bf16 matmul peak measured on the same card, and beside HF transformers.

    python scripts/bench_generate.py --models llama2-7b,llama3-8b --hf --out bench/results/x.json
    python scripts/bench_generate.py --models tiny --batches 1,2 --prompt 32 --new 8 --prefill 64   # CPU smoke

Random weights of real model shapes (speed does not depend on weight values). Decode step time =
(one generate call of `--new` tokens - one prefill call) / (new - 1); medians of `--repeats` runs.
Each row runs as one unit of a crash-resumable sweep (jaxinfer.benchmark): a native crash costs
that row, recorded as its error, not the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from jaxinfer import benchmark as bm


def bench_jaxinfer(name: str, args, limits: dict, journal: bm.Journal) -> dict:
    import numpy as np

    model = bm.random_model(name, args.dtype, args.layers)
    cfg = model.config
    rng = np.random.RandomState(0)
    result = {
        "config": dataclasses.asdict(cfg),
        "params": cfg.num_params,
        "decode": [],
        "prefill": [],
    }
    impls = args.impls.split(",")
    result["check"] = journal.run(
        f"{name}/check", bm.check_impls, model, impls, rng, args.check_f32
    )
    print(json.dumps(result["check"]), flush=True)
    # Decode attention is the same XLA code for every impl; the MoE dispatch is not (pallas: our
    # grouped matmul, else ragged_dot), hence --decode-impls.
    for impl in (args.decode_impls or impls[0]).split(","):
        for batch in bm.int_list(args.batches):
            result["decode"].append(
                journal.run(
                    f"{name}/decode/{impl}/B{batch}",
                    _decode_row,
                    model,
                    model.decoder(impl),
                    batch,
                    args,
                    limits,
                    rng,
                    error_row={"impl": impl, "batch": batch},
                )
            )
            print(json.dumps(result["decode"][-1]), flush=True)
    for impl in impls:
        for tokens in bm.int_list(args.prefill):
            result["prefill"].append(
                journal.run(
                    f"{name}/prefill/{impl}/T{tokens}",
                    _prefill_row,
                    model,
                    model.decoder(impl),
                    tokens,
                    args,
                    limits,
                    rng,
                    error_row={"impl": impl, "tokens": tokens},
                )
            )
            print(json.dumps(result["prefill"][-1]), flush=True)
    del model
    return result


def _decode_row(model, decoder, batch, args, limits, rng) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.generate import bucket_lengths, generate_arrays, round_up, row_sampling
    from jaxinfer.models.llama import init_cache

    cfg = model.config
    t, s = bucket_lengths(model, args.prompt, args.new)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, t)), jnp.int32)
    lengths = jnp.full((batch,), args.prompt, jnp.int32)
    greedy, mode = row_sampling(batch, 0.0, 0, 1.0, seed=0)
    fresh = lambda: jax.block_until_ready(init_cache(cfg, batch, s, model.dtype))

    generated = {}  # new -> the last call's tokens (greedy: every call makes the same ones)

    def run_generate(cache, new):
        out, cache = generate_arrays(
            decoder,
            model.params,
            cache,
            tokens,
            lengths,
            jnp.int32(new),
            jnp.asarray([-2], jnp.int32),
            greedy,
            out_len=round_up(args.new, 32),
            mode=mode,
        )
        jax.block_until_ready(out)
        assert int((out[:, :new] >= 0).sum()) == batch * new  # every step ran
        generated[new] = out  # [batch, >= new]

    # The same compiled program with 1 and with `new` tokens: the difference is new - 1 decode steps.
    t_gen = bm.pipelined_time(
        lambda c: run_generate(c, args.new), repeats=args.repeats, setup=fresh
    )
    t_pre = bm.pipelined_time(lambda c: run_generate(c, 1), repeats=args.repeats, setup=fresh)
    step = (t_gen - t_pre) / (args.new - 1)
    distinct = None
    if cfg.num_experts:  # the decode steps fed generated tokens 0 .. new-2 back in
        fed = jnp.concatenate(
            [tokens[:, : args.prompt], generated[args.new][:, : args.new - 1]], axis=1
        )
        distinct = bm.routed_experts(model, fed, last=args.new - 1)
    need = bm.decode_bytes(cfg, batch, args.prompt + args.new / 2, distinct)
    roofline = (need["weight_bytes"] + need["kv_bytes"]) / (
        limits["copy_read_plus_write_GBps"] * 1e9
    )
    read_roofline = roofline * limits["copy_read_plus_write_GBps"] / limits["read_GBps"]
    return {
        "impl": decoder.impl,
        "batch": batch,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "cache_len": s,
        "ms_per_step": step * 1e3,
        "out_tok_per_s": batch / step,
        "generate_s": t_gen,
        "generate_1_token_s": t_pre,
        **need,
        "distinct_experts_per_layer": distinct,
        "roofline_ms": roofline * 1e3,
        "x_roofline": step / roofline,
        "read_roofline_ms": read_roofline * 1e3,
        "x_read_roofline": step / read_roofline,
    }


def _prefill_row(model, decoder, tokens_n, args, limits, rng) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.generate import prefill_jit
    from jaxinfer.models.llama import init_cache

    cfg = model.config
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, tokens_n)), jnp.int32)
    lengths = jnp.full((1,), tokens_n, jnp.int32)
    fresh = lambda: init_cache(cfg, 1, tokens_n, model.dtype)
    try:
        t = bm.pipelined_time(
            lambda c: jax.block_until_ready(prefill_jit(decoder, model.params, c, tokens, lengths)),
            repeats=args.repeats,
            setup=fresh,
        )
    except Exception as e:  # an impl that cannot run here is reported, not fatal
        return {"impl": decoder.impl, "tokens": tokens_n, "error": bm.error_text(e)}
    flops = bm.prefill_flops(cfg, tokens_n)
    return {
        "impl": decoder.impl,
        "tokens": tokens_n,
        "ms": t * 1e3,
        "tok_per_s": tokens_n / t,
        "TFLOPs": flops / t / 1e12,
        "x_matmul_peak": flops / t / 1e12 / limits["bf16_matmul_TFLOPs"],
    }


# --------------------------------------------------------------------------------------------
# HF transformers, the peer (its own process, so the two frameworks don't share GPU memory)


def bench_hf(name: str, args) -> dict:
    import torch
    import transformers

    shape = bm.shape(name)
    model, device = bm.hf_random_model(shape)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decode": [],
        "prefill": [],
    }

    def timed(call, *a, **kw) -> float:
        def run(_):
            with torch.no_grad():
                call(*a, **kw)
            sync()

        return bm.pipelined_time(run, repeats=args.hf_repeats)

    for batch in bm.int_list(args.hf_batches):
        ids = torch.randint(0, shape["vocab_size"], (batch, args.prompt), device=device)
        mask = torch.ones_like(ids)
        t_gen = timed(
            model.generate,
            ids,
            attention_mask=mask,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
        )
        t_pre = timed(model, ids, attention_mask=mask, logits_to_keep=1)
        step = (t_gen - t_pre) / (args.new - 1)
        result["decode"].append(
            {
                "batch": batch,
                "ms_per_step": step * 1e3,
                "out_tok_per_s": batch / step,
                "generate_s": t_gen,
                "prefill_s": t_pre,
            }
        )
        print(json.dumps(result["decode"][-1]), flush=True)
    for tokens_n in bm.int_list(args.prefill):
        ids = torch.randint(0, shape["vocab_size"], (1, tokens_n), device=device)
        t = timed(model, ids, logits_to_keep=1)
        result["prefill"].append({"tokens": tokens_n, "ms": t * 1e3, "tok_per_s": tokens_n / t})
        print(json.dumps(result["prefill"][-1]), flush=True)
    return result


def run_hf_subprocess(name: str, args) -> dict:
    return bm.run_isolated(
        [
            __file__,
            "--hf-only",
            "--models",
            name,
            "--prompt",
            str(args.prompt),
            "--new",
            str(args.new),
            "--prefill",
            args.prefill,
            "--hf-batches",
            args.hf_batches,
            "--hf-repeats",
            str(args.hf_repeats),
        ],
        timeout=args.hf_timeout,
    )


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prefill", default="512,2048")
    p.add_argument(
        "--impls",
        default="cudnn,xla",
        help="attention impls for prefill, comma-separated; decode uses the first",
    )
    p.add_argument(
        "--decode-impls", default=None, help="impls timed in decode (default: the first)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="weights and activations (float32: the "
        "check's rounding floor, with JAX_DEFAULT_MATMUL_PRECISION=highest)",
    )
    p.add_argument(
        "--check-f32",
        action="store_true",
        help="the check also against the reference in float32 (the weights cast; 4 bytes a param)",
    )
    p.add_argument("--hf", action="store_true", help="also time HF transformers (own process)")
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-batches", default="1,8,64")
    p.add_argument("--hf-repeats", type=int, default=2)
    p.add_argument("--hf-timeout", type=int, default=900)
    p.add_argument("--out", default=None)
    bm.add_sweep_args(p)
    args = p.parse_args()
    if args.hf_only:
        (name,) = args.models.split(",")
        bm.emit_result(bench_hf(name, args))
        return 0
    status, journal = bm.sweep_journal(args, args.out and args.out + ".journal")
    if journal is None:
        return status
    # HF runs first, each model in its own process, so that it never shares the GPU with JAX's pool.
    peers = (
        {
            name: journal.run(f"{name}/hf", run_hf_subprocess, name, args)
            for name in args.models.split(",")
        }
        if args.hf
        else {}
    )
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    report = {
        "device": bm.default_device().device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "limits": journal.run("limits", bm.card_limits, args.repeats),
        "models": {},
    }
    print(json.dumps(report["limits"]), flush=True)
    for name in args.models.split(","):
        report["models"][name] = {"jaxinfer": bench_jaxinfer(name, args, report["limits"], journal)}
        if name in peers:
            report["models"][name]["hf"] = peers[name]
        jax.clear_caches()
        if args.out:  # write as we go: a run cut short keeps what it measured
            bm.write_json(args.out, report)
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    lim = report["limits"]
    print(
        f"\n{report['device']}  jax {report['jax']}  copy {lim['copy_read_plus_write_GBps']:.0f} GB/s  "
        f"read {lim['read_GBps']:.0f} GB/s  bf16 matmul {lim['bf16_matmul_TFLOPs']:.0f} TFLOP/s"
    )
    for name, r in report["models"].items():
        hf = {d["batch"]: d for d in r.get("hf", {}).get("decode", [])}
        for d in r["jaxinfer"]["decode"]:
            if "error" in d:
                print(f"{name:10s} decode {d['impl']:6s} B={d['batch']}: {d['error'][:100]}")
                continue
            peer = hf.get(d["batch"], {}).get("ms_per_step", float("nan"))
            print(
                f"{name:10s} decode {d['impl']:6s} B={d['batch']:<3d} {d['ms_per_step']:8.2f} ms/step "
                f"{d['out_tok_per_s']:9.0f} tok/s  roofline {d['roofline_ms']:6.2f} ms "
                f"({d['x_roofline']:.2f}x; {d['x_read_roofline']:.2f}x of read)  HF {peer:8.2f} ms/step"
            )
        hf_pre = {d["tokens"]: d for d in r.get("hf", {}).get("prefill", [])}
        for d in r["jaxinfer"]["prefill"]:
            if "error" in d:
                print(f"{name:10s} prefill {d['impl']:6s} T={d['tokens']}: {d['error'][:100]}")
                continue
            peer = hf_pre.get(d["tokens"], {}).get("tok_per_s", float("nan"))
            print(
                f"{name:10s} prefill {d['impl']:6s} T={d['tokens']:<5d} {d['tok_per_s']:9.0f} tok/s "
                f"{d['TFLOPs']:6.1f} TFLOP/s ({100 * d['x_matmul_peak']:.0f}% of matmul)  HF {peer:9.0f} tok/s"
            )


if __name__ == "__main__":
    sys.exit(main())
