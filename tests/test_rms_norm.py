"""The add + RMSNorm kernel against its jnp reference (interpret mode on the CPU), and the decoder
with the kernel against the decoder without it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import model as model_lib
from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import Decoder
from jaxinfer.sharding import Parallel
from pallas_kernels.common import on_hopper
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference


def _inputs(shape, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = (3 * jax.random.normal(k[0], shape, jnp.float32)).astype(dtype)
    h = jax.random.normal(k[1], shape, jnp.float32).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(k[2], shape[-1:], jnp.float32)).astype(dtype)
    return x, h, scale


# Rows: one a program (< 64) and blocks of rows with a partial last block (70, 200); widths
# that are and are not powers of two (576: SmolLM2).
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 576), (70, 100), (2, 100, 128)])
@pytest.mark.parametrize("add", [True, False])
def test_matches_reference_bf16_exactly(shape, add):
    x, h, scale = _inputs(shape, jnp.bfloat16)
    out, total = rms_norm(x, scale, 1e-5, h if add else None)
    ref_out, ref_total = rms_norm_reference(x, scale, 1e-5, h if add else None)
    assert out.shape == total.shape == shape and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(ref_total, np.float32))
    # The f32 row statistic may differ in its last bit (summation order); in bf16 that flips
    # at most a rare rounding by one bf16 step.
    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32))
    assert (diff > 0).mean() < 0.01
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=8e-3, atol=0
    )
    # Not the identity: the rows really are normalised and scaled.
    row = np.asarray(ref_total, np.float32).reshape(-1, shape[-1])[0]
    want = row / np.sqrt(np.mean(row * row) + 1e-5) * np.asarray(scale, np.float32)
    np.testing.assert_allclose(
        np.asarray(out, np.float32).reshape(-1, shape[-1])[0], want, rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("tiles", [(1, 1), (4, 2), (16, 8)])
def test_any_tiles_give_the_default_tiles_outputs(tiles):
    """Rows a program and warps (`tiles`, swept by scripts/bench_rms_norm.py), with a partial
    last block of rows: the sums of the default tiles bit for bit, the outputs too but for a rare
    last-bit flip (the warps change the float32 statistic's summation order on a GPU)."""
    x, h, scale = _inputs((70, 100), jnp.bfloat16, seed=2)
    f32 = lambda a: np.asarray(a, np.float32)
    want_out, want_total = rms_norm(x, scale, 1e-5, h)
    out, total = rms_norm(x, scale, 1e-5, h, tiles=tiles)
    np.testing.assert_array_equal(f32(total), f32(want_total))
    assert (f32(out) != f32(want_out)).mean() < 0.01
    ref_out = rms_norm_reference(x, scale, 1e-5, h)[0]
    np.testing.assert_allclose(f32(out), f32(ref_out), rtol=8e-3, atol=0)


def test_matches_reference_f32():
    x, h, scale = _inputs((5, 4, 96), jnp.float32, seed=1)
    out, total = rms_norm(x, scale, 1e-6, h)
    ref_out, ref_total = rms_norm_reference(x, scale, 1e-6, h)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(ref_total))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-6, atol=2e-6)


def test_bad_inputs_name_what_is_wrong():
    x, h, scale = _inputs((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="must match x"):
        rms_norm(x, scale, 1e-5, h[:1])
    with pytest.raises(ValueError, match="must match x"):
        rms_norm(x, scale, 1e-5, h.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"scale \(32,\) must be \[64\]"):
        rms_norm(x, scale[:32], 1e-5)
    with pytest.raises(ValueError, match="dtype int32"):
        rms_norm(x.astype(jnp.int32), scale.astype(jnp.int32), 1e-5)
    with pytest.raises(ValueError, match=r"tiles \(3, 4\) must be \(rows, warps\)"):
        rms_norm(x, scale, 1e-5, tiles=(3, 4))


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        max_position_embeddings=64,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    )


