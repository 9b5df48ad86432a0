"""Benchmark of `jaxinfer.generate` on a GPU: decode ms/step and prefill tokens/s, beside the HBM
roofline and the bf16 matmul peak measured on the same card, and beside HF transformers.

    python scripts/bench_generate.py --models llama2-7b,llama3-8b --hf --out bench/results/x.json
    python scripts/bench_generate.py --models tiny --batches 1,2 --prompt 32 --new 8 --prefill 64   # CPU smoke

Random weights of real model shapes (speed does not depend on weight values). Decode step time =
(one generate call of `--new` tokens - one prefill call) / (new - 1); medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_theta=1e6, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=14336),
    "tiny-moe": dict(model_type="mixtral", vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                     max_position_embeddings=4096, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=256),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=4096),
}


def random_model(name: str, dtype: str = "bfloat16", layers: int = 0):
    """A Model of the shape `name` (SHAPES) with random weights and no tokenizer; `layers` > 0
    overrides the layer count. Speed does not depend on the weights' values."""
    import jax.numpy as jnp

    import jaxinfer
    from jaxinfer.config import ModelConfig

    cfg = ModelConfig(**dict(SHAPES[name], **({"num_layers": layers} if layers else {})))
    return jaxinfer.Model(cfg, jaxinfer.init_params(cfg, dtype), None, jnp.dtype(dtype))


def median_time(fn, repeats: int, setup=lambda: None) -> float:
    """Median seconds of `fn(setup())` over `repeats` runs, after one warm-up; fn must block."""
    fn(setup())
    times = []
    for _ in range(repeats):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# The card's two ceilings


def card_limits(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    n = (1 << 29) if jax.default_backend() == "gpu" else (1 << 22)  # 2 GiB of f32 on a GPU
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    read = jax.jit(lambda a: jnp.sum(a))
    m = 8192 if jax.default_backend() == "gpu" else 256
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)

    def many(f, *args, k=20):  # back-to-back launches, one sync
        return lambda _: jax.block_until_ready([f(*args) for _ in range(k)])
    t_copy = median_time(many(copy, x), repeats) / 20
    t_read = median_time(many(read, x), repeats) / 20
    t_mm = median_time(many(mm, a, a, k=10), repeats) / 10
    return {"copy_read_plus_write_GBps": 2 * 4 * n / t_copy / 1e9,
            "read_GBps": 4 * n / t_read / 1e9,
            "bf16_matmul_TFLOPs": 2 * m ** 3 / t_mm / 1e12}


# --------------------------------------------------------------------------------------------
# jaxinfer


def decode_bytes(cfg, batch: int, context: float, distinct: float | None = None) -> dict:
    """Bytes one decode step must read: every weight but the embedding table, and the live KV.

    With experts, only the distinct experts the step's tokens pick are needed: `distinct` per
    layer when measured (`routed_experts`), else the count for k of E picked uniformly,
    E * (1 - (1 - k/E)^B) (exact at batch 1; random routers are far from uniform at batch > 1).
    """
    weights = 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings))
    if cfg.num_experts:
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        if distinct is None:
            distinct = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)
        weights -= 2 * cfg.num_layers * expert * (cfg.num_experts - distinct)
    kv = 2 * batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context
    return {"weight_bytes": weights, "kv_bytes": kv}


