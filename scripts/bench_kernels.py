"""Benchmarks of the attention kernels on a GPU (and a CPU smoke run).

Prints one table and writes JSON (--out, default
bench/results/kernels-<card>.json) with the card, the JAX version, every
shape, every figure and each kernel's error against a reference on the GPU.

  python scripts/bench_kernels.py [--quick] [--out PATH]
  python scripts/bench_kernels.py --cpu-smoke        # tiny sizes, interpret

Figures:
  prefill: causal bf16 attention TFLOP/s (4*B*N*T*T*H/2 flops) of ours,
    cuDNN and XLA (jax.nn.dot_product_attention) and JAX's deprecated
    Pallas mha.
  decode: achieved KV-read GB/s (B*len*K*H*2 tensors*itemsize / time) of
    ours (paged), JAX's deprecated Pallas paged_attention, and a contiguous
    [B, S, K, H] cache through plain XLA; beside the device copy bandwidth
    measured in the same run (x + 1 over 2 GiB: bytes read + written).
  write_kv: GB/s of the scatter (new rows read + written).
Timing: each timed call runs `group` back-to-back kernel calls on rotating
input sets inside one jit (amortises dispatch, defeats L2 reuse); warm-up,
then `repeats` timings of many calls, one block_until_ready each; median.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import importlib  # noqa: E402

# the package exports functions of the same names: take the modules
fa = importlib.import_module("pallas_kernels.flash_attention")
pa = importlib.import_module("pallas_kernels.paged_attention")


def err_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:600]}"


def rel_err(out, ref) -> dict:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  finite = bool(np.isfinite(out).all())
  rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
  return {"rel_err": rel, "max_abs_err": float(np.abs(out - ref).max()),
          "finite": finite}


def time_group(fn, sets, *, repeats, min_time):
  """Median seconds per call of fn over rotating arg sets.

  One jit runs fn once per set; sets differ, so nothing is CSE'd.
  """
  group = jax.jit(lambda ss: [fn(*s) for s in ss])
  jax.block_until_ready(group(sets))  # compile + warm
  t0 = time.perf_counter()
  jax.block_until_ready(group(sets))
  est = max(time.perf_counter() - t0, 1e-6)
  iters = int(min(max(min_time / est, 2), 200))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = group(sets)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / (iters * len(sets)))
  return statistics.median(times), times


# ----------------------------------------------------------------------------
def copy_bandwidth(nbytes, opts):
  x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32)
  sec, _ = time_group(lambda a: a + 1, [(x,)], repeats=opts.repeats,
                      min_time=opts.min_time)
  return {"bytes_read_plus_written": 2 * x.nbytes, "seconds": sec,
          "GBps": 2 * x.nbytes / sec / 1e9}


def gpu_correctness(opts):
  """Odd shapes of every path against the references, on the device."""
  rows = []
  key = jax.random.PRNGKey(1)
  small = [  # (B, T, S, N, K, H, causal, window, dtype)
      (2, 1023, 1023, 8, 2, 128, True, None, jnp.bfloat16),
      (1, 513, 700, 4, 1, 80, True, None, jnp.bfloat16),
      (1, 300, 300, 4, 4, 256, True, 64, jnp.bfloat16),
      (2, 200, 333, 8, 8, 64, False, None, jnp.float16),
      (1, 257, 257, 4, 2, 96, True, None, jnp.float32),
  ]
  if opts.cpu_smoke:
    small = [(1, 40, 40, 4, 2, 64, True, None, jnp.bfloat16)]
  # The Mosaic GPU kernel, forced (the default picks it only on Hopper):
  # padded T and S, T < S, one kv block, H 64/256, f16, non-causal, lse.
  # (tests/test_flash_attention.py holds the finer sweep.)
  mgpu_cases = [  # (B, T, S, N, K, H, causal, dtype)
      (2, 1023, 1023, 8, 2, 128, True, jnp.bfloat16),
      (1, 513, 700, 4, 1, 128, True, jnp.bfloat16),
      (1, 300, 300, 4, 4, 256, True, jnp.bfloat16),
      (1, 4096, 4096, 8, 1, 128, True, jnp.bfloat16)]
  for b, t, s, n, k, h, causal, dt in ([] if opts.cpu_smoke else mgpu_cases):
    name = f"flash mgpu B{b} T{t} S{s} N{n} K{k} H{h} c{int(causal)} {dt.__name__} +lse"
    try:
      ks = jax.random.split(jax.random.fold_in(key, 7 * t + h), 3)
      q = jax.random.normal(ks[0], (b, t, n, h), dt)
      kk = jax.random.normal(ks[1], (b, s, k, h), dt)
      v = jax.random.normal(ks[2], (b, s, k, h), dt)
      out, lse = fa.flash_attention(q, kk, v, causal=causal, return_lse=True,
                                    config=fa.mgpu.MgpuFlashConfig.default(h))
      ref, ref_lse = fa.flash_attention_reference(q, kk, v, causal=causal,
                                                  return_lse=True)
      rows.append({"case": name, **rel_err(out, ref),
                   "lse": rel_err(lse, ref_lse)})
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"case": name, "error": err_text(e)})
  for b, t, s, n, k, h, causal, win, dt in small:
    name = f"flash B{b} T{t} S{s} N{n} K{k} H{h} c{int(causal)} w{win} {dt.__name__}"
    try:
      ks = jax.random.split(jax.random.fold_in(key, t + h), 3)
      q = jax.random.normal(ks[0], (b, t, n, h), dt)
      kk = jax.random.normal(ks[1], (b, s, k, h), dt)
      v = jax.random.normal(ks[2], (b, s, k, h), dt)
      out = fa.flash_attention(q, kk, v, causal=causal, sliding_window=win)
      ref = fa.flash_attention_reference(q, kk, v, causal=causal,
                                         sliding_window=win)
      rows.append({"case": name, **rel_err(out, ref)})
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"case": name, "error": err_text(e)})
  # packed
  lens = (1, 3, 17, 256, 513, 1023) if not opts.cpu_smoke else (1, 3, 17)
  name = f"flash packed {lens} N8 K2 H128 bf16 window 200"
  try:
    tot = sum(lens)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (tot, 8, 128), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (tot, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (tot, 2, 128), jnp.bfloat16)
    out = fa.flash_attention(q, kk, v, cu_seqlens=cu, sliding_window=200)
    ref = fa.flash_attention_reference(q, kk, v, cu_seqlens=cu,
                                       sliding_window=200)
    rows.append({"case": name, **rel_err(out, ref)})
  except Exception as e:  # pylint: disable=broad-except
    rows.append({"case": name, "error": err_text(e)})
  # paged decode + ragged
  rng = np.random.default_rng(0)
  cases = [((1, 17, 1000, 4097), 32, 8, 128, 16, jnp.bfloat16),
           ((513, 64, 2), 8, 1, 80, 64, jnp.float32),
           ((300, 2048), 16, 2, 256, 128, jnp.bfloat16)]
  if opts.cpu_smoke:
    cases = [((5, 40), 8, 2, 64, 16, jnp.bfloat16)]
  for lengths, n, k, h, page, dt in cases:
    max_pages = -(-max(lengths) // page) + 1
    bsz = len(lengths)
    num_pages = bsz * max_pages + 2
    kp = jax.random.normal(jax.random.PRNGKey(2), (k, num_pages, page, h), dt)
    vp = jax.random.normal(jax.random.PRNGKey(3), (k, num_pages, page, h), dt)
    table = jnp.asarray(rng.permutation(num_pages)[:bsz * max_pages]
                        .reshape(bsz, max_pages), jnp.int32)
    lens = jnp.asarray(lengths, jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(4), (bsz, n, h), dt)
    for cfg in (None, pa.PagedConfig(num_splits=1)):
      name = f"paged decode lens{lengths} N{n} K{k} H{h} L{page} {dt.__name__} {cfg}"
      try:
        out = pa.paged_attention(q, kp, vp, table, lens, config=cfg)
        ref = pa.paged_attention_reference(q, kp, vp, table, lens)
        rows.append({"case": name, **rel_err(out, ref)})
      except Exception as e:  # pylint: disable=broad-except
        rows.append({"case": name, "error": err_text(e)})
    q_lens = np.minimum(np.asarray([1, 7, 300, 33][:bsz]), np.asarray(lengths))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    qr = jax.random.normal(jax.random.PRNGKey(5), (int(cu[-1]), n, h), dt)
    name = f"ragged kv{lengths} q{tuple(q_lens)} N{n} K{k} H{h} L{page} {dt.__name__}"
    try:
      out = pa.ragged_paged_attention(qr, kp, vp, table, lens, cu)
      ref = pa.ragged_paged_attention_reference(qr, kp, vp, table, lens, cu)
      rows.append({"case": name, **rel_err(out, ref)})
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"case": name, "error": err_text(e)})
  return rows


# ----------------------------------------------------------------------------
def _jax_mha():
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
  return attention.mha


def _jax_mgpu_attention(block_kv: int):
  """JAX's Hopper (Mosaic GPU, warp-specialised) flash attention as a peer:
  what that backend reaches on this card, before we write our own there.
  Imported at call time, so a failure lands in that peer's error column."""
  def run(q, kk, v):
    import warnings  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv,
                                         max_concurrent_steps=2, causal=True)
    return attention_mgpu.attention(q, kk, v, config=config)
  return run


