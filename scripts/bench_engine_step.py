"""Where one engine decode step's time goes on a GPU: KV write (float vs bit scatter), ragged
paged attention, and the whole jitted step at two pool sizes.

    python scripts/bench_engine_step.py --model llama3-8b --batch 256 --context 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import SHAPES  # noqa: E402


def timed(fn, *args, n=20) -> float:
    """Median ms of fn(*args) (fn must return its donated inputs back as outputs)."""
    import jax

    args = fn(*args)
    jax.block_until_ready(args)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        args = fn(*args)
        jax.block_until_ready(args)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--pages", default="4096,52000")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import ragged_paged_attention, write_kv

    s = SHAPES[args.model]
    k, h, n, b, L = s["num_kv_heads"], s["head_dim"], s["num_heads"], args.batch, 16
    res = {"device": jax.devices()[0].device_kind, "batch": b, "context": args.context}
    for num_pages in [int(x) for x in args.pages.split(",")]:
        key = jax.random.key(0)
        kp = jax.random.normal(key, (k, num_pages, L, h), jnp.bfloat16)
        vp = jax.random.normal(key, (k, num_pages, L, h), jnp.bfloat16)
        new = jax.random.normal(key, (b, k, h), jnp.bfloat16)
        slots = (jnp.arange(b) * 97 % (num_pages * L)).astype(jnp.int32)

        def bits_write(kp, vp):
            return write_kv(kp, vp, new, new, slots)

        def float_write(kp, vp):
            rows = lambda x: x.reshape(k, num_pages * L, h)  # noqa: E731
            kp = rows(kp).at[:, slots].set(new.swapaxes(0, 1)).reshape(kp.shape)
            vp = rows(vp).at[:, slots].set(new.swapaxes(0, 1)).reshape(vp.shape)
            return kp, vp
        res[f"write_bits_ms_P{num_pages}"] = timed(jax.jit(bits_write, donate_argnums=(0, 1)), kp, vp)
        kp, vp = (jax.random.normal(key, (k, num_pages, L, h), jnp.bfloat16) for _ in range(2))
        res[f"write_float_ms_P{num_pages}"] = timed(jax.jit(float_write, donate_argnums=(0, 1)), kp, vp)
        kp, vp = (jax.random.normal(key, (k, num_pages, L, h), jnp.bfloat16) for _ in range(2))
        per_seq = -(-args.context // L)
        tables = (jnp.arange(b * per_seq) % num_pages).reshape(b, per_seq).astype(jnp.int32)
        lens = jnp.full((b,), args.context, jnp.int32)
        cu = jnp.arange(b + 1, dtype=jnp.int32)
        q = jax.random.normal(key, (b, n, h), jnp.bfloat16)

        def attend(q, kp, vp):
            return ragged_paged_attention(q, kp, vp, tables, lens, cu), kp, vp
        res[f"ragged_attn_ms_P{num_pages}"] = timed(jax.jit(attend, donate_argnums=(1, 2)), q, kp, vp)
        del kp, vp
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__" and not os.environ.get("ENGINE_BREAKDOWN"):
    sys.exit(main())


def engine_breakdown(model_name: str, num_pages: int | None, seqs: int, prompt: int) -> dict:
    """Decode steps of the real engine: wall per step, runner share, the jitted step alone, and
    whether the compiled step copies or converts any whole page pool."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxinfer
    from jaxinfer.config import ModelConfig
    from jaxinfer.engine import Engine
    from jaxinfer.sampling import SamplingParams, sample_mode

    cfg = ModelConfig(**SHAPES[model_name])
    model = jaxinfer.Model(cfg, jaxinfer.init_params(cfg, "bfloat16"), None, jnp.bfloat16)
    eng = Engine(model, max_num_seqs=seqs, max_num_batched_tokens=2048, num_pages=num_pages,
                 warmup=False)
    rng = np.random.default_rng(0)
    for i in range(seqs):
        eng.add_request(str(i), rng.integers(0, cfg.vocab_size, prompt).tolist(),
                        SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    while eng.stats["decode_steps"] < 3:
        eng.step()
    res = {"num_pages": eng.num_pages, "seqs": seqs}
    for overlap in (True, False):  # engine wall per step, asynchronous scheduling on and off
        eng.config = dataclasses.replace(eng.config, async_scheduling=overlap)
        r0, t0 = eng.stats["runner_s"], time.perf_counter()
        for _ in range(20):
            eng.step()
        key = "" if overlap else "_sync"
        res[f"step_ms{key}"] = (time.perf_counter() - t0) / 20 * 1e3
        res[f"wait_for_device_ms{key}"] = (eng.stats["runner_s"] - r0) / 20 * 1e3
    eng._resolve()  # nothing in flight: the plan below holds real tokens only
    plan = eng.scheduler.schedule()  # one more decode plan, run by hand below
    rows = [eng.requests[s.request_id].row() for s in plan.seqs]
    runner = eng.runner
    t0 = time.perf_counter()
    batch = runner.build(plan, rows)
    res["build_ms"] = (time.perf_counter() - t0) * 1e3

    mode = sample_mode([r.params for r in rows])

    def step(pages):
        runner.pages = pages
        runner.step(batch, mode)
        return (runner.pages,)
    (pages,) = step(runner.pages)
    res["jitted_step_ms"] = timed(step, pages)
    txt = jax.jit(runner._forward_fn, donate_argnums=(1,)).lower(
        runner.params, runner.pages, runner.prev_tokens,
        batch._replace(sampling=None, history=None, history_is_output=None)).compile().as_text()
    pool = ",".join(str(d) for d in runner.pages[0][0].shape)
    res["pool_copies"] = sum(1 for l in txt.splitlines() if f"[{pool}]" in l and
                             (" copy(" in l or " convert(" in l or "copy-start" in l))
    return res


if __name__ == "__main__" and os.environ.get("ENGINE_BREAKDOWN"):
    for pages in [int(p) if p != "auto" else None for p in os.environ.get("POOLS", "4096,auto").split(",")]:
        print(json.dumps(engine_breakdown(os.environ.get("MODEL", "llama3-8b"), pages, int(os.environ.get("SEQS", 128)), int(os.environ.get("PROMPT", 900)))), flush=True)