def bench_jaxinfer(name: str, args, limits: dict) -> dict:
    import numpy as np

    model = random_model(name, args.dtype, args.layers)
    cfg = model.config
    rng = np.random.RandomState(0)
    result = {"config": dataclasses.asdict(cfg), "params": cfg.num_params, "decode": [], "prefill": []}
    impls = args.impls.split(",")
    result["check"] = check_impls(model, impls, rng)
    print(json.dumps(result["check"]), flush=True)
    # Decode attention is the same XLA code for every impl; the MoE dispatch is not (pallas: our
    # grouped matmul, else ragged_dot), hence --decode-impls.
    for impl in (args.decode_impls or impls[0]).split(","):
        for batch in _ints(args.batches):
            result["decode"].append(_decode_row(model, model.decoder(impl), batch, args, limits, rng))
            print(json.dumps(result["decode"][-1]), flush=True)
    for impl in impls:
        for tokens in _ints(args.prefill):
            result["prefill"].append(_prefill_row(model, model.decoder(impl), tokens, args, limits, rng))
            print(json.dumps(result["prefill"][-1]), flush=True)
    del model
    return result


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def check_impls(model, impls, rng) -> dict:
    """A bf16 forward per impl against impl="reference" on this card, per position p:
    err[p] = max |logits - reference| / max |reference|. Reports the max and median of err, how
    often the greedy token agrees, and with experts how often the routing agrees: one bf16
    rounding that flips a near-tied top-k choice changes that position's later layers, so the max
    alone says little about a MoE model (the kernels' own tests bound their error)."""
    import numpy as np

    ids = rng.randint(0, model.config.vocab_size, (2, 200))
    ref, ref_picks = _logits_and_routing(model, "reference", ids)
    report = {"rel_error_vs_reference": {}, "median_rel_error": {}, "argmax_agreement": {}}
    if ref_picks is not None:
        report.update(routing_agreement={}, routing_agreement_by_layer={},
                      max_rel_error_where_routing_agrees={})
    for impl in impls:
        try:
            out, picks = _logits_and_routing(model, impl, ids)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            report["rel_error_vs_reference"][impl] = f"{type(e).__name__}: {e}"[:300]
            continue
        err = np.abs(out - ref).max(-1) / np.abs(ref).max(-1)  # [B, T]
        report["rel_error_vs_reference"][impl] = float(err.max())
        report["median_rel_error"][impl] = float(np.median(err))
        report["argmax_agreement"][impl] = float((out.argmax(-1) == ref.argmax(-1)).mean())
        if picks is not None:
            same = (np.sort(picks, -1) == np.sort(ref_picks, -1)).all(-1)  # [L, B, T]
            report["routing_agreement"][impl] = float(same.mean())
            # a flip's effect grows layer by layer: agreement falls with depth if that is all
            report["routing_agreement_by_layer"][impl] = [round(float(a), 4)
                                                          for a in same.mean((1, 2))]
            agree = same.all(0)  # positions routed alike in every layer
            report["max_rel_error_where_routing_agrees"][impl] = (
                float(err[agree].max()) if agree.any() else None)
    return report


