"""RoPE of a step's q and k and the write of its K/V rows into the page pools, one kernel.

After the q/k/v matmul of a decode step XLA ran five small kernels a layer on a GPU (RoPE of q,
RoPE of k, the V row to write, the two K/V writes; ~1.2-2.2 us each at batch 1, H200); here they
are one launch, the pools updated in place (aliased). The math is `layers.apply_rope` step for
step: angles position x inverse frequency in float32, cos and sin cast to the dtype, each product
and sum rounded to it (the dtype's own arithmetic), HF's half-split pairs (i, i + H/2). With
`qk_norm` scales (Qwen3) each q and k head is first RMS-normalised over H as `layers.RMSNorm`
does it: float32 statistics, cast to the dtype, times the scale.

Shapes: T tokens, K kv heads, G query heads per kv head (N = K * G), H head dim, pools viewed as
[K, P * L, H] rows. The input is the q/k/v matmul's output [T, K, G + 2, H] as it is. One program
per (token, kv head): its G query heads, its k and v rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels import common
from pallas_kernels.rms_norm import rms_norm_reference


def rope_reference(
    x: Float[Array, "T M H"], positions: Int[Array, "T"], inv_freq: Float[Array, "H/2"]
) -> Float[Array, "T M H"]:
    """HF's half-split rotary embedding in x's dtype (`layers.apply_rope` for one packed row)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, H/2]
    cos = jnp.cos(freqs)[:, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_write_reference(qkv, k_pages, v_pages, positions, slots, inv_freq, qk_norm=None):
    """(rope(q), pools with rope(k) and v written at `slots`; slot < 0 writes nothing).
    qk_norm: (q_scale [H], k_scale [H], eps) normalises q and k first."""
    t, kv_heads, rows, head_dim = qkv.shape
    q = qkv[:, :, : rows - 2].reshape(t, kv_heads * (rows - 2), head_dim)
    k, v = qkv[:, :, rows - 2], qkv[:, :, rows - 1]
    if qk_norm is not None:
        q_scale, k_scale, eps = qk_norm
        q, k = rms_norm_reference(q, q_scale, eps)[0], rms_norm_reference(k, k_scale, eps)[0]
    k = rope_reference(k, positions, inv_freq)
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape

    def write(pages, new):
        rows = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
        at = jnp.where(slots < 0, num_pages * page_size, slots)
        rows = rows.at[:, at].set(new.swapaxes(0, 1).astype(pages.dtype), mode="drop")
        return rows.reshape(pages.shape)

    return rope_reference(q, positions, inv_freq), write(k_pages, k), write(v_pages, v)


def _rotate(x1, x2, cos, sin, dtype):
    """(x1 cos - x2 sin, x2 cos + x1 sin), each product and sum rounded to `dtype` as the jnp
    form's ops are (f32 math, one rounding per op)."""
    f32 = jnp.float32
    r = lambda a: a.astype(dtype).astype(f32)
    x1, x2 = x1.astype(f32), x2.astype(f32)
    return r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin))


def scaled_norm(xs, scales, sum_sq, width: int, eps: float, dtype):
    """Each of `xs` (parts of rows, float32) RMS-normalised by the rows' float32 sum of squares
    `sum_sq` [.., 1] over `width` and scaled by its part of the scale, rounded as
    `rms_norm_reference` rounds: the normalised values cast to the dtype, the product with the
    scale in the dtype. The fused decode kernel's q/k norm uses it too."""
    f32 = jnp.float32
    inv = jax.lax.rsqrt(sum_sq / width + eps)
    r = lambda a: a.astype(dtype).astype(f32)
    return tuple(r(s.astype(f32) * r(x * inv)) for x, s in zip(xs, scales))


def _head_norm(x1, x2, s1, s2, eps, dtype):
    """The halves of rows [.., H/2] x 2 RMS-normalised over the whole row and scaled (s1, s2
    [H/2]): the sum of squares half by half, then `scaled_norm`."""
    f32 = jnp.float32
    x1, x2 = x1.astype(f32), x2.astype(f32)
    sum_sq = jnp.sum(x1 * x1, axis=-1, keepdims=True) + jnp.sum(x2 * x2, axis=-1, keepdims=True)
    return scaled_norm((x1, x2), (s1, s2), sum_sq, 2 * x1.shape[-1], eps, dtype)