def prefill_case(b, t, n, k, h, opts, configs, peers=True):
  dt = jnp.bfloat16
  flops = 4 * b * n * t * t * h / 2
  row = {"B": b, "T": t, "N": n, "K": k, "H": h, "dtype": "bf16",
         "causal": True, "flops": flops,
         "min_bytes": 2 * (2 * b * t * n * h + 2 * b * t * k * h)}
  ks = jax.random.split(jax.random.PRNGKey(t + n + k), 6)
  sets = [tuple(jax.random.normal(ks[3 * i + j],
                                  (b, t, n if j == 0 else k, h), dt)
                for j in range(3)) for i in range(2)]
  impls = {}
  same_as_ours = []  # backend columns whose config is the one "ours" runs: not timed twice
  if not opts.cpu_smoke:  # both of our backends, whichever the default is
    ours = configs.get("ours") or fa.default_config(
        sets[0][0], packed=False, window=None,
        interpret=fa.resolve_interpret(opts.interpret))
    row["ours_config"] = repr(ours)
    variants = {"ours_triton": fa.FlashConfig.default(h, dt),
                "ours_mgpu": fa.mgpu.MgpuFlashConfig.default(h),
                "ours_mgpu_s3": fa.mgpu.MgpuFlashConfig(64, 128, 3),
                "ours_mgpu_kv64": fa.mgpu.MgpuFlashConfig(64, 64, 3)}
    same_as_ours = [name for name, cfg in variants.items() if cfg == ours]
    configs = {**configs, **{name: cfg for name, cfg in variants.items()
                             if name not in same_as_ours}}
  for name, cfg in configs.items():
    impls[name] = lambda q, kk, v, cfg=cfg: fa.flash_attention(
        q, kk, v, causal=True, config=cfg, interpret=opts.interpret)
  if peers and not opts.cpu_smoke:
    impls["cudnn"] = lambda q, kk, v: jax.nn.dot_product_attention(
        q, kk, v, is_causal=True, implementation="cudnn")
    if b * n * t * t * 4 <= 8 * 2**30:
      impls["xla"] = lambda q, kk, v: jax.nn.dot_product_attention(
          q, kk, v, is_causal=True, implementation="xla")
    def jax_mha(q, kk, v):
      g = n // k
      kk, v = jnp.repeat(kk, g, axis=2), jnp.repeat(v, g, axis=2)
      return _jax_mha()(q, kk, v, None, sm_scale=1 / math.sqrt(h),
                        causal=True)
    impls["jax_pallas_mha"] = jax_mha
    for block_kv in (128, 64):
      impls[f"jax_mgpu_bkv{block_kv}"] = _jax_mgpu_attention(block_kv)
  # JAX's Mosaic GPU kernel takes f16 only (its shared-memory buffers are f16)
  # and applies no softmax scale: it gets f16 copies with q pre-scaled by
  # 1/sqrt(h), made outside the timed region; same flops, same result.
  f16_sets = [((qkv[0] * (1 / math.sqrt(h))).astype(jnp.float16),
               *(x.astype(jnp.float16) for x in qkv[1:])) for qkv in sets]
  # reference output for the error column: cuDNN at big sizes, jnp at small
  q0, k0, v0 = sets[0]
  try:
    if t <= 2048 or opts.cpu_smoke or "cudnn" not in impls:
      ref = fa.flash_attention_reference(q0, k0, v0, causal=True)
      row["ref"] = "jnp f32"
    else:
      ref = impls["cudnn"](q0, k0, v0)
      row["ref"] = "cudnn"
  except Exception as e:  # pylint: disable=broad-except
    ref, row["ref_error"] = None, err_text(e)
  for name, fn in impls.items():
    data = f16_sets if name.startswith("jax_mgpu") else sets
    try:
      if ref is not None:
        row[f"{name}_err"] = rel_err(jax.jit(fn)(*data[0]), ref)
      sec, _ = time_group(fn, data, repeats=opts.repeats,
                          min_time=opts.min_time)
      row[f"{name}_ms"] = sec * 1e3
      row[f"{name}_tflops"] = flops / sec / 1e12
    except Exception as e:  # pylint: disable=broad-except
      row[f"{name}_error"] = err_text(e)
  for name in same_as_ours:
    for suffix in ("err", "ms", "tflops", "error"):
      if f"ours_{suffix}" in row:
        row[f"{name}_{suffix}"] = row[f"ours_{suffix}"]
  return row