def _logits_and_routing(model, impl, ids):
    """f32 logits [B, T, V] of a cacheless forward, and the experts each layer picked
    [L, B, T, k] (None for a dense model), as numpy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    decoder = model.decoder(impl)

    @jax.jit
    def run(params, tokens):
        logits, picks = _apply_with_routing(decoder, params, tokens)
        return logits.astype(jnp.float32), picks
    logits, picks = run(model.params, jnp.asarray(ids, jnp.int32))
    return np.asarray(logits), (np.stack([np.asarray(p) for p in picks]) if picks else None)


def _apply_with_routing(decoder, params, tokens):
    """A cacheless forward of tokens [B, T] (traced): logits [B, T, V] and the routing the MoE
    blocks sowed (`intermediates/experts`), one [B, T, k] per layer ([] for a dense model)."""
    import jax
    import jax.numpy as jnp

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    (logits, _), state = decoder.apply({"params": params}, tokens, positions,
                                       mutable=["intermediates"])
    picks = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if "experts" in jax.tree_util.keystr(path)]
    return logits, picks


def routed_experts(model, tokens, last: int) -> float:
    """Distinct experts per layer that a batch's tokens at one position pick, measured: a forward
    of `tokens` [B, T] with the routing sown, counted at each of the last `last` positions and
    averaged over positions and layers. Fed the prompts followed by the generated tokens, the last
    positions route exactly what the decode steps routed (causal: same inputs, same hidden states
    up to rounding); the jitted decode loop itself does not expose its routing."""
    import jax
    import jax.numpy as jnp

    cfg, decoder = model.config, model.decoder(None)

    @jax.jit
    def count(params, toks):
        _, picks = _apply_with_routing(decoder, params, toks)  # each [B, T, k]
        per_layer = [jnp.any(jax.nn.one_hot(e[:, -last:], cfg.num_experts, dtype=bool),
                             axis=(0, 2)).sum(-1).mean() for e in picks]
        return jnp.stack(per_layer).mean()
    return float(count(model.params, tokens))


def _decode_row(model, decoder, batch, args, limits, rng) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.generate import _bucket_lengths, _generate, round_up, row_sampling
    from jaxinfer.models.llama import init_cache

    cfg = model.config
    t, s = _bucket_lengths(model, args.prompt, args.new)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, t)), jnp.int32)
    lengths = jnp.full((batch,), args.prompt, jnp.int32)
    greedy, mode = row_sampling(batch, 0.0, 0, 1.0, seed=0)
    fresh = lambda: jax.block_until_ready(init_cache(cfg, batch, s, model.dtype))  # noqa: E731

    generated = {}  # new -> the last call's tokens (greedy: every call makes the same ones)

    def run_generate(cache, new):
        out, cache = _generate(decoder, model.params, cache, tokens, lengths, jnp.int32(new),
                               jnp.asarray([-2], jnp.int32), greedy, out_len=round_up(args.new, 32),
                               mode=mode)
        jax.block_until_ready(out)
        assert int((out[:, :new] >= 0).sum()) == batch * new  # every step ran
        generated[new] = out  # [batch, >= new]

    # The same compiled program with 1 and with `new` tokens: the difference is new - 1 decode steps.
    t_gen = median_time(lambda c: run_generate(c, args.new), args.repeats, fresh)
    t_pre = median_time(lambda c: run_generate(c, 1), args.repeats, fresh)
    step = (t_gen - t_pre) / (args.new - 1)
    distinct = None
    if cfg.num_experts:  # the decode steps fed generated tokens 0 .. new-2 back in
        fed = jnp.concatenate([tokens[:, :args.prompt], generated[args.new][:, :args.new - 1]],
                              axis=1)
        distinct = routed_experts(model, fed, last=args.new - 1)
    need = decode_bytes(cfg, batch, args.prompt + args.new / 2, distinct)
    roofline = (need["weight_bytes"] + need["kv_bytes"]) / (limits["copy_read_plus_write_GBps"] * 1e9)
    read_roofline = roofline * limits["copy_read_plus_write_GBps"] / limits["read_GBps"]
    return {"impl": decoder.impl, "batch": batch, "prompt": args.prompt, "new_tokens": args.new,
            "cache_len": s, "ms_per_step": step * 1e3, "out_tok_per_s": batch / step,
            "generate_s": t_gen, "generate_1_token_s": t_pre, **need,
            "distinct_experts_per_layer": distinct,
            "roofline_ms": roofline * 1e3, "x_roofline": step / roofline,
            "read_roofline_ms": read_roofline * 1e3, "x_read_roofline": step / read_roofline}


def _prefill_row(model, decoder, tokens_n, args, limits, rng) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.generate import _prefill_jit
    from jaxinfer.models.llama import init_cache

    cfg = model.config
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, tokens_n)), jnp.int32)
    lengths = jnp.full((1,), tokens_n, jnp.int32)
    fresh = lambda: jax.block_until_ready(init_cache(cfg, 1, tokens_n, model.dtype))  # noqa: E731
    try:
        t = median_time(lambda c: jax.block_until_ready(
            _prefill_jit(decoder, model.params, c, tokens, lengths)), args.repeats, fresh)
    except Exception as e:  # an impl that cannot run here is reported, not fatal
        return {"impl": decoder.impl, "tokens": tokens_n, "error": f"{type(e).__name__}: {e}"[:300]}
    flops = prefill_flops(cfg, tokens_n)
    return {"impl": decoder.impl, "tokens": tokens_n, "ms": t * 1e3, "tok_per_s": tokens_n / t,
            "TFLOPs": flops / t / 1e12, "x_matmul_peak": flops / t / 1e12 / limits["bf16_matmul_TFLOPs"]}


def prefill_flops(cfg, t: int) -> float:
    """Matmul flops of one causal prefill of t tokens (weights, causal attention, last-token head)."""
    # each token runs k of the E experts: active, not total, parameters
    body = cfg.active_params - cfg.vocab_size * cfg.hidden_size * (2 - cfg.tie_word_embeddings)
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t / 2
    return 2 * body * t + attn + 2 * cfg.hidden_size * cfg.vocab_size


# --------------------------------------------------------------------------------------------
# HF transformers, the peer (its own process, so the two frameworks don't share GPU memory)


def hf_random_model(shape: dict):
    """HF transformers' Llama of `shape` with random bf16 weights, on the GPU if there is one."""
    import torch
    import transformers

    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=shape.get("rope_theta", 10000.0), eos_token_id=None, pad_token_id=0)
    if shape["model_type"] == "mixtral":
        config = transformers.MixtralConfig(**dict(
            common, intermediate_size=shape["moe_intermediate_size"],
            num_local_experts=shape["num_experts"], num_experts_per_tok=shape["num_experts_per_tok"]))
        cls = transformers.MixtralForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: Mixtral in f32 would not fit
    try:
        with torch.device(device):
            return cls(config).eval(), device
    finally:
        torch.set_default_dtype(default)