def _kernel(pos_ref, slot_ref, freq_ref, *refs, group, eps):
    # pos_ref/slot_ref [1]; freq_ref [H/2]; with eps, q_scale_ref/k_scale_ref [H]; qkv_ref
    # [Cp, H] (rows: G query heads, k, v; padded); q_out [Gp, H]; k_out/v_out [P*L, H]
    if eps is None:
        qkv_ref, _k_in, _v_in, q_out, k_out, v_out = refs
    else:
        q_scale_ref, k_scale_ref, qkv_ref, _k_in, _v_in, q_out, k_out, v_out = refs
    head_dim = qkv_ref.shape[1]
    group_pad = q_out.shape[0]
    half = head_dim // 2
    dtype = qkv_ref.dtype
    angle = pos_ref[0].astype(jnp.float32) * freq_ref[...]  # [H/2]
    cos = jnp.cos(angle).astype(dtype).astype(jnp.float32)
    sin = jnp.sin(angle).astype(dtype).astype(jnp.float32)
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    g_ok = (jnp.arange(group_pad) < group)[:, None]
    heads = pl.ds(0, group_pad)
    q1 = plgpu.load(qkv_ref.at[heads, lo], mask=g_ok, other=0.0)
    q2 = plgpu.load(qkv_ref.at[heads, hi], mask=g_ok, other=0.0)
    k1, k2 = qkv_ref[group, lo], qkv_ref[group, hi]
    if eps is not None:
        q1, q2 = _head_norm(q1, q2, q_scale_ref[lo][None, :], q_scale_ref[hi][None, :], eps, dtype)
        k1, k2 = _head_norm(k1, k2, k_scale_ref[lo], k_scale_ref[hi], eps, dtype)
    r1, r2 = _rotate(q1, q2, cos[None, :], sin[None, :], dtype)
    plgpu.store(q_out.at[:, lo], r1.astype(dtype), mask=g_ok)
    plgpu.store(q_out.at[:, hi], r2.astype(dtype), mask=g_ok)

    slot = slot_ref[0]
    row = pl.ds(jnp.maximum(slot, 0), 1)
    live = jnp.full((1, half), slot >= 0)
    k1, k2 = _rotate(k1, k2, cos, sin, dtype)
    plgpu.store(k_out.at[row, lo], k1.astype(k_out.dtype)[None, :], mask=live)
    plgpu.store(k_out.at[row, hi], k2.astype(k_out.dtype)[None, :], mask=live)
    plgpu.store(v_out.at[row, lo], qkv_ref[group + 1, lo].astype(v_out.dtype)[None, :], mask=live)
    plgpu.store(v_out.at[row, hi], qkv_ref[group + 1, hi].astype(v_out.dtype)[None, :], mask=live)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"), donate_argnums=(1, 2))
