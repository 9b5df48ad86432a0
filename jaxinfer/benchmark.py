"""The measuring kit behind `scripts/bench_*.py` and `scripts/profile_step.py`.

One of each: the model shapes measured (`SHAPES`, random weights: speed does not depend on
their values), the random-weights builders (`random_model`, and `hf_random_model` for the HF
transformers peer), the timer (`pipelined_time`), the card's two ceilings measured in the same
run (`card_limits`), the error metric (`max_rel_err`, `errors`), the byte and flop floors
(`decode_bytes`, `prefill_flops`), and the process isolation that keeps a native crash from
taking a sweep down (`run_isolated` for a peer in its own process, `Journal` +
`run_resumable` for a sweep that records the case that crashed and restarts past it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pallas_kernels.common import default_device

__all__ = [
    "SHAPES",
    "Journal",
    "card_limits",
    "check_impls",
    "decode_bytes",
    "default_device",
    "errors",
    "hf_random_model",
    "int_list",
    "max_rel_err",
    "pipelined_time",
    "prefill_flops",
    "random_model",
    "routed_experts",
    "run_isolated",
    "run_resumable",
    "shape",
]

SHAPES = {
    "llama2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "qwen3-8b": dict(  # Qwen/Qwen3-8B: q/k norms, untied 151,936-token head
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        qk_norm=True,
    ),
    "llama2-70b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama3-70b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
    ),
    "tiny-moe": dict(
        model_type="mixtral",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
    ),
    "tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    ),
}


def shape(name: str, layers: int = 0) -> dict:
    """SHAPES[name], with `layers` layers when > 0; a clear error for an unknown name."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r} (known: {', '.join(SHAPES)})")
    return dict(SHAPES[name], **({"num_layers": layers} if layers else {}))


def random_model(
    name: str, dtype: str = "bfloat16", layers: int = 0, mesh=None, moe: str = "expert"
):
    """A jaxinfer.Model of shape `name` with random weights in `dtype`, on the default device, or
    made straight into its shards over `mesh` (a 70B model fits no one device)."""
    import jax.numpy as jnp

    import jaxinfer

    cfg = jaxinfer.ModelConfig(**shape(name, layers))
    if mesh is None:
        return jaxinfer.Model(cfg, jaxinfer.init_params(cfg, dtype), None, jnp.dtype(dtype))
    from jaxinfer.sharding import resolve_parallel

    parallel = resolve_parallel(cfg, mesh=mesh, moe=moe)
    params = _random_sharded_params(cfg, dtype, parallel)
    return jaxinfer.Model(cfg, params, None, jnp.dtype(dtype), parallel=parallel)


