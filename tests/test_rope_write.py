"""RoPE + K/V write kernel against its jnp reference (interpret mode on the CPU), and an engine
with the fused kernels (this one and the add + RMSNorm) against one without them."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model
from test_decode_steps import ModTokenizer, staggered

import jaxinfer
from jaxinfer import attention
from jaxinfer.models import llama
from jaxinfer.models.layers import rope_inv_freq
from pallas_kernels.rms_norm import rms_norm_reference
from pallas_kernels.rope_write import rope_write, rope_write_reference

# the module (the package exports its function of the same name)
paged_attention = importlib.import_module("pallas_kernels.paged_attention")


def _inputs(tokens, kv_heads, group, head_dim, pages, page_size, dtype, seed=0):
    """qkv [T, K, G + 2, H] and two pools [K, P, L, H] of normal values."""
    ks = jax.random.split(jax.random.key(seed), 3)
    f = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
    pool = (kv_heads, pages, page_size, head_dim)
    return f(ks[0], (tokens, kv_heads, group + 2, head_dim)), f(ks[1], pool), f(ks[2], pool)


# Llama-3's GQA 32/8 at H 128 in a few tokens; SmolLM2's 9/3 (a group of 3 padded to 4) at H 64.
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, dtype",
    [(32, 8, 128, jnp.bfloat16), (9, 3, 64, jnp.bfloat16), (4, 2, 32, jnp.float32)],
)
def test_matches_reference(heads, kv_heads, head_dim, dtype):
    qkv, k_pages, v_pages = _inputs(5, kv_heads, heads // kv_heads, head_dim, 6, 4, dtype)
    positions = jnp.array([0, 3, 17, 1000, 8191], jnp.int32)
    slots = jnp.array([5, -1, 0, 23, 6], jnp.int32)  # -1: written nowhere; 5 and 6 share a page
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, 500000.0, None))
    want = rope_write_reference(qkv, k_pages, v_pages, positions, slots, inv_freq)
    got = rope_write(qkv, k_pages.copy(), v_pages.copy(), positions, slots, inv_freq)  # donated
    q, v = qkv[:, :, :-2].reshape(5, heads, head_dim), qkv[:, :, -1]
    f32 = lambda x: np.asarray(x, np.float32)
    tol = 0 if dtype == jnp.bfloat16 else 1e-6
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(f32(g), f32(w), rtol=tol, atol=tol)
    # The pools changed at the 4 written slots only, and q really was rotated.
    rows = lambda p: f32(p).reshape(kv_heads, -1, head_dim)
    changed = np.nonzero(np.any(rows(got[1]) != rows(k_pages), axis=(0, 2)))[0]
    assert changed.tolist() == [0, 5, 6, 23]
    np.testing.assert_array_equal(rows(got[2])[:, 23], f32(v)[3])
    assert np.abs(f32(got[0])[3] - f32(q)[3]).max() > 0.1
    np.testing.assert_allclose(f32(got[0])[0], f32(q)[0])  # position 0: no rotation


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, dtype", [(32, 8, 128, jnp.bfloat16), (4, 2, 32, jnp.float32)]
)
def test_qk_norm_matches_reference(heads, kv_heads, head_dim, dtype):
    """Qwen3's per-head q and k RMS norms in the kernel, before RoPE, against the jnp forms: the
    same values to one rounding of the dtype (the float32 sum of squares may add in another
    order), and the norm really applied (q's rows come out at the scale's RMS, not the input's)."""
    qkv, k_pages, v_pages = _inputs(5, kv_heads, heads // kv_heads, head_dim, 6, 4, dtype)
    qkv = qkv * 3.0  # rows of RMS ~3: the norm changes them
    positions = jnp.array([0, 3, 17, 1000, 8191], jnp.int32)
    slots = jnp.array([5, -1, 0, 23, 6], jnp.int32)
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, 1e6, None))
    ks = jax.random.split(jax.random.key(7), 2)
    scale = lambda k: (1 + 0.2 * jax.random.normal(k, (head_dim,))).astype(dtype)
    qk_norm = (scale(ks[0]), scale(ks[1]), 1e-6)
    want = rope_write_reference(qkv, k_pages, v_pages, positions, slots, inv_freq, qk_norm)
    got = rope_write(qkv, k_pages.copy(), v_pages.copy(), positions, slots, inv_freq, qk_norm)
    f32 = lambda x: np.asarray(x, np.float32)
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 1e-6
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(f32(g), f32(w), rtol=ulp, atol=ulp)
    # at position 0 RoPE is the identity: q is its norm alone, of RMS ~1 x the scale
    q0 = f32(got[0])[0]
    want_q0 = rms_norm_reference(qkv[0, :, :-2].reshape(heads, head_dim), qk_norm[0], 1e-6)[0]
    np.testing.assert_allclose(q0, f32(want_q0), rtol=ulp, atol=ulp)
    assert abs(np.sqrt(np.mean((q0 / f32(qk_norm[0])) ** 2)) - 1) < 0.02
    with pytest.raises(ValueError, match=rf"qk_norm's k_scale must be \[{head_dim}\]"):
        rope_write(
            qkv, k_pages, v_pages, positions, slots, inv_freq, (*qk_norm[:1], qk_norm[0][:8], 1e-6)
        )