def test_decoder_with_the_kernel_matches_without():
    cfg = _tiny_config()
    params = model_lib.init_params(cfg, "float32", seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), tokens.shape)
    logits = {}
    for kernel in (False, True):
        dec = Decoder(cfg, jnp.float32, "xla", norm_kernel=kernel)
        # Full f32 matmuls: on a GPU the default (TF32) rounds the norm's last-bit differences
        # into the third digit.
        with jax.default_matmul_precision("highest"):
            logits[kernel], _ = jax.jit(dec.apply)({"params": params}, tokens, positions)
    assert float(jnp.std(logits[False])) > 0.1
    np.testing.assert_allclose(
        np.asarray(logits[True]), np.asarray(logits[False]), rtol=1e-5, atol=1e-5
    )


def test_the_kernels_are_chosen_for_pallas_on_one_gpu_only(monkeypatch):
    cfg = _tiny_config()
    names = ("NORM_KERNEL", "ROPE_KERNEL", "ROW_GEMV", "ROPE_DECODE", "SWIGLU_KERNEL")
    names += ("ROPE_DECODE_LAST",)
    keys = ("norm_kernel", "rope_kernel", "row_gemv", "rope_decode", "swiglu_kernel")
    no_experts = {"expert_kernel": False}  # a dense model: never, asked or not
    last = lambda on: {"rope_decode_last": on}  # only when asked
    set_all = lambda value: [monkeypatch.setenv(f"JAXINFER_{n}", value) for n in names]
    for name in names:
        monkeypatch.delenv(f"JAXINFER_{name}", raising=False)
    on_gpu = jax.default_backend() == "gpu"
    both = lambda impl: model_lib.fused_kernels(cfg, jnp.bfloat16, impl, Parallel())
    assert both("pallas") == {
        **dict.fromkeys(keys, on_gpu),
        "swiglu_kernel": on_hopper(),
        **no_experts,
        **last(False),
    }
    assert both("xla") == {
        **dict.fromkeys(keys, False),
        "row_gemv": on_gpu,
        **no_experts,
        **last(False),
    }
    set_all("1")
    monkeypatch.setenv("JAXINFER_EXPERT_KERNEL", "1")
    assert both("xla") == {**dict.fromkeys(keys, True), **no_experts, **last(True)}
    f32 = model_lib.fused_kernels(cfg, jnp.float32, "xla", Parallel())
    assert not f32["swiglu_kernel"]  # the kernel takes bf16 only
    odd = dataclasses.replace(cfg, head_dim=24)  # half of it is no power of two
    odd_kernels = model_lib.fused_kernels(odd, jnp.bfloat16, "xla", Parallel())
    assert odd_kernels["rope_kernel"] is odd_kernels["rope_decode"] is False  # it needs the first
    assert odd_kernels["rope_decode_last"] is False
    set_all("0")
    assert both("pallas") == {**dict.fromkeys(keys, False), **no_experts, **last(False)}


def test_qwen3_norms_join_the_rope_kernel_on_request_only(monkeypatch):
    """A q/k-norm model keeps the jnp RoPE path by default even where Pallas runs alone on a GPU
    (the kernels' forms with the norms have not run on one yet) and takes the RoPE + K/V write
    kernel when asked, and with it the fused decode kernel (unless that is turned off)."""
    qwen = dataclasses.replace(_tiny_config(), qk_norm=True)
    for name in ("ROPE_KERNEL", "ROPE_DECODE"):
        monkeypatch.delenv(f"JAXINFER_{name}", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    chosen = lambda cfg: model_lib.fused_kernels(cfg, jnp.bfloat16, "pallas", Parallel())
    assert chosen(_tiny_config())["rope_kernel"] and chosen(_tiny_config())["rope_decode"]
    assert not chosen(qwen)["rope_kernel"] and not chosen(qwen)["rope_decode"]
    monkeypatch.setenv("JAXINFER_ROPE_KERNEL", "1")
    assert chosen(qwen)["rope_kernel"] and chosen(qwen)["rope_decode"]
    monkeypatch.setenv("JAXINFER_ROPE_DECODE", "0")
    assert chosen(qwen)["rope_kernel"] and not chosen(qwen)["rope_decode"]