def _random_sharded_params(cfg, dtype, parallel):
    """Normal(0, 0.02) weights and unit norms, each made on its devices by a small program (one
    per distinct shape and sharding), never whole on one device."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.model import abstract_params
    from jaxinfer.sharding import param_shardings

    shapes, _ = abstract_params(cfg, dtype)
    shardings = param_shardings(cfg, dtype, parallel)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = []
    for i, ((path, s), sharding) in enumerate(zip(paths, jax.tree.leaves(shardings))):
        norm = "norm" in jax.tree_util.keystr(path)
        make = _ones if norm else _normal
        leaves.append(make(s.shape, jnp.dtype(s.dtype), sharding, jax.random.key(i)))
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


@functools.cache
def _program(kind: str, shape, dtype, sharding):
    import jax
    import jax.numpy as jnp

    if kind == "ones":
        return jax.jit(lambda key: jnp.ones(shape, dtype), out_shardings=sharding)
    return jax.jit(
        lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
        out_shardings=sharding,
    )


def _ones(shape, dtype, sharding, key):
    return _program("ones", shape, dtype, sharding)(key)


def _normal(shape, dtype, sharding, key):
    return _program("normal", shape, dtype, sharding)(key)


def hf_random_model(spec: dict):
    """HF transformers' Llama / Mixtral / Qwen3 of a SHAPES entry with random bf16 weights, on the
    GPU if there is one: (model, "cuda" | "cpu")."""
    import torch
    import transformers

    common = dict(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rope_theta=spec.get("rope_theta", 10000.0),
        eos_token_id=None,
        pad_token_id=0,
    )
    if spec["model_type"] == "mixtral":
        config = transformers.MixtralConfig(
            **dict(
                common,
                intermediate_size=spec["moe_intermediate_size"],
                num_local_experts=spec["num_experts"],
                num_experts_per_tok=spec["num_experts_per_tok"],
            )
        )
        cls = transformers.MixtralForCausalLM
    elif spec["model_type"] == "qwen3":
        config = transformers.Qwen3Config(
            **dict(common, head_dim=spec["head_dim"], rms_norm_eps=spec["rms_norm_eps"])
        )
        cls = transformers.Qwen3ForCausalLM
    elif spec["model_type"] != "llama":
        raise ValueError(f"no HF peer for model_type {spec['model_type']!r}")
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


# ---------------------------------------------------------------------------------------------
# Timing and the card's ceilings


def _block(x):
    if x is not None:  # a torch peer syncs inside its own call
        import jax

        jax.block_until_ready(x)
    return x


def pipelined_time(
    fn: Callable[[Any], Any],
    *,
    repeats: int,
    calls: int = 1,
    setup: Callable[[], Any] | None = None,
    min_time: float | None = None,
) -> float:
    """Median seconds per call of `fn`.

    Each of `repeats` timed runs queues `calls` calls back to back and syncs once (dispatch
    overlaps the device's work; a call that must block, like a torch peer, blocks inside fn).
    The state each call gets is the one the call before returned (donated buffers stay valid),
    starting from `setup()` (untimed; None without setup). One untimed call warms up (compiles)
    first; with `min_time`, a second one sets `calls` so that a run lasts about min_time
    (2 to 200 calls).
    """

    def run(n: int) -> float:
        state = _block(setup() if setup else None)
        t0 = time.perf_counter()
        for _ in range(n):
            state = fn(state)
        _block(state)
        return (time.perf_counter() - t0) / n

    run(1)
    if min_time is not None:
        calls = int(min(max(min_time / max(run(1), 1e-6), 2), 200))
    return statistics.median(run(calls) for _ in range(repeats))


def time_over_sets(
    fn: Callable,
    sets: list,
    *,
    repeats: int,
    min_time: float | None,
    compiler_options: dict | None = None,
    compiled_text: list[str] | None = None,
) -> float:
    """Median seconds per call of fn over rotating argument sets: one jit (built with
    `compiler_options`) runs fn once per set (the sets differ, so nothing is CSE'd), timed by
    `pipelined_time`. The optimized program's text is appended to `compiled_text` when given:
    XLA may still join the calls (its dot merger fuses dots that share an operand), which
    `gemm_calls` on that text shows."""
    import jax

    group = jax.jit(lambda ss: [fn(*s) for s in ss], compiler_options=compiler_options)
    compiled = group.lower(sets).compile()
    if compiled_text is not None:
        compiled_text.append(compiled.as_text())
    return pipelined_time(lambda _: compiled(sets), repeats=repeats, min_time=min_time) / len(sets)


def gemm_calls(hlo_text: str) -> int:
    """GEMM kernels in an optimized GPU program's text: cuBLAS(Lt) custom calls and XLA's
    Triton GEMM fusions (0 on the CPU, whose dots have other names)."""
    cublas = re.findall(r'custom_call_target="__cublas', hlo_text)
    triton = re.findall(r"= \S+ fusion\([^)]*\), kind=kCustom, calls=%gemm_fusion", hlo_text)
    return len(cublas) + len(triton)


def card_limits(repeats: int) -> dict:
    """The card's ceilings, measured: HBM copy bandwidth (x + 1 over 2 GiB of f32: bytes read +
    written), read bandwidth (a sum over the same bytes) and the bf16 matmul peak (8192^3)."""
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() == "gpu"
    n = (1 << 29) if gpu else (1 << 22)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    m = 8192 if gpu else 256
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    copy, read, matmul = jax.jit(lambda v: v + 1), jax.jit(jnp.sum), jax.jit(lambda p, q: p @ q)
    t_copy = pipelined_time(lambda _: copy(x), repeats=repeats, calls=20)
    t_read = pipelined_time(lambda _: read(x), repeats=repeats, calls=20)
    t_mm = pipelined_time(lambda _: matmul(a, a), repeats=repeats, calls=10)
    return {
        "copy_read_plus_write_GBps": 2 * 4 * n / t_copy / 1e9,
        "read_GBps": 4 * n / t_read / 1e9,
        "bf16_matmul_TFLOPs": 2 * m**3 / t_mm / 1e12,
        "copy_bytes": 2 * 4 * n,
    }


NO_LIMITS = {"bf16_matmul_TFLOPs": float("nan"), "copy_read_plus_write_GBps": float("nan")}


def int_list(text: str) -> list[int]:
    """A command line's comma list of ints ("1,8,64"; "" is no items)."""
    return [int(x) for x in text.split(",") if x]


def max_rel_err(out, ref, axis=None):
    """max |out - ref| / max |ref| (over `axis`, all by default), in float64."""
    out, ref = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (out, ref))
    return np.abs(out - ref).max(axis) / np.abs(ref).max(axis)