def bench_hf(name: str, args) -> dict:
    import torch
    import transformers

    shape = SHAPES[name]
    model, device = hf_random_model(shape)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "decode": [],
              "prefill": []}
    for batch in _ints(args.hf_batches):
        ids = torch.randint(0, shape["vocab_size"], (batch, args.prompt), device=device)

        def gen(_):
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False)
            sync()

        def pre(_):
            with torch.no_grad():
                model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            sync()
        t_gen, t_pre = median_time(gen, args.hf_repeats), median_time(pre, args.hf_repeats)
        step = (t_gen - t_pre) / (args.new - 1)
        result["decode"].append({"batch": batch, "ms_per_step": step * 1e3, "out_tok_per_s": batch / step,
                                 "generate_s": t_gen, "prefill_s": t_pre})
        print(json.dumps(result["decode"][-1]), flush=True)
    for tokens_n in _ints(args.prefill):
        ids = torch.randint(0, shape["vocab_size"], (1, tokens_n), device=device)

        def pre(_):
            with torch.no_grad():
                model(ids, logits_to_keep=1)
            sync()
        t = median_time(pre, args.hf_repeats)
        result["prefill"].append({"tokens": tokens_n, "ms": t * 1e3, "tok_per_s": tokens_n / t})
        print(json.dumps(result["prefill"][-1]), flush=True)
    return result


def run_hf_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--hf-only", "--models", name, "--prompt", str(args.prompt),
           "--new", str(args.new), "--prefill", args.prefill, "--hf-batches", args.hf_batches,
           "--hf-repeats", str(args.hf_repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout)
    sys.stderr.write(proc.stderr[-3000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("HF_RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    return json.loads(lines[-1][len("HF_RESULT "):])


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prefill", default="512,2048")
    p.add_argument("--impls", default="cudnn,xla",
                   help="attention impls for prefill, comma-separated; decode uses the first")
    p.add_argument("--decode-impls", default=None, help="impls timed in decode (default: the first)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations (float32: the "
                   "check's rounding floor, with JAX_DEFAULT_MATMUL_PRECISION=highest)")
    p.add_argument("--hf", action="store_true", help="also time HF transformers (own process)")
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-batches", default="1,8,64")
    p.add_argument("--hf-repeats", type=int, default=2)
    p.add_argument("--hf-timeout", type=int, default=900)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.hf_only:
        (name,) = args.models.split(",")
        print("HF_RESULT " + json.dumps(bench_hf(name, args)), flush=True)
        return 0
    # HF runs first, each model in its own process, so that it never shares the GPU with JAX's pool.
    peers = {name: run_hf_subprocess(name, args) for name in args.models.split(",")} if args.hf else {}
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "args": vars(args), "limits": card_limits(args.repeats), "models": {}}
    print(json.dumps(report["limits"]), flush=True)
    for name in args.models.split(","):
        report["models"][name] = {"jaxinfer": bench_jaxinfer(name, args, report["limits"])}
        if name in peers:
            report["models"][name]["hf"] = peers[name]
        jax.clear_caches()
        if args.out:  # write as we go: a run cut short keeps what it measured
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    lim = report["limits"]
    print(f"\n{report['device']}  jax {report['jax']}  copy {lim['copy_read_plus_write_GBps']:.0f} GB/s  "
          f"read {lim['read_GBps']:.0f} GB/s  bf16 matmul {lim['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    for name, r in report["models"].items():
        hf = {d["batch"]: d for d in r.get("hf", {}).get("decode", [])}
        for d in r["jaxinfer"]["decode"]:
            peer = hf.get(d["batch"], {}).get("ms_per_step", float("nan"))
            print(f"{name:10s} decode {d['impl']:6s} B={d['batch']:<3d} {d['ms_per_step']:8.2f} ms/step "
                  f"{d['out_tok_per_s']:9.0f} tok/s  roofline {d['roofline_ms']:6.2f} ms "
                  f"({d['x_roofline']:.2f}x; {d['x_read_roofline']:.2f}x of read)  HF {peer:8.2f} ms/step")
        hf_pre = {d["tokens"]: d for d in r.get("hf", {}).get("prefill", [])}
        for d in r["jaxinfer"]["prefill"]:
            if "error" in d:
                print(f"{name:10s} prefill {d['impl']:6s} T={d['tokens']}: {d['error'][:100]}")
                continue
            peer = hf_pre.get(d["tokens"], {}).get("tok_per_s", float("nan"))
            print(f"{name:10s} prefill {d['impl']:6s} T={d['tokens']:<5d} {d['tok_per_s']:9.0f} tok/s "
                  f"{d['TFLOPs']:6.1f} TFLOP/s ({100 * d['x_matmul_peak']:.0f}% of matmul)  HF {peer:9.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