def test_bad_inputs_name_what_is_wrong():
    qkv, k_pages, v_pages = _inputs(2, 2, 2, 32, 3, 4, jnp.float32)
    pos = slots = jnp.zeros(2, jnp.int32)
    inv = jnp.ones(16, jnp.float32)
    with pytest.raises(ValueError, match=r"qkv must be \[T, K, G \+ 2, H\]"):
        rope_write(qkv[:, :, :2], k_pages, v_pages, pos, slots, inv)
    with pytest.raises(ValueError, match=r"pools must both be \[2, 3, 4, 32\]"):
        rope_write(qkv, k_pages[:1], v_pages, pos, slots, inv)
    with pytest.raises(ValueError, match="slots must be int32"):
        rope_write(qkv, k_pages, v_pages, pos, slots.astype(jnp.float32), inv)
    with pytest.raises(ValueError, match="inv_freq must be"):
        rope_write(qkv, k_pages, v_pages, pos, slots, inv[:8])
    qkv24, kp24, vp24 = _inputs(2, 2, 2, 24, 3, 4, jnp.float32)
    with pytest.raises(ValueError, match="head dim 24"):
        rope_write(qkv24, kp24, vp24, pos, slots, jnp.ones(12))


@pytest.fixture(scope="module")
def model_h32(tmp_path_factory):
    path = tmp_path_factory.mktemp("rope-write-llama3")
    build_hf_model("llama3", path, head_dim=32)  # half of it a power of two: the kernel's shapes
    model = jaxinfer.load_model(path, dtype="float32")
    return dataclasses.replace(model, tokenizer=ModTokenizer())


def staggered_with_kernels(
    model,
    decode_steps: int,
    on: str,
    fused: str = "0",
    impl: str = "xla",
    last: str = "0",
    clear: bool = True,
):
    traced = []  # decode programs built on the fused kernel
    fused_kernel = paged_attention.rope_paged_decode
    if clear:  # layers traced by the other cases are not retraced
        llama._apply_block_jit.clear_cache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            paged_attention,
            "rope_paged_decode",
            lambda *args, **kw: traced.append(kw.get("config")) or fused_kernel(*args, **kw),
        )
        mp.setenv("JAXINFER_NORM_KERNEL", on)
        mp.setenv("JAXINFER_ROPE_KERNEL", on)
        mp.setenv("JAXINFER_ROPE_DECODE", fused)
        mp.setenv("JAXINFER_ROPE_DECODE_LAST", last)
        # every decode program, not only those of one row
        mp.setattr(attention, "FUSED_DECODE_MAX_ROWS", 1 << 30)
        outs, engine = staggered(model, decode_steps, attention_impl=impl)
    assert engine.runner.decoder.rope_kernel is (on == "1")
    assert engine.runner.decoder.rope_decode is (on == fused == "1")
    assert engine.runner.decoder.rope_decode_last is (on == fused == last == "1")
    assert bool(traced) is (on == fused == "1" and impl == "pallas")  # it replaces Pallas's
    assert all(bool(c and c.new_token_last) is (last == "1") for c in traced)
    return outs


@pytest.fixture(scope="module")
def jnp_outputs(model_h32):
    """The reference: the jnp forms, one step a program (test_decode_steps checks that decode
    steps give what single steps give)."""
    return staggered_with_kernels(model_h32, 1, "0")