def errors(out, ref) -> dict:
    """The error columns of a kernel check: relative Frobenius error, max relative error, max
    absolute error, and whether every output is finite."""
    out64, ref64 = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (out, ref))
    return {
        "rel_err": float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-30)),
        "max_rel_err": float(max_rel_err(out64, ref64)),
        "max_abs_err": float(np.abs(out64 - ref64).max()),
        "finite": bool(np.isfinite(out64).all()),
    }


def report_header() -> dict:
    """What every report starts with: the card and the jax version that measured it."""
    import jax

    return {"device": default_device().device_kind, "jax": jax.__version__}


def write_json(path: str, report: dict) -> None:
    """Writes a report (folders made as needed); called as a sweep goes, so that a run cut short
    keeps what it measured."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)


def error_text(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {e}"[:limit]


# ---------------------------------------------------------------------------------------------
# Floors


def decode_bytes(cfg, batch: int, context: float, distinct: float | None = None) -> dict:
    """Bytes one decode step must read: every weight but the embedding table, and the live KV.

    With experts, only the distinct experts the step's tokens pick are needed: `distinct` per
    layer when measured (`routed_experts`), else the count for k of E picked uniformly,
    E * (1 - (1 - k/E)^B) (exact at batch 1; random routers are far from uniform at batch > 1).
    """
    weights = 2 * (
        cfg.num_params - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings)
    )
    if cfg.num_experts:
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        if distinct is None:
            k, e = cfg.num_experts_per_tok, cfg.num_experts
            distinct = e * (1 - (1 - k / e) ** batch)
        weights -= 2 * cfg.num_layers * expert * (cfg.num_experts - distinct)
    kv = 2 * batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context
    return {"weight_bytes": weights, "kv_bytes": kv}


def prefill_flops(cfg, t: int) -> float:
    """Matmul flops of one causal prefill of t tokens (weights, causal attention, last-token
    head); each token runs k of the E experts: active, not total, parameters."""
    body = cfg.active_params - cfg.vocab_size * cfg.hidden_size * (2 - cfg.tie_word_embeddings)
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t / 2
    return 2 * body * t + attn + 2 * cfg.hidden_size * cfg.vocab_size


# ---------------------------------------------------------------------------------------------
# The whole-model check and the routing count (bench_generate)


def forward_with_routing(decoder, params, tokens):
    """A cacheless forward of tokens [B, T] (traced): logits [B, T, V] and the routing the MoE
    blocks sowed (`intermediates/experts`), one [B, T, k] per layer ([] for a dense model)."""
    import jax
    import jax.numpy as jnp

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    (logits, _), state = decoder.apply(
        {"params": params}, tokens, positions, mutable=["intermediates"]
    )
    picks = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if "experts" in jax.tree_util.keystr(path)
    ]
    return logits, picks


def _logits_and_routing(model, impl, ids):
    """f32 logits [B, T, V] and the experts each layer picked [layers, B, T, k] (None for a
    dense model), as numpy."""
    import jax
    import jax.numpy as jnp

    decoder = model.decoder(impl)

    @jax.jit
    def run(params, tokens):
        logits, picks = forward_with_routing(decoder, params, tokens)
        return logits.astype(jnp.float32), picks

    logits, picks = run(model.params, jnp.asarray(ids, jnp.int32))
    return np.asarray(logits), (np.stack([np.asarray(p) for p in picks]) if picks else None)


def check_impls(model, impls, rng, f32: bool = False) -> dict:
    """A forward per impl against impl="reference" on this card, per position p:
    err[p] = max |logits - reference| / max |reference|. Reports the max and median of err, how
    often the greedy token agrees, and with experts how often the routing agrees: one bf16
    rounding that flips a near-tied top-k choice changes that position's later layers, so the max
    alone says little about a MoE model (the kernels' own tests bound their error).

    `f32`: also each impl and the reference in the model's dtype against the reference forward of
    the same weights in float32 at the highest matmul precision (`vs_f32`). The reference's own
    figure there is the model's rounding floor in that dtype: which random weights were drawn
    moves it, so an impl is judged against it, not against another model's figures."""
    ids = rng.randint(0, model.config.vocab_size, (2, 200))
    ref, ref_picks = _logits_and_routing(model, "reference", ids)
    report = {"rel_error_vs_reference": {}, "median_rel_error": {}, "argmax_agreement": {}}
    outs = {"reference": ref}
    if ref_picks is not None:
        report.update(
            routing_agreement={},
            routing_agreement_by_layer={},
            max_rel_error_where_routing_agrees={},
        )
    for impl in impls:
        try:
            out, picks = _logits_and_routing(model, impl, ids)
        except Exception as e:  # reported, not fatal
            report["rel_error_vs_reference"][impl] = error_text(e)
            continue
        outs[impl] = out
        stats, err = _compare_logits(out, ref)
        report["rel_error_vs_reference"][impl] = stats["max_rel_error"]
        report["median_rel_error"][impl] = stats["median_rel_error"]
        report["argmax_agreement"][impl] = stats["argmax_agreement"]
        if picks is not None:
            same = (np.sort(picks, -1) == np.sort(ref_picks, -1)).all(-1)  # [layers, B, T]
            report["routing_agreement"][impl] = float(same.mean())
            # a flip's effect grows layer by layer: agreement falls with depth if that is all
            report["routing_agreement_by_layer"][impl] = [
                round(float(a), 4) for a in same.mean((1, 2))
            ]
            agree = same.all(0)  # positions routed alike in every layer
            report["max_rel_error_where_routing_agrees"][impl] = (
                float(err[agree].max()) if agree.any() else None
            )
    if f32:
        report["vs_f32"] = _against_f32(model, ids, outs)
    return report


def _against_f32(model, ids, outs: dict) -> dict:
    """{name: max and median rel error, greedy agreement} of each of `outs` (logits [B, T, V])
    against the reference forward in float32 (HIGHEST precision) of the model's weights."""
    import jax
    import jax.numpy as jnp

    import jaxinfer

    params = jax.tree.map(lambda x: x.astype(jnp.float32), model.params)
    exact = jaxinfer.Model(model.config, params, None, jnp.float32, parallel=model.parallel)
    with jax.default_matmul_precision("highest"):
        ref, _ = _logits_and_routing(exact, "reference", ids)
    del params, exact
    return {name: _compare_logits(out, ref)[0] for name, out in outs.items()}


def _compare_logits(out, ref) -> tuple[dict, np.ndarray]:
    """Logits [B, T, V] against ref: ({max_rel_error, median_rel_error, argmax_agreement}, the
    per-position error err [B, T] = max |out - ref| / max |ref| over V)."""
    err = max_rel_err(out, ref, axis=-1)
    stats = {
        "max_rel_error": float(err.max()),
        "median_rel_error": float(np.median(err)),
        "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
    }
    return stats, err


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
        _, picks = forward_with_routing(decoder, params, toks)  # each [B, T, k]
        per_layer = [
            jnp.any(jax.nn.one_hot(e[:, -last:], cfg.num_experts, dtype=bool), axis=(0, 2))
            .sum(-1)
            .mean()
            for e in picks
        ]
        return jnp.stack(per_layer).mean()

    return float(count(model.params, tokens))


# ---------------------------------------------------------------------------------------------
# Process isolation: a native crash (XLA's compiler, a CUDA fault) ends the process, not only
# the Python call, so a peer that might crash runs in a process of its own.

RESULT_TAG = "BENCH_RESULT "


def emit_result(result) -> None:
    """The child's answer to `run_isolated`: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_isolated(argv: list[str], timeout: float | None = None) -> dict:
    """Runs `python argv...` in its own process and returns what it passed to `emit_result`, or
    {"error": ...} naming the exit status and the end of its stderr."""
    try:
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {e.timeout} s"}
    sys.stderr.write(proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(lines[-1][len(RESULT_TAG) :])


class Journal:
    """The record of a sweep's units of work, one JSON line each, that survives a crash: a unit
    already recorded is not run again, and the unit that was running when the process died is
    found (`crashed`) and recorded as an error by the parent (`run_resumable`). With path None
    it keeps nothing (a run without crash isolation)."""

    def __init__(self, path: str | None):
        self.path, self.done, self.started = path, {}, None
        if path and os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    entry = json.loads(line)
                    if "result" in entry:
                        self.done[entry["key"]] = entry["result"]
                        self.started = None
                    else:
                        self.started = entry

    def _append(self, entry: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")

    def run(
        self,
        key: str,
        fn: Callable[..., Any],
        *args,
        error_row: dict | None = None,
        error_key: str = "error",
    ) -> Any:
        """fn(*args)'s result (JSON-able) for `key`, recorded. An exception, or a native crash
        while fn runs, makes the result {**error_row, error_key: what happened}."""
        if key in self.done:
            return self.done[key]
        self._append({"key": key, "error_row": error_row or {}, "error_key": error_key})
        try:
            result = fn(*args)
        except Exception as e:  # a unit that fails is reported, not fatal
            result = {**(error_row or {}), error_key: error_text(e, 600)}
        self.record(key, result)
        return result

    def record(self, key: str, result) -> None:
        self.done[key] = result
        self._append({"key": key, "result": result})

    def crashed(self, why: str) -> str | None:
        """Records `why` as the result of the unit a crash interrupted; returns its key (None when
        no unit was running)."""
        entry = self.started
        if entry is None:
            return None
        self.record(entry["key"], {**entry["error_row"], entry["error_key"]: why})
        return entry["key"]


def run_resumable(argv: list[str], journal_path: str, max_crashes: int = 20) -> int:
    """Runs `python argv... --journal journal_path` until it exits normally: after each native
    crash the unit in flight is recorded as an error and the sweep restarts, replaying every
    recorded unit (a fresh journal each call; removed after success). Returns the last exit
    status."""
    journal_path = os.path.abspath(journal_path)
    if os.path.exists(journal_path):
        os.remove(journal_path)  # a journal of an earlier run would replay its figures
    for _ in range(max_crashes + 1):
        proc = subprocess.run([sys.executable, *argv, "--journal", journal_path])
        if proc.returncode == 0:
            if os.path.exists(journal_path):
                os.remove(journal_path)
            return 0
        why = f"native crash (exit {proc.returncode}); the sweep restarted past it"
        key = Journal(journal_path).crashed(why)
        if key is None:  # died outside any unit: nothing to skip
            return proc.returncode
        print(f"[{key}] {why}", file=sys.stderr, flush=True)
    return proc.returncode


def add_sweep_args(parser) -> None:
    """The options of a crash-resumable sweep script (see `sweep_journal`)."""
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the sweep in this process (a native crash then ends it)",
    )
    parser.add_argument("--journal", default=None, help=argparse.SUPPRESS)


def sweep_journal(args, journal_path: str | None = None):
    """(exit status, None) in the parent: the script ran again as a crash-resumable child
    (`run_resumable`, journal at `journal_path`, default a temp file); (None, Journal) in that
    child, or in-process with --in-process."""
    if args.in_process:
        return None, Journal(None)
    if args.journal is None:
        if journal_path is None:
            fd, journal_path = tempfile.mkstemp(suffix=".journal")
            os.close(fd)
        return run_resumable(sys.argv, journal_path), None
    return None, Journal(args.journal)