# ----------------------------------------------------------------------------
def _jax_paged():
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from jax.experimental.pallas.ops.gpu import paged_attention  # pylint: disable=import-outside-toplevel
  return paged_attention.paged_attention


def decode_case(b, ctx, page, opts, configs, n=32, k=8, h=128, peers=True):
  dt = jnp.bfloat16
  max_pages = ctx // page
  kv_bytes = 2 * b * ctx * k * h * 2
  row = {"B": b, "ctx": ctx, "L": page, "N": n, "K": k, "H": h,
         "dtype": "bf16", "kv_bytes": kv_bytes,
         "flops": 4 * b * n * ctx * h}
  n_sets = int(max(1, min(4, (512 * 2**20) // kv_bytes)))
  row["input_sets"] = n_sets
  rng = np.random.default_rng(b * 7 + ctx)
  num_pages = b * max_pages
  sets = []
  for i in range(n_sets):
    kk = jax.random.split(jax.random.PRNGKey(1000 * i + b + ctx), 3)
    kp = jax.random.normal(kk[0], (k, num_pages, page, h), dt)
    vp = jax.random.normal(kk[1], (k, num_pages, page, h), dt)
    table = jnp.asarray(rng.permutation(num_pages).reshape(b, max_pages),
                        jnp.int32)
    q = jax.random.normal(kk[2], (b, n, h), dt)
    lens = jnp.full((b,), ctx, jnp.int32)
    sets.append((q, kp, vp, table, lens))
  impls = {}
  for name, cfg in configs.items():
    impls[name] = lambda q, kp, vp, t, l, cfg=cfg: pa.paged_attention(
        q, kp, vp, t, l, config=cfg, interpret=opts.interpret)
  # The paging cost of our own kernel: the same call with an identity block
  # table (each sequence's pages adjacent in memory), the true contiguous peer.
  identity = jnp.arange(num_pages, dtype=jnp.int32).reshape(b, max_pages)
  first = next(iter(configs.values()))
  impls["ours_identity"] = lambda q, kp, vp, t, l: pa.paged_attention(
      q, kp, vp, identity, l, config=first, interpret=opts.interpret)
  if peers and not opts.cpu_smoke:
    def jax_paged(q, kp, vp, t, l):
      splits = min(16, max_pages)
      while max_pages % splits:
        splits -= 1
      per = max_pages // splits
      ppcb = min(8, per)
      while per % ppcb:
        ppcb -= 1
      # JAX's kernel applies no logit scale: fold 1/sqrt(H) into q
      q = (q.astype(jnp.float32) / math.sqrt(h)).astype(q.dtype)
      return _jax_paged()(q, kp, vp, t, l, k_splits=splits,
                          pages_per_compute_block=ppcb)
    impls["jax_pallas_paged"] = jax_paged
  q0, kp0, vp0, t0, l0 = sets[0]
  ref = pa.paged_attention_reference(q0, kp0, vp0, t0, l0)
  ref_identity = pa.paged_attention_reference(q0, kp0, vp0, identity, l0)
  for name, fn in impls.items():
    try:
      expected = ref_identity if name == "ours_identity" else ref
      row[f"{name}_err"] = rel_err(jax.jit(fn)(*sets[0]), expected)
      sec, _ = time_group(fn, sets, repeats=opts.repeats,
                          min_time=opts.min_time)
      row[f"{name}_us"] = sec * 1e6
      row[f"{name}_GBps"] = kv_bytes / sec / 1e9
    except Exception as e:  # pylint: disable=broad-except
      row[f"{name}_error"] = err_text(e)
  # contiguous cache [B, S, K, H] through plain XLA (same bytes)
  if not peers:
    return row
  try:
    csets = []
    for q, kp, vp, table, lens in sets:
      kc = pa._gather_contiguous(kp, table)  # pylint: disable=protected-access
      vc = pa._gather_contiguous(vp, table)  # pylint: disable=protected-access
      csets.append((q, kc, vc, lens))
    del sets
    fn = lambda q, kc, vc, l: pa.contiguous_decode_reference(q, kc, vc, l)
    row["contiguous_xla_err"] = rel_err(jax.jit(fn)(*csets[0]), ref)
    sec, _ = time_group(fn, csets, repeats=opts.repeats,
                        min_time=opts.min_time)
    row["contiguous_xla_us"] = sec * 1e6
    row["contiguous_xla_GBps"] = kv_bytes / sec / 1e9
  except Exception as e:  # pylint: disable=broad-except
    row["contiguous_xla_error"] = err_text(e)
  return row


def write_kv_case(tokens, opts, k=8, h=128, page=16, pool_tokens=2**20):
  dt = jnp.bfloat16
  if opts.cpu_smoke:
    pool_tokens = 4096
  num_pages = pool_tokens // page
  kp = jax.random.normal(jax.random.PRNGKey(0), (k, num_pages, page, h), dt)
  vp = jax.random.normal(jax.random.PRNGKey(1), (k, num_pages, page, h), dt)
  kn = jax.random.normal(jax.random.PRNGKey(2), (tokens, k, h), dt)
  vn = jax.random.normal(jax.random.PRNGKey(3), (tokens, k, h), dt)
  slots = jnp.asarray(np.random.default_rng(0).permutation(pool_tokens)
                      [:tokens], jnp.int32)
  moved = 2 * 2 * tokens * k * h * 2  # k and v, read new + write slot
  row = {"T": tokens, "K": k, "H": h, "L": page, "bytes": moved}
  step = jax.jit(pa.write_kv, donate_argnums=(0, 1))
  kp, vp = step(kp, vp, kn, vn, slots)
  jax.block_until_ready(kp)
  times = []
  iters = 50 if not opts.cpu_smoke else 3
  for _ in range(opts.repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      kp, vp = step(kp, vp, kn, vn, slots)
    jax.block_until_ready(kp)
    times.append((time.perf_counter() - t0) / iters)
  sec = statistics.median(times)
  row["us"] = sec * 1e6
  row["GBps"] = moved / sec / 1e9
  got = kp.reshape(k, -1, h)[:, slots].swapaxes(0, 1)
  row["exact"] = bool(jnp.array_equal(got, kn))
  return row


# ----------------------------------------------------------------------------
def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--cpu-smoke", action="store_true")
  ap.add_argument("--skip", default="", help="comma list: correctness,"
                  "tune,prefill,decode,write")
  opts = ap.parse_args()
  opts.interpret = True if opts.cpu_smoke else None
  opts.repeats = 2 if opts.cpu_smoke else 5
  opts.min_time = 0.0 if opts.cpu_smoke else 0.1
  skip = set(filter(None, opts.skip.split(",")))
  dev = jax.devices()[0]
  card = dev.device_kind
  slug = card.lower().replace(" ", "-").replace("/", "-")
  out_path = opts.out or f"bench/results/kernels-{slug}.json"
  res = {"card": card, "platform": dev.platform, "jax": jax.__version__,
         "jaxlib": getattr(jax.lib, "__version__", None) if hasattr(jax, "lib") else None,
         "python": platform.python_version(), "quick": opts.quick,
         "cpu_smoke": opts.cpu_smoke, "num_sms": getattr(dev, "core_count", None),
         "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  t_start = time.time()

  def save():
    res["elapsed_s"] = time.time() - t_start
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1, default=str)

  def log(*a):
    print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)

  res["copy"] = copy_bandwidth(2**31 if not opts.cpu_smoke else 2**22, opts)
  log("copy", res["copy"])
  save()
  if "correctness" not in skip:
    res["correctness"] = gpu_correctness(opts)
    for r in res["correctness"]:
      log("check", r)
    save()

  # --- tile tuning: the best measured tiles become "ours" in the sweeps ---
  flash_cfgs = {"ours": None}
  paged_cfgs = {"ours": None}
  if "tune" not in skip:
    fcands = {
        "q128k128w8s3": fa.FlashConfig(128, 128, 8, 3),
        "q128k64w4s3": fa.FlashConfig(128, 64, 4, 3),
        "q128k64w8s3": fa.FlashConfig(128, 64, 8, 3),
        "q128k128w8s2": fa.FlashConfig(128, 128, 8, 2),
        "q64k64w4s3": fa.FlashConfig(64, 64, 4, 3),
    }
    dcands = {
        "k64w4s3": pa.PagedConfig(block_k=64, num_warps=4, num_stages=3),
        "k128w4s3": pa.PagedConfig(block_k=128, num_warps=4, num_stages=3),
        "k32w4s4": pa.PagedConfig(block_k=32, num_warps=4, num_stages=4),
        "k64w8s3": pa.PagedConfig(block_k=64, num_warps=8, num_stages=3),
        "k128w8s2": pa.PagedConfig(block_k=128, num_warps=8, num_stages=2),
    }
    if opts.cpu_smoke:
      fcands = dict(list(fcands.items())[:2])
      dcands = dict(list(dcands.items())[:2])
      r = prefill_case(1, 128, 4, 2, 64, opts, fcands, peers=False)
    else:
      r = prefill_case(4, 4096, 32, 8, 128, opts, fcands, peers=False)
    res["tune_prefill"] = [r]
    scores = {c: r.get(f"{c}_tflops", 0.0) for c in fcands}
    best = max(scores, key=scores.get)
    flash_cfgs = {"ours": fcands[best]}
    res["flash_config_used"] = {"name": best, **dataclasses.asdict(fcands[best])}
    log("tune prefill", scores, "->", best)
    save()
    res["tune_decode"] = []
    totals = {c: 0.0 for c in dcands}
    shapes = ((32, 4096, 16), (1, 32768, 64)) if not opts.cpu_smoke else (
        (2, 64, 16),)
    for b, ctx, page in shapes:
      if opts.cpu_smoke:
        r = decode_case(b, ctx, page, opts, dcands, n=4, k=2, h=64,
                        peers=False)
      else:
        r = decode_case(b, ctx, page, opts, dcands, peers=False)
      res["tune_decode"].append(r)
      for c in dcands:
        totals[c] += r.get(f"{c}_GBps", 0.0)
      log("tune decode", b, ctx, page,
          {k: round(v) for k, v in r.items() if k.endswith("GBps")})
      save()
    best = max(totals, key=totals.get)
    paged_cfgs = {"ours": dcands[best]}
    res["paged_config_used"] = {"name": best, **dataclasses.asdict(dcands[best])}
    log("tune decode ->", best)
    save()

  if "prefill" not in skip:
    res["prefill"] = []
    ts = [512, 1024, 2048, 4096, 8192, 16384]
    if opts.quick:
      ts = [1024, 4096, 16384]
    heads = [(32, 8), (32, 32)]
    if opts.cpu_smoke:
      ts, heads = [64, 128], [(4, 2)]
    for n, k in heads:
      for t in ts:
        b = max(1, (16384 if not opts.cpu_smoke else 128) // t)
        h = 128 if not opts.cpu_smoke else 64
        r = prefill_case(b, t, n, k, h, opts, flash_cfgs)
        res["prefill"].append(r)
        log("prefill", b, t, n, k,
            {k_: round(v, 1) for k_, v in r.items() if k_.endswith("tflops")},
            {k_: v for k_, v in r.items() if k_.endswith("error")})
        save()

  if "decode" not in skip:
    res["decode"] = []
    batches = [1, 8, 32, 64, 128, 256]
    ctxs = [512, 2048, 8192, 32768]
    pages = [16, 64]
    if opts.quick:
      batches, ctxs = [32, 128, 1], [2048, 8192, 32768]
    if opts.cpu_smoke:
      batches, ctxs, pages = [1, 2], [64], [16]
    for b in batches:
      for ctx in ctxs:
        for page in pages:
          if b * ctx > (2**21 if not opts.quick else 2**20):  # KV > 8/4 GiB
            continue
          if opts.cpu_smoke:
            r = decode_case(b, ctx, page, opts, paged_cfgs, n=4, k=2, h=64)
          else:
            r = decode_case(b, ctx, page, opts, paged_cfgs)
          r["copy_GBps"] = res["copy"]["GBps"]
          res["decode"].append(r)
          log("decode", b, ctx, page,
              {k_: round(v) for k_, v in r.items() if k_.endswith("GBps")},
              {k_: v for k_, v in r.items() if k_.endswith("error")})
          save()

  if "write" not in skip:
    res["write_kv"] = []
    for tokens in ([256, 8192] if not opts.cpu_smoke else [16]):
      try:
        r = write_kv_case(tokens, opts)
      except Exception as e:  # pylint: disable=broad-except
        r = {"T": tokens, "error": err_text(e)}
      res["write_kv"].append(r)
      log("write_kv", r)
      save()

  save()
  print_table(res)
  print("wrote", out_path)


def print_table(res):
  print(f"\ncard {res['card']}  jax {res['jax']}  copy "
        f"{res['copy']['GBps']:.0f} GB/s")
  for r in res.get("correctness", []):
    print(f"  check {r['case'][:70]:70s} "
          + (f"rel {r['rel_err']:.2e} finite {r['finite']}" if "rel_err" in r
             else r.get("error", "")[:80]))
  if res.get("prefill"):
    print(f"\n{'B':>3} {'T':>6} {'N/K':>6} | TFLOP/s: ours  (triton mgpu) cudnn   xla  "
          "jax-mha jax-mgpu | ours/cudnn")
    for r in res["prefill"]:
      g = lambda k: r.get(f"{k}_tflops", float("nan"))
      mgpu = max((v for key, v in r.items()
                  if key.startswith("jax_mgpu") and key.endswith("_tflops")),
                 default=float("nan"))
      print(f"{r['B']:3d} {r['T']:6d} {r['N']:3d}/{r['K']:<2d} | "
            f"{g('ours'):10.1f} ({g('ours_triton'):6.1f} {g('ours_mgpu'):5.1f}) "
            f"{g('cudnn'):6.1f} {g('xla'):5.1f} "
            f"{g('jax_pallas_mha'):7.1f} {mgpu:8.1f} | "
            f"{g('ours') / g('cudnn'):.2f}")
  if res.get("decode"):
    print(f"\n{'B':>4} {'ctx':>6} {'L':>3} | GB/s: ours  identity  "
          "jax-paged  contig-xla | ours/copy ours/identity ours/contig")
    for r in res["decode"]:
      g = lambda k: r.get(f"{k}_GBps", float("nan"))
      print(f"{r['B']:4d} {r['ctx']:6d} {r['L']:3d} | {g('ours'):9.0f} "
            f"{g('ours_identity'):9.0f} {g('jax_pallas_paged'):9.0f} "
            f"{g('contiguous_xla'):10.0f} | {g('ours') / r['copy_GBps']:.2f} "
            f"{g('ours') / g('ours_identity'):.2f} "
            f"{g('ours') / g('contiguous_xla'):.2f}")
  for r in res.get("write_kv", []):
    print(f"write_kv T={r['T']}: {r.get('us', float('nan')):.1f} us "
          f"{r.get('GBps', float('nan')):.0f} GB/s exact={r.get('exact')}")


if __name__ == "__main__":
  try:
    main()
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.exit(1)
