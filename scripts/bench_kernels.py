"""Benchmarks of the attention kernels on a GPU (and a CPU smoke run).

Prints one table and writes JSON (--out, default bench/results/kernels-<card>.json) with the
card, the JAX version, every shape, every figure and each kernel's error against a reference
on the GPU.

  python scripts/bench_kernels.py [--quick] [--out PATH]
  python scripts/bench_kernels.py --cpu-smoke        # tiny sizes, interpret

Figures:
  prefill: causal bf16 attention TFLOP/s (4*B*N*T*T*H/2 flops) of ours, cuDNN and XLA
    (jax.nn.dot_product_attention) and JAX's deprecated Pallas mha.
  decode: achieved KV-read GB/s (B*len*K*H*2 tensors*itemsize / time) of ours (paged), JAX's
    deprecated Pallas paged_attention, and a contiguous [B, S, K, H] cache through plain XLA;
    beside the device copy bandwidth measured in the same run (x + 1 over 2 GiB: bytes read +
    written).
  write_kv: GB/s of the scatter (new rows read + written).
Timing: each timed call runs `group` back-to-back kernel calls on rotating input sets inside one
jit (amortises dispatch, defeats L2 reuse); warm-up, then `repeats` timings of many calls, one
block_until_ready each; median. Each peer of each shape is one unit of a crash-resumable sweep
(jaxinfer.benchmark): a native crash in one peer's compile costs that peer's figure, recorded
as its error, not the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from pallas_kernels import common
from pallas_kernels import flash_attention_mgpu as mgpu

# the package exports functions of these names: take the modules
fa = importlib.import_module("pallas_kernels.flash_attention")
pa = importlib.import_module("pallas_kernels.paged_attention")


def measure(journal, key, fn, check, opts, name, data, ref, scale, unit):
    """One peer of one shape, as one journal unit: its error against `ref` (when given) and its
    time per call, as `{name}_err`, `{name}_{unit[0]}` (seconds * scale[0]) and
    `{name}_{unit[1]}` (scale[1] / seconds); a failure as `{name}_error`. data: the input sets,
    or a function that makes them (inside the unit)."""

    def run():
        sets = data() if callable(data) else data
        out = {f"{name}_err": bm.errors(jax.jit(fn)(*sets[0]), ref)} if check else {}
        sec = bm.time_over_sets(fn, sets, repeats=opts.repeats, min_time=opts.min_time)
        return {**out, f"{name}_{unit[0]}": sec * scale[0], f"{name}_{unit[1]}": scale[1] / sec}

    return journal.run(f"{key}/{name}", run, error_key=f"{name}_error")


# ----------------------------------------------------------------------------------------------
# Correctness on the device


def _qkv(key, q_shape, kv_shape, dt):
    ks = jax.random.split(key, 3)
    return (
        jax.random.normal(ks[0], q_shape, dt),
        jax.random.normal(ks[1], kv_shape, dt),
        jax.random.normal(ks[2], kv_shape, dt),
    )


def correctness_cases(opts):
    """(name, fn) of odd shapes of every path; fn() gives the error columns against the
    references, on the device."""
    key = jax.random.PRNGKey(1)
    cases = []
    # The Mosaic GPU kernel, forced (the default picks it only on Hopper): padded T and S,
    # T < S, one kv block, H 64/256, f16, non-causal, lse (tests/test_flash_attention.py holds
    # the finer sweep).
    mgpu_cases = (
        []
        if opts.cpu_smoke
        else [  # (B, T, S, N, K, H, causal, dtype)
            (2, 1023, 1023, 8, 2, 128, True, jnp.bfloat16),
            (1, 513, 700, 4, 1, 128, True, jnp.bfloat16),
            (1, 300, 300, 4, 4, 256, True, jnp.bfloat16),
            (1, 4096, 4096, 8, 1, 128, True, jnp.bfloat16),
        ]
    )
    for b, t, s, n, k, h, causal, dt in mgpu_cases:

        def check(b=b, t=t, s=s, n=n, k=k, h=h, causal=causal, dt=dt):
            q, kk, v = _qkv(jax.random.fold_in(key, 7 * t + h), (b, t, n, h), (b, s, k, h), dt)
            out, lse = fa.flash_attention(
                q, kk, v, causal=causal, return_lse=True, config=mgpu.MgpuFlashConfig.default(h)
            )
            ref, ref_lse = fa.flash_attention_reference(q, kk, v, causal=causal, return_lse=True)
            return {**bm.errors(out, ref), "lse": bm.errors(lse, ref_lse)}

        cases.append(
            (f"flash mgpu B{b} T{t} S{s} N{n} K{k} H{h} c{int(causal)} {dt.__name__} +lse", check)
        )
    small = [  # (B, T, S, N, K, H, causal, window, dtype)
        (2, 1023, 1023, 8, 2, 128, True, None, jnp.bfloat16),
        (1, 513, 700, 4, 1, 80, True, None, jnp.bfloat16),
        (1, 300, 300, 4, 4, 256, True, 64, jnp.bfloat16),
        (2, 200, 333, 8, 8, 64, False, None, jnp.float16),
        (1, 257, 257, 4, 2, 96, True, None, jnp.float32),
    ]
    if opts.cpu_smoke:
        small = [(1, 40, 40, 4, 2, 64, True, None, jnp.bfloat16)]
    for b, t, s, n, k, h, causal, win, dt in small:

        def check(b=b, t=t, s=s, n=n, k=k, h=h, causal=causal, win=win, dt=dt):
            q, kk, v = _qkv(jax.random.fold_in(key, t + h), (b, t, n, h), (b, s, k, h), dt)
            out = fa.flash_attention(q, kk, v, causal=causal, sliding_window=win)
            return bm.errors(
                out, fa.flash_attention_reference(q, kk, v, causal=causal, sliding_window=win)
            )

        cases.append(
            (f"flash B{b} T{t} S{s} N{n} K{k} H{h} c{int(causal)} w{win} {dt.__name__}", check)
        )
    lens = (1, 3, 17, 256, 513, 1023) if not opts.cpu_smoke else (1, 3, 17)

    def packed():
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
        q, kk, v = _qkv(key, (sum(lens), 8, 128), (sum(lens), 2, 128), jnp.bfloat16)
        out = fa.flash_attention(q, kk, v, cu_seqlens=cu, sliding_window=200)
        return bm.errors(
            out, fa.flash_attention_reference(q, kk, v, cu_seqlens=cu, sliding_window=200)
        )

    cases.append((f"flash packed {lens} N8 K2 H128 bf16 window 200", packed))
    paged = [
        ((1, 17, 1000, 4097), 32, 8, 128, 16, jnp.bfloat16),
        ((513, 64, 2), 8, 1, 80, 64, jnp.float32),
        ((300, 2048), 16, 2, 256, 128, jnp.bfloat16),
    ]
    if opts.cpu_smoke:
        paged = [((5, 40), 8, 2, 64, 16, jnp.bfloat16)]
    for case in paged:
        cases += paged_cases(*case)
    return cases


def paged_cases(lengths, n, k, h, page, dt):
    """Paged decode (split-K and one split) and ragged attention over shuffled pages."""

    def inputs():
        rng = np.random.default_rng(0)
        bsz, max_pages = len(lengths), -(-max(lengths) // page) + 1
        num_pages = bsz * max_pages + 2
        kp = jax.random.normal(jax.random.PRNGKey(2), (k, num_pages, page, h), dt)
        vp = jax.random.normal(jax.random.PRNGKey(3), (k, num_pages, page, h), dt)
        table = jnp.asarray(
            rng.permutation(num_pages)[: bsz * max_pages].reshape(bsz, max_pages), jnp.int32
        )
        return kp, vp, table, jnp.asarray(lengths, jnp.int32)

    def decode(cfg):
        kp, vp, table, lens = inputs()
        q = jax.random.normal(jax.random.PRNGKey(4), (len(lengths), n, h), dt)
        return bm.errors(
            pa.paged_attention(q, kp, vp, table, lens, config=cfg),
            pa.paged_attention_reference(q, kp, vp, table, lens),
        )

    q_lens = np.minimum(np.asarray([1, 7, 300, 33][: len(lengths)]), np.asarray(lengths))

    def ragged():
        kp, vp, table, lens = inputs()
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        qr = jax.random.normal(jax.random.PRNGKey(5), (int(cu[-1]), n, h), dt)
        return bm.errors(
            pa.ragged_paged_attention(qr, kp, vp, table, lens, cu),
            pa.ragged_paged_attention_reference(qr, kp, vp, table, lens, cu),
        )

    shape = f"N{n} K{k} H{h} L{page} {dt.__name__}"
    return [
        *(
            (f"paged decode lens{lengths} {shape} {cfg}", lambda cfg=cfg: decode(cfg))
            for cfg in (None, pa.PagedConfig(num_splits=1))
        ),
        (f"ragged kv{lengths} q{tuple(int(x) for x in q_lens)} {shape}", ragged),
    ]


# ----------------------------------------------------------------------------------------------
# Prefill


def _jax_ops(name: str):
    """A module of JAX's (deprecated) Pallas GPU ops, imported on use: a failure lands in that
    peer's error column."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{name}")


