"""flash_attention against its jnp reference, in Pallas interpret mode.

Interpret mode fills output buffers with NaN before the kernel runs, so the
finiteness check below proves that every output element was written.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.common import on_hopper
from pallas_kernels.flash_attention import (
    FlashConfig,
    default_config,
    flash_attention,
    flash_attention_reference,
)

from kernel_checks import assert_close

# Small tiles on the CPU: more blocks per case, so every masking stretch
# (window-left, full, diagonal, tail) is exercised at modest lengths.
SMALL = FlashConfig(block_q=32, block_k=32)


def _qkv(seed, q_shape, kv_shape, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], q_shape, dtype),
        jax.random.normal(ks[1], kv_shape, dtype),
        jax.random.normal(ks[2], kv_shape, dtype),
    )


# (B, T, S, N, K, H, causal, window, dtype, config)
BATCHED = [
    (2, 1, 1, 4, 4, 64, True, None, jnp.float32, SMALL),
    (1, 3, 3, 8, 2, 80, True, None, jnp.bfloat16, SMALL),
    (2, 17, 17, 4, 1, 128, True, None, jnp.float32, SMALL),
    (1, 256, 256, 8, 1, 64, True, None, jnp.bfloat16, None),
    (1, 513, 513, 4, 1, 128, True, None, jnp.bfloat16, None),
    (1, 1023, 1023, 2, 2, 64, True, 100, jnp.bfloat16, None),
    (1, 2048, 2048, 1, 1, 64, True, None, jnp.bfloat16, None),
    (2, 17, 300, 4, 2, 64, True, None, jnp.float32, SMALL),  # T < S
    (1, 100, 257, 4, 2, 80, False, None, jnp.float16, SMALL),  # non-causal
    (1, 130, 130, 2, 1, 256, True, 33, jnp.float32, SMALL),
    (2, 64, 64, 8, 8, 96, True, 1, jnp.bfloat16, SMALL),  # window = 1
]


@pytest.mark.parametrize("b,t,s,n,k,h,causal,window,dtype,config", BATCHED)
def test_batched(b, t, s, n, k, h, causal, window, dtype, config):
    q, kk, v = _qkv(t * 7 + h, (b, t, n, h), (b, s, k, h), dtype)
    out, lse = flash_attention(
        q, kk, v, causal=causal, sliding_window=window, return_lse=True, config=config
    )
    ref, ref_lse = flash_attention_reference(
        q, kk, v, causal=causal, sliding_window=window, return_lse=True
    )
    assert out.dtype == dtype and lse.shape == (b, n, t)
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, jnp.float32 if dtype == jnp.float32 else dtype)


# (seq lens, N, K, H, window, dtype, config, pad tokens past cu[-1])
PACKED = [
    ((1, 3, 17, 256, 513), 8, 2, 64, None, jnp.bfloat16, None, 0),
    ((5, 1, 40, 33), 4, 4, 80, 7, jnp.float32, SMALL, 3),
    ((70, 2, 129), 8, 1, 128, 50, jnp.bfloat16, SMALL, 0),
]


@pytest.mark.parametrize("lens,n,k,h,window,dtype,config,pad", PACKED)
def test_packed(lens, n, k, h, window, dtype, config, pad):
    total = sum(lens) + pad
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    q, kk, v = _qkv(total, (total, n, h), (total, k, h), dtype)
    out, lse = flash_attention(
        q, kk, v, cu_seqlens=cu, sliding_window=window, return_lse=True, config=config
    )
    ref, ref_lse = flash_attention_reference(
        q, kk, v, cu_seqlens=cu, sliding_window=window, return_lse=True
    )
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, jnp.float32 if dtype == jnp.float32 else dtype)


def test_packed_equals_batched_per_sequence():
    lens = (9, 40)
    cu = jnp.asarray([0, 9, 49], jnp.int32)
    q, k, v = _qkv(1, (49, 4, 64), (49, 2, 64), jnp.float32)
    out = flash_attention(q, k, v, cu_seqlens=cu, config=SMALL)
    for a, b in zip(cu[:-1], cu[1:]):
        one = flash_attention(q[None, a:b], k[None, a:b], v[None, a:b], config=SMALL)[0]
        np.testing.assert_allclose(out[a:b], one, rtol=1e-6, atol=1e-6)
    del lens


def test_sm_scale():
    q, k, v = _qkv(3, (1, 40, 2, 64), (1, 40, 2, 64), jnp.float32)
    out = flash_attention(q, k, v, sm_scale=0.3, config=SMALL)
    ref = flash_attention_reference(q, k, v, sm_scale=0.3)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize(
    "q_shape,kv_shape,kwargs",
    [
        ((1, 8, 4, 64), (1, 8, 3, 64), {}),  # N % K != 0
        ((1, 8, 4, 64), (1, 8, 4, 32), {}),  # head dims differ
        ((8, 4, 64), (8, 4, 64), {}),  # rank 3 without cu
        ((1, 8, 4, 64), (2, 8, 4, 64), {}),  # batch differs
        ((1, 9, 4, 64), (1, 8, 4, 64), {}),  # causal T > S
        ((1, 8, 4, 300), (1, 8, 4, 300), {}),  # head dim too big
        ((1, 8, 4, 64), (1, 8, 4, 64), {"sliding_window": 0}),
        ((1, 8, 4, 64), (1, 8, 4, 64), {"causal": False, "sliding_window": 4}),
    ],
)
def test_bad_shapes_raise(q_shape, kv_shape, kwargs):
    q = jnp.ones(q_shape, jnp.float32)
    k = jnp.ones(kv_shape, jnp.float32)
    with pytest.raises(ValueError):
        flash_attention(q, k, k, **kwargs)


def test_bad_packed_raise():
    q = jnp.ones((8, 4, 64), jnp.float32)
    with pytest.raises(ValueError):
        flash_attention(q, q[:6], q[:6], cu_seqlens=jnp.array([0, 8], jnp.int32))
    with pytest.raises(ValueError):
        flash_attention(q, q, q, cu_seqlens=jnp.array([[0, 8]], jnp.int32))
    with pytest.raises(ValueError):
        flash_attention(q.astype(jnp.int8), q, q, cu_seqlens=jnp.array([0, 8], jnp.int32))


def test_config_validates():
    with pytest.raises(ValueError):
        FlashConfig(block_q=24)
    with pytest.raises(ValueError):
        FlashConfig(backend="cuda")


# ----------------------------------------------------------------------------
# The Mosaic GPU (Hopper) kernel. Its numbers can only be checked on an H100 /
# H200 (no interpret mode for it here); on the CPU the tests below pin the
# dispatch, and tests/test_triton_lowering.py lowers it for sm_90.
# ----------------------------------------------------------------------------


def test_mgpu_config_validates():
    # what fits sm_90's shared memory: 3 slots of 128 x 128 only without lse
    fits = lambda cfg, h, lse: mgpu.smem_bytes(cfg, h, 2, lse) <= mgpu.SMEM_LIMIT
    assert fits(mgpu.MgpuFlashConfig.default(128), 128, True)
    assert fits(mgpu.MgpuFlashConfig.default(256), 256, True)
    assert fits(mgpu.MgpuFlashConfig(64, 128, 3), 128, False)
    assert not fits(mgpu.MgpuFlashConfig(64, 128, 3), 128, True)
    assert not fits(mgpu.MgpuFlashConfig(64, 128, 2), 256, False)
    with pytest.raises(ValueError, match="multiple of 64"):
        mgpu.MgpuFlashConfig(block_q=32)
    with pytest.raises(ValueError, match="stages"):
        mgpu.MgpuFlashConfig(stages=1)
    assert mgpu.MgpuFlashConfig.default(256).block_kv == 64


def test_mgpu_supported_names_what_it_cannot_take():
    q = jnp.ones((1, 8, 4, 128), jnp.bfloat16)
    ok = dict(packed=False, window=None, interpret=False)
    assert mgpu.supported(q, **ok) is None
    assert "interpret" in mgpu.supported(q, **{**ok, "interpret": True})
    assert "packed" in mgpu.supported(q, **{**ok, "packed": True})
    assert "window" in mgpu.supported(q, **{**ok, "window": 8})
    assert "float32" in mgpu.supported(q.astype(jnp.float32), **ok)
    assert "head dim 80" in mgpu.supported(q[..., :80], **ok)


def test_default_is_triton_off_hopper():
    q = jnp.ones((1, 8, 4, 128), jnp.bfloat16)
    if jax.default_backend() == "cpu":
        assert not on_hopper()
    # interpret mode (the CPU's default) always takes the Triton kernel's tiles
    assert isinstance(default_config(q, packed=False, window=None, interpret=True), FlashConfig)


def test_forced_mgpu_in_interpret_mode_raises():
    q = jnp.ones((1, 8, 4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="Mosaic GPU.*interpret"):
        flash_attention(q, q, q, config=mgpu.MgpuFlashConfig(), interpret=True)


# (B, T, S, N, K, H, causal, dtype): padded T and S, T < S, one kv block,
# GQA 1/4/8, H 64/128/256, f16, non-causal.
MGPU = [
    (2, 1023, 1023, 8, 2, 128, True, jnp.bfloat16),
    (1, 513, 700, 4, 1, 128, True, jnp.bfloat16),
    (2, 200, 333, 8, 8, 64, False, jnp.float16),
    (1, 300, 300, 4, 4, 256, True, jnp.bfloat16),
    (1, 40, 40, 4, 2, 128, True, jnp.bfloat16),
    (1, 1, 17, 8, 1, 64, True, jnp.bfloat16),
    (1, 2048, 2048, 8, 1, 128, True, jnp.bfloat16),
    (1, 256, 4096, 4, 2, 128, False, jnp.bfloat16),
]


@pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: H100/H200 only")
@pytest.mark.parametrize("b,t,s,n,k,h,causal,dtype", MGPU)
@pytest.mark.parametrize(
    "config", [None, mgpu.MgpuFlashConfig(64, 128, 3), mgpu.MgpuFlashConfig(64, 64, 3)]
)
def test_mgpu_against_reference(b, t, s, n, k, h, causal, dtype, config):
    q, kk, v = _qkv(t * 3 + h, (b, t, n, h), (b, s, k, h), dtype)
    config = config or mgpu.MgpuFlashConfig.default(h)
    if mgpu.smem_bytes(config, h, jnp.dtype(dtype).itemsize, True) > mgpu.SMEM_LIMIT:
        with pytest.raises(ValueError, match="shared memory"):
            flash_attention(q, kk, v, causal=causal, return_lse=True, config=config)
        return
    out, lse = flash_attention(q, kk, v, causal=causal, return_lse=True, config=config)
    ref, ref_lse = flash_attention_reference(q, kk, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, n, t)
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, dtype)
    # the default on Hopper is this kernel: same numbers through config=None
    if config == mgpu.MgpuFlashConfig.default(h):
        np.testing.assert_array_equal(
            np.asarray(flash_attention(q, kk, v, causal=causal), np.float32),
            np.asarray(out, np.float32),
        )