def assert_same_outputs(want: dict, got: dict, tol: float | None):
    """The same 7 requests, tokens, texts and finish reasons; logprobs equal (tol None) or within
    tol, and some were compared."""
    assert sorted(want) == sorted(got) == [str(i) for i in range(7)]
    for rid in want:
        a, b = want[rid][-1], got[rid][-1]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        if tol is None:
            assert a.logprobs == b.logprobs
            continue
        assert len(a.logprobs or []) == len(b.logprobs or [])
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert x.keys() == y.keys()
            np.testing.assert_allclose(list(x.values()), list(y.values()), rtol=tol, atol=tol)
    assert any(want[rid][-1].logprobs for rid in want)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_engine_with_the_fused_kernels_gives_the_same_outputs(model_h32, jnp_outputs, decode_steps):
    """Greedy and seeded samples, stop strings, penalties and logprobs: the same with the add +
    RMSNorm and RoPE + K/V write kernels (interpret mode), in single steps and in multi-step
    decode programs, as with the jnp forms."""
    assert_same_outputs(jnp_outputs, staggered_with_kernels(model_h32, decode_steps, "1"), 1e-4)


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rope-write-qwen3")
    build_hf_model("qwen3", path)
    model = jaxinfer.load_model(path, dtype="float32")
    assert model.config.qk_norm
    return dataclasses.replace(model, tokenizer=ModTokenizer())


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_qwen3_engine_with_the_qk_norm_in_the_kernel_gives_the_same_outputs(
    qwen3_model, decode_steps
):
    """A Qwen3 (q/k norms before RoPE, scales perturbed from 1): the engine with its norms
    inside the RoPE + K/V write kernel (interpret mode) gives the tokens, texts and logprobs of
    the jnp forms, in single steps and in multi-step decode programs."""
    outs = {on: staggered_with_kernels(qwen3_model, decode_steps, on) for on in ("0", "1")}
    assert_same_outputs(outs["0"], outs["1"], 1e-4)


@pytest.mark.parametrize("last", ["0", "1"])
def test_qwen3_decode_steps_with_the_qk_norm_in_one_kernel_give_the_outputs_of_two(
    qwen3_model, last
):
    """With the Pallas attention, a Qwen3's decode steps (4 a program) with its q/k norms,
    RoPE, the K/V write and the attention in one kernel (the new token in the loop or after it)
    give what `rope_write` with the norms then the decode kernel give."""
    two = staggered_with_kernels(qwen3_model, 4, "1", "0", impl="pallas")
    one = staggered_with_kernels(qwen3_model, 4, "1", "1", impl="pallas", last=last)
    assert_same_outputs(two, one, 1e-5)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_decode_steps_in_one_kernel_give_the_outputs_of_two(model_h32, decode_steps):
    """With the Pallas attention, decode steps whose RoPE, K/V write and attention are one
    kernel (`rope_paged_decode`) give what `rope_write` then the decode kernel give: the same
    tokens, texts and logprobs, exactly (the kernel computes the same numbers)."""
    two, one = (
        staggered_with_kernels(model_h32, decode_steps, "1", fused, impl="pallas")
        for fused in ("0", "1")
    )
    assert_same_outputs(two, one, None)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_decode_steps_with_the_new_token_last_give_the_outputs_of_two_kernels(
    model_h32, decode_steps
):
    """$JAXINFER_ROPE_DECODE_LAST=1: every decode program's attention is the fused kernel with
    the new token joining after the kv loop. The same tokens and texts as `rope_write` then the
    decode kernel, logprobs within float32 rounding (its sums run in another order)."""
    two = staggered_with_kernels(model_h32, decode_steps, "1", "0", impl="pallas")
    last = staggered_with_kernels(model_h32, decode_steps, "1", "1", impl="pallas", last="1")
    assert_same_outputs(two, last, 1e-5)


def test_the_new_token_last_switch_reaches_the_next_engine_of_a_process(model_h32):
    """`bench_throughput.py --env JAXINFER_ROPE_DECODE_LAST=0,...=1` builds its engines in one
    process: the switch is a `Decoder` field, so the layers' shared jit (keyed by the block)
    traces the other form for the second engine instead of reusing the first one's trace."""
    staggered_with_kernels(model_h32, 4, "1", "1", impl="pallas", last="0")
    staggered_with_kernels(model_h32, 4, "1", "1", impl="pallas", last="1", clear=False)