def _jax_mgpu_attention(block_kv: int):
    """JAX's Hopper (Mosaic GPU, warp-specialised) flash attention as a peer: what that backend
    reaches on this card."""

    def run(q, kk, v):
        ops = _jax_ops("attention_mgpu")
        config = ops.TuningConfig(
            block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True
        )
        return ops.attention(q, kk, v, config=config)

    return run


def prefill_peers(b, t, n, k, h, opts, configs, peers):
    """name -> attention fn of q, k, v (our configs, and the peers); the names whose config is
    the one "ours" runs (their figures are copied, not timed twice); and that config (None in
    the CPU smoke run)."""
    impls, same_as_ours, ours = {}, [], None
    if not opts.cpu_smoke:  # both of our backends, whichever the default is
        q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
        ours = configs.get("ours") or fa.default_config(
            q, packed=False, window=None, interpret=common.resolve_interpret(opts.interpret)
        )
        variants = {
            "ours_triton": fa.FlashConfig.default(h, jnp.bfloat16),
            "ours_mgpu": mgpu.MgpuFlashConfig.default(h),
            "ours_mgpu_s3": mgpu.MgpuFlashConfig(64, 128, 3),
            "ours_mgpu_kv64": mgpu.MgpuFlashConfig(64, 64, 3),
        }
        same_as_ours = [name for name, cfg in variants.items() if cfg == ours]
        configs = {
            **configs,
            **{name: cfg for name, cfg in variants.items() if name not in same_as_ours},
        }
    for name, cfg in configs.items():
        impls[name] = lambda q, kk, v, cfg=cfg: fa.flash_attention(
            q, kk, v, causal=True, config=cfg, interpret=opts.interpret
        )
    if peers and not opts.cpu_smoke:
        impls["cudnn"] = lambda q, kk, v: jax.nn.dot_product_attention(
            q, kk, v, is_causal=True, implementation="cudnn"
        )
        if b * n * t * t * 4 <= 8 * 2**30:
            impls["xla"] = lambda q, kk, v: jax.nn.dot_product_attention(
                q, kk, v, is_causal=True, implementation="xla"
            )

        def jax_mha(q, kk, v):
            g = n // k
            kk, v = jnp.repeat(kk, g, axis=2), jnp.repeat(v, g, axis=2)
            return _jax_ops("attention").mha(q, kk, v, None, sm_scale=1 / math.sqrt(h), causal=True)

        impls["jax_pallas_mha"] = jax_mha
        for block_kv in (128, 64):
            impls[f"jax_mgpu_bkv{block_kv}"] = _jax_mgpu_attention(block_kv)
    return impls, same_as_ours, ours