def _rope_write_call(qkv, k_pages, v_pages, positions, slots, inv_freq, scales, *, eps, interpret):
    tokens, num_kv_heads, rows_per_head, head_dim = qkv.shape
    group = rows_per_head - 2
    num_pages, page_size = k_pages.shape[1:3]
    num_rows = num_pages * page_size
    group_pad = pl.next_power_of_2(group)
    # The q/k/v rows of a kv head as one block: the matmul's output read where it is (slicing
    # q, k and v out of it first cost XLA three copy kernels a layer).
    rows_pad = max(pl.next_power_of_2(rows_per_head), group_pad)
    rows_spec = pl.BlockSpec((None, num_rows, head_dim), lambda t, h: (h, 0, 0))
    scalar = pl.BlockSpec((1,), lambda t, h: (t,))
    q_spec = pl.BlockSpec((None, None, group_pad, head_dim), lambda t, h: (t, h, 0, 0))
    view = lambda pages: pages.reshape(num_kv_heads, num_rows, head_dim)
    whole = lambda n: pl.BlockSpec((n,), lambda t, h: (0,))
    num_scales = len(scales)  # 0, or q's and k's norm scales [H]
    q_out, k_rows, v_rows = pl.pallas_call(
        functools.partial(_kernel, group=group, eps=eps),
        grid=(tokens, num_kv_heads),
        in_specs=[
            scalar,
            scalar,
            whole(head_dim // 2),
            *[whole(head_dim)] * num_scales,
            pl.BlockSpec((None, None, rows_pad, head_dim), lambda t, h: (t, h, 0, 0)),
            rows_spec,
            rows_spec,
        ],
        out_specs=[q_spec, rows_spec, rows_spec],
        out_shape=[
            jax.ShapeDtypeStruct((tokens, num_kv_heads, group, head_dim), qkv.dtype),
            jax.ShapeDtypeStruct((num_kv_heads, num_rows, head_dim), k_pages.dtype),
            jax.ShapeDtypeStruct((num_kv_heads, num_rows, head_dim), v_pages.dtype),
        ],
        input_output_aliases={4 + num_scales: 1, 5 + num_scales: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name=f"rope_write_kv_h{head_dim}" + ("_qk_norm" if num_scales else ""),
    )(positions, slots, inv_freq, *scales, qkv, view(k_pages), view(v_pages))
    return q_out, k_rows.reshape(k_pages.shape), v_rows.reshape(v_pages.shape)


def check_qk_norm(qk_norm, head_dim: int) -> tuple[tuple, float | None]:
    """((q_scale, k_scale), eps) from `qk_norm`, each scale checked to be [head_dim]; ((),
    None) without it."""
    if qk_norm is None:
        return (), None
    *scales, eps = qk_norm
    for name, x in zip(("q_scale", "k_scale"), scales):
        if x.shape != (head_dim,):
            raise ValueError(f"qk_norm's {name} must be [{head_dim}], got {x.shape}")
    return tuple(scales), float(eps)


def supported(head_dim: int, dtype) -> bool:
    """Shapes the kernel takes: half the head dim a power of two >= 16; a supported dtype."""
    half = head_dim // 2
    return (
        head_dim % 2 == 0
        and half >= 16
        and half & (half - 1) == 0
        and (jnp.dtype(dtype) in [jnp.dtype(d) for d in common.SUPPORTED_DTYPES])
    )


def rope_write(
    qkv: Float[Array, "T K G+2 H"],
    k_pages: Float[Array, "K P L H"],
    v_pages: Float[Array, "K P L H"],
    positions: Int[Array, "T"],
    slots: Int[Array, "T"],
    inv_freq: Float[Array, "H/2"],
    qk_norm: tuple[Float[Array, "H"], Float[Array, "H"], float] | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[Float[Array, "T N H"], Float[Array, "K P L H"], Float[Array, "K P L H"]]:
    """(rope(q) [T, N = K * G, H], k_pages, v_pages with rope(k) and v written at `slots`) from
    the q/k/v matmul's output: per kv head its G query heads, then its k and its v (slot = page *
    L + offset; negative: nothing written). qk_norm (q_scale, k_scale, eps): each q and k head
    RMS-normalised and scaled before RoPE (Qwen3). The pools are donated: pass them from a jit
    that donates its own (the engine's step), or copies are made. interpret: default on CPU."""
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [T, K, G + 2, H] with G >= 1, got {qkv.shape}")
    tokens, num_kv_heads, rows, head_dim = qkv.shape
    pool = (num_kv_heads, *k_pages.shape[1:3], head_dim)
    if k_pages.shape != pool or v_pages.shape != pool:
        raise ValueError(f"pools must both be {list(pool)}, got {k_pages.shape}, {v_pages.shape}")
    if not supported(head_dim, qkv.dtype):
        raise ValueError(f"head dim {head_dim} / dtype {qkv.dtype} is not supported")
    for name, x in (("positions", positions), ("slots", slots)):
        if x.shape != (tokens,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [{tokens}], got {x.dtype}{x.shape}")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must be [{head_dim // 2}], got {inv_freq.shape}")
    scales, eps = check_qk_norm(qk_norm, head_dim)
    q, k_pages, v_pages = _rope_write_call(
        qkv,
        k_pages,
        v_pages,
        positions,
        slots,
        jnp.asarray(inv_freq, jnp.float32),
        scales,
        eps=eps,
        interpret=common.resolve_interpret(interpret),
    )
    return q.reshape(tokens, num_kv_heads * (rows - 2), head_dim), k_pages, v_pages