def prefill_case(b, t, n, k, h, opts, configs, journal, peers=True, tag="prefill"):
    dt = jnp.bfloat16
    flops = 4 * b * n * t * t * h / 2
    row = {
        "B": b,
        "T": t,
        "N": n,
        "K": k,
        "H": h,
        "dtype": "bf16",
        "causal": True,
        "flops": flops,
        "min_bytes": 2 * (2 * b * t * n * h + 2 * b * t * k * h),
    }
    impls, same_as_ours, ours = prefill_peers(b, t, n, k, h, opts, configs, peers)
    if ours is not None:
        row["ours_config"] = repr(ours)
    ks = jax.random.split(jax.random.PRNGKey(t + n + k), 6)
    sets = [
        tuple(jax.random.normal(ks[3 * i + j], (b, t, n if j == 0 else k, h), dt) for j in range(3))
        for i in range(2)
    ]
    # JAX's Mosaic GPU kernel takes f16 only (its shared-memory buffers are f16) and applies no
    # softmax scale: it gets f16 copies with q pre-scaled by 1/sqrt(h), made outside the timed
    # region; same flops, same result.
    f16_sets = [
        (
            (qkv[0] * (1 / math.sqrt(h))).astype(jnp.float16),
            *(x.astype(jnp.float16) for x in qkv[1:]),
        )
        for qkv in sets
    ]
    # reference output for the error column: cuDNN at big sizes, jnp at small
    q0, k0, v0 = sets[0]
    try:
        if t <= 2048 or opts.cpu_smoke or "cudnn" not in impls:
            ref, row["ref"] = fa.flash_attention_reference(q0, k0, v0, causal=True), "jnp f32"
        else:
            ref, row["ref"] = impls["cudnn"](q0, k0, v0), "cudnn"
    except Exception as e:
        ref, row["ref_error"] = None, bm.error_text(e, 600)
    key = f"{tag}/B{b} T{t} N{n} K{k} H{h}"
    for name, fn in impls.items():
        data = f16_sets if name.startswith("jax_mgpu") else sets
        row.update(
            measure(
                journal,
                key,
                fn,
                ref is not None,
                opts,
                name,
                data,
                ref,
                (1e3, flops / 1e12),
                ("ms", "tflops"),
            )
        )
    for name in same_as_ours:
        for suffix in ("err", "ms", "tflops", "error"):
            if f"ours_{suffix}" in row:
                row[f"{name}_{suffix}"] = row[f"ours_{suffix}"]
    return row


# ----------------------------------------------------------------------------------------------
# Decode


def decode_sets(b, ctx, page, n, k, h):
    """Input sets (q, k_pages, v_pages, block_table, lengths), at most 512 MiB of KV in all, and
    the pool's page count."""
    dt, max_pages = jnp.bfloat16, ctx // page
    kv_bytes = 2 * b * ctx * k * h * 2
    rng = np.random.default_rng(b * 7 + ctx)
    num_pages = b * max_pages
    sets = []
    for i in range(int(max(1, min(4, (512 * 2**20) // kv_bytes)))):
        kk = jax.random.split(jax.random.PRNGKey(1000 * i + b + ctx), 3)
        table = jnp.asarray(rng.permutation(num_pages).reshape(b, max_pages), jnp.int32)
        sets.append(
            (
                jax.random.normal(kk[2], (b, n, h), dt),
                jax.random.normal(kk[0], (k, num_pages, page, h), dt),
                jax.random.normal(kk[1], (k, num_pages, page, h), dt),
                table,
                jnp.full((b,), ctx, jnp.int32),
            )
        )
    return sets, num_pages


def _jax_paged(max_pages, h):
    def run(q, kp, vp, t, lens):
        splits = min(16, max_pages)
        while max_pages % splits:
            splits -= 1
        per = max_pages // splits
        ppcb = min(8, per)
        while per % ppcb:
            ppcb -= 1
        # JAX's kernel applies no logit scale: fold 1/sqrt(H) into q
        q = (q.astype(jnp.float32) / math.sqrt(h)).astype(q.dtype)
        return _jax_ops("paged_attention").paged_attention(
            q, kp, vp, t, lens, k_splits=splits, pages_per_compute_block=ppcb
        )

    return run


def decode_case(b, ctx, page, opts, configs, journal, n=32, k=8, h=128, peers=True, tag="decode"):
    max_pages = ctx // page
    kv_bytes = 2 * b * ctx * k * h * 2
    row = {
        "B": b,
        "ctx": ctx,
        "L": page,
        "N": n,
        "K": k,
        "H": h,
        "dtype": "bf16",
        "kv_bytes": kv_bytes,
        "flops": 4 * b * n * ctx * h,
    }
    sets, num_pages = decode_sets(b, ctx, page, n, k, h)
    row["input_sets"] = len(sets)
    impls = {}
    for name, cfg in configs.items():
        impls[name] = lambda q, kp, vp, t, lens, cfg=cfg: pa.paged_attention(
            q, kp, vp, t, lens, config=cfg, interpret=opts.interpret
        )
    # The paging cost of our own kernel: the same call with an identity block table (each
    # sequence's pages adjacent in memory), the true contiguous peer.
    identity = jnp.arange(num_pages, dtype=jnp.int32).reshape(b, max_pages)
    first = next(iter(configs.values()))
    impls["ours_identity"] = lambda q, kp, vp, t, lens: pa.paged_attention(
        q, kp, vp, identity, lens, config=first, interpret=opts.interpret
    )
    if peers and not opts.cpu_smoke:
        impls["jax_pallas_paged"] = _jax_paged(max_pages, h)
    q0, kp0, vp0, t0, l0 = sets[0]
    ref = pa.paged_attention_reference(q0, kp0, vp0, t0, l0)
    ref_identity = pa.paged_attention_reference(q0, kp0, vp0, identity, l0)
    key = f"{tag}/B{b} ctx{ctx} L{page} N{n} K{k} H{h}"
    for name, fn in impls.items():
        expected = ref_identity if name == "ours_identity" else ref
        row.update(
            measure(
                journal,
                key,
                fn,
                True,
                opts,
                name,
                sets,
                expected,
                (1e6, kv_bytes / 1e9),
                ("us", "GBps"),
            )
        )
    if peers:  # a contiguous cache [B, S, K, H] through plain XLA (same bytes)

        def contiguous():
            return [
                (q, pa.gather_contiguous(kp, t), pa.gather_contiguous(vp, t), lens)
                for q, kp, vp, t, lens in sets
            ]

        row.update(
            measure(
                journal,
                key,
                pa.contiguous_decode_reference,
                True,
                opts,
                "contiguous_xla",
                contiguous,
                ref,
                (1e6, kv_bytes / 1e9),
                ("us", "GBps"),
            )
        )
    return row


def write_kv_case(tokens, opts, k=8, h=128, page=16, pool_tokens=2**20):
    dt = jnp.bfloat16
    if opts.cpu_smoke:
        pool_tokens = 4096
    num_pages = pool_tokens // page
    pools = [
        jax.random.normal(jax.random.PRNGKey(0), (k, num_pages, page, h), dt),
        jax.random.normal(jax.random.PRNGKey(1), (k, num_pages, page, h), dt),
    ]
    kn = jax.random.normal(jax.random.PRNGKey(2), (tokens, k, h), dt)
    vn = jax.random.normal(jax.random.PRNGKey(3), (tokens, k, h), dt)
    slots = jnp.asarray(np.random.default_rng(0).permutation(pool_tokens)[:tokens], jnp.int32)
    moved = 2 * 2 * tokens * k * h * 2  # k and v, read new + write slot
    row = {"T": tokens, "K": k, "H": h, "L": page, "bytes": moved}
    step = jax.jit(pa.write_kv, donate_argnums=(0, 1))

    def write(_):  # the pools are donated: each call writes into the one before's output
        pools[:] = step(*pools, kn, vn, slots)
        return pools[0]

    sec = bm.pipelined_time(write, repeats=opts.repeats, calls=50 if not opts.cpu_smoke else 3)
    row["us"] = sec * 1e6
    row["GBps"] = moved / sec / 1e9
    got = pools[0].reshape(k, -1, h)[:, slots].swapaxes(0, 1)
    row["exact"] = bool(jnp.array_equal(got, kn))
    return row


# ----------------------------------------------------------------------------------------------
# Tile tuning: the best measured tiles become "ours" in the sweeps

FLASH_CANDIDATES = {
    "q128k128w8s3": fa.FlashConfig(128, 128, 8, 3),
    "q128k64w4s3": fa.FlashConfig(128, 64, 4, 3),
    "q128k64w8s3": fa.FlashConfig(128, 64, 8, 3),
    "q128k128w8s2": fa.FlashConfig(128, 128, 8, 2),
    "q64k64w4s3": fa.FlashConfig(64, 64, 4, 3),
}
PAGED_CANDIDATES = {
    "k64w4s3": pa.PagedConfig(block_k=64, num_warps=4, num_stages=3),
    "k128w4s3": pa.PagedConfig(block_k=128, num_warps=4, num_stages=3),
    "k32w4s4": pa.PagedConfig(block_k=32, num_warps=4, num_stages=4),
    "k64w8s3": pa.PagedConfig(block_k=64, num_warps=8, num_stages=3),
    "k128w8s2": pa.PagedConfig(block_k=128, num_warps=8, num_stages=2),
}


def tune(res, opts, journal, log, save):
    """Times the candidate tiles; returns the best flash and paged configs as {"ours": cfg}."""
    fcands, dcands = FLASH_CANDIDATES, PAGED_CANDIDATES
    if opts.cpu_smoke:
        fcands, dcands = dict(list(fcands.items())[:2]), dict(list(dcands.items())[:2])
        r = prefill_case(1, 128, 4, 2, 64, opts, fcands, journal, peers=False, tag="tune")
    else:
        r = prefill_case(4, 4096, 32, 8, 128, opts, fcands, journal, peers=False, tag="tune")
    res["tune_prefill"] = [r]
    scores = {c: r.get(f"{c}_tflops", 0.0) for c in fcands}
    best = max(scores, key=scores.get)
    flash = {"ours": fcands[best]}
    res["flash_config_used"] = {"name": best, **dataclasses.asdict(fcands[best])}
    log("tune prefill", scores, "->", best)
    save()
    res["tune_decode"] = []
    totals = {c: 0.0 for c in dcands}
    shapes = ((32, 4096, 16), (1, 32768, 64)) if not opts.cpu_smoke else ((2, 64, 16),)
    heads = dict(n=4, k=2, h=64) if opts.cpu_smoke else {}
    for b, ctx, page in shapes:
        r = decode_case(b, ctx, page, opts, dcands, journal, peers=False, tag="tune", **heads)
        res["tune_decode"].append(r)
        for c in dcands:
            totals[c] += r.get(f"{c}_GBps", 0.0)
        log("tune decode", b, ctx, page, {k: round(v) for k, v in r.items() if k.endswith("GBps")})
        save()
    best = max(totals, key=totals.get)
    res["paged_config_used"] = {"name": best, **dataclasses.asdict(dcands[best])}
    log("tune decode ->", best)
    save()
    return flash, {"ours": dcands[best]}


def sweep_prefill(res, opts, flash_cfgs, journal, log, save):
    res["prefill"] = []
    ts = [1024, 4096, 16384] if opts.quick else [512, 1024, 2048, 4096, 8192, 16384]
    heads = [(32, 8), (32, 32)]
    if opts.cpu_smoke:
        ts, heads = [64, 128], [(4, 2)]
    for n, k in heads:
        for t in ts:
            b = max(1, (16384 if not opts.cpu_smoke else 128) // t)
            h = 128 if not opts.cpu_smoke else 64
            r = prefill_case(b, t, n, k, h, opts, flash_cfgs, journal)
            res["prefill"].append(r)
            log(
                "prefill",
                b,
                t,
                n,
                k,
                {k_: round(v, 1) for k_, v in r.items() if k_.endswith("tflops")},
                {k_: v for k_, v in r.items() if k_.endswith("error")},
            )
            save()


def sweep_decode(res, opts, paged_cfgs, journal, log, save):
    res["decode"] = []
    batches, ctxs, pages = [1, 8, 32, 64, 128, 256], [512, 2048, 8192, 32768], [16, 64]
    if opts.quick:
        batches, ctxs = [32, 128, 1], [2048, 8192, 32768]
    if opts.cpu_smoke:
        batches, ctxs, pages = [1, 2], [64], [16]
    heads = dict(n=4, k=2, h=64) if opts.cpu_smoke else {}
    for b in batches:
        for ctx in ctxs:
            for page in pages:
                if b * ctx > (2**21 if not opts.quick else 2**20):  # KV > 8/4 GiB
                    continue
                r = decode_case(b, ctx, page, opts, paged_cfgs, journal, **heads)
                r["copy_GBps"] = res["copy"]["GBps"]
                res["decode"].append(r)
                log(
                    "decode",
                    b,
                    ctx,
                    page,
                    {k_: round(v) for k_, v in r.items() if k_.endswith("GBps")},
                    {k_: v for k_, v in r.items() if k_.endswith("error")},
                )
                save()


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--skip", default="", help="comma list: correctness,tune,prefill,decode,write")
    bm.add_sweep_args(ap)
    opts = ap.parse_args()
    opts.interpret = True if opts.cpu_smoke else None
    opts.repeats = 2 if opts.cpu_smoke else 5
    opts.min_time = 0.0 if opts.cpu_smoke else 0.1
    skip = set(filter(None, opts.skip.split(",")))
    # first, before JAX takes the GPU: the sweep itself runs in a crash-resumable child
    status, journal = bm.sweep_journal(opts, opts.out and opts.out + ".journal")
    if journal is None:
        return status
    dev = bm.default_device()
    card = dev.device_kind
    slug = card.lower().replace(" ", "-").replace("/", "-")
    out_path = opts.out or f"bench/results/kernels-{slug}.json"
    res = {
        "card": card,
        "platform": dev.platform,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) if hasattr(jax, "lib") else None,
        "python": platform.python_version(),
        "quick": opts.quick,
        "cpu_smoke": opts.cpu_smoke,
        "num_sms": getattr(dev, "core_count", None),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t_start = time.time()

    def save():
        res["elapsed_s"] = time.time() - t_start
        bm.write_json(out_path, res)

    def log(*a):
        print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)

    limits = journal.run("limits", bm.card_limits, opts.repeats)
    res["copy"] = {
        "bytes_read_plus_written": limits["copy_bytes"],
        "seconds": limits["copy_bytes"] / limits["copy_read_plus_write_GBps"] / 1e9,
        "GBps": limits["copy_read_plus_write_GBps"],
    }
    log("copy", res["copy"])
    save()
    if "correctness" not in skip:
        res["correctness"] = [
            journal.run(
                f"check/{name}",
                lambda fn=fn, name=name: {"case": name, **fn()},
                error_row={"case": name},
            )
            for name, fn in correctness_cases(opts)
        ]
        for r in res["correctness"]:
            log("check", r)
        save()
    flash_cfgs, paged_cfgs = {"ours": None}, {"ours": None}
    if "tune" not in skip:
        flash_cfgs, paged_cfgs = tune(res, opts, journal, log, save)
    if "prefill" not in skip:
        sweep_prefill(res, opts, flash_cfgs, journal, log, save)
    if "decode" not in skip:
        sweep_decode(res, opts, paged_cfgs, journal, log, save)
    if "write" not in skip:
        res["write_kv"] = []
        for tokens in [256, 8192] if not opts.cpu_smoke else [16]:
            res["write_kv"].append(
                journal.run(
                    f"write_kv/T{tokens}", write_kv_case, tokens, opts, error_row={"T": tokens}
                )
            )
            log("write_kv", res["write_kv"][-1])
            save()
    save()
    print_table(res)
    print("wrote", out_path)
    return 0


def print_table(res):
    print(f"\ncard {res['card']}  jax {res['jax']}  copy {res['copy']['GBps']:.0f} GB/s")
    for r in res.get("correctness", []):
        print(
            f"  check {r['case'][:70]:70s} "
            + (
                f"rel {r['rel_err']:.2e} finite {r['finite']}"
                if "rel_err" in r
                else r.get("error", "")[:80]
            )
        )
    if res.get("prefill"):
        print(
            f"\n{'B':>3} {'T':>6} {'N/K':>6} | TFLOP/s: ours  (triton mgpu) cudnn   xla  "
            "jax-mha jax-mgpu | ours/cudnn"
        )
        for r in res["prefill"]:

            def g(k, r=r):
                return r.get(f"{k}_tflops", float("nan"))

            mgpu_best = max(
                (
                    v
                    for key, v in r.items()
                    if key.startswith("jax_mgpu") and key.endswith("_tflops")
                ),
                default=float("nan"),
            )
            print(
                f"{r['B']:3d} {r['T']:6d} {r['N']:3d}/{r['K']:<2d} | "
                f"{g('ours'):10.1f} ({g('ours_triton'):6.1f} {g('ours_mgpu'):5.1f}) "
                f"{g('cudnn'):6.1f} {g('xla'):5.1f} "
                f"{g('jax_pallas_mha'):7.1f} {mgpu_best:8.1f} | "
                f"{g('ours') / g('cudnn'):.2f}"
            )
    if res.get("decode"):
        print(
            f"\n{'B':>4} {'ctx':>6} {'L':>3} | GB/s: ours  identity  "
            "jax-paged  contig-xla | ours/copy ours/identity ours/contig"
        )
        for r in res["decode"]:

            def g(k, r=r):
                return r.get(f"{k}_GBps", float("nan"))

            print(
                f"{r['B']:4d} {r['ctx']:6d} {r['L']:3d} | {g('ours'):9.0f} "
                f"{g('ours_identity'):9.0f} {g('jax_pallas_paged'):9.0f} "
                f"{g('contiguous_xla'):10.0f} | {g('ours') / r['copy_GBps']:.2f} "
                f"{g('ours') / g('ours_identity'):.2f} "
                f"{g('ours') / g('contiguous_xla'):.2f}"
            )
    for r in res.get("write_kv", []):
        print(
            f"write_kv T={r['T']}: {r.get('us', float('nan')):.1f} us "
            f"{r.get('GBps', float('nan')):.0f} GB/s exact={r.get('exact')}"
        )


if __name__ == "__main__":
    sys.exit(main())
