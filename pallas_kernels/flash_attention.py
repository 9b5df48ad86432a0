"""Blockwise (flash) attention for prefill, with an online softmax.

Shapes (see jaxinfer's letter table): B batch, T query tokens, S key tokens,
N query heads, K kv heads, G = N // K query heads per kv head, H head dim.

Two forms share one kernel:

* batched: q [B, T, N, H], k/v [B, S, K, H] -> out [B, T, N, H]. With
  ``causal`` and T < S the queries are the LAST T positions of the keys
  (query t sits at key position S - T + t), as in flash-attn.
* packed: ``cu_seqlens`` int32 [num_seqs + 1]; q [T, N, H], k/v [T, K, H] hold
  the sequences back to back; each token attends causally within its own
  sequence. Packed rows are treated as one batch row whose query t may see
  keys ``seg_start[t] <= j <= t``: two bounds per row are all the masking
  needs, so no segment ids are compared.

Every query row i sees the keys ``lo_i <= j <= hi_i``. The kernel walks the
kv blocks of a q block in three stretches: masked blocks left of the fully
visible ones (window or sequence start), fully visible blocks without any
mask arithmetic, and masked blocks on the diagonal / at the tail.

File layout: kernel -> pallas_call wrapper (tile sizes in FlashConfig) ->
validated public entry ``flash_attention`` (decides the config and interpret
mode, then calls its jitted part with them static) ->
``flash_attention_reference`` (masks over ``common.attention_reference``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels import flash_attention_mgpu as mgpu
from pallas_kernels.common import (
    LOG2_E,
    SUPPORTED_DTYPES,
    check_tiles,
    online_softmax_step,
)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and launch parameters of the flash-attention kernel.

    Attributes:
      block_q: query rows per program (power of two, >= 16).
      block_k: key rows per inner-loop step (power of two, >= 16).
      num_warps: warps per program (Triton backend).
      num_stages: software-pipelining depth of the kv loop (Triton backend).
      backend: "triton" (Pallas Triton lowering). The Mosaic GPU kernel
        takes its own config, ``MgpuFlashConfig``.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    backend: str = "triton"

    def __post_init__(self):
        check_tiles(self, ("block_q", "block_k"))

    @classmethod
    def default(cls, head_dim: int, dtype) -> "FlashConfig":
        """Tiles tuned for Hopper: 128x128 with 8 warps up to H=128."""
        hp = pl.next_power_of_2(head_dim)
        if jnp.dtype(dtype) == jnp.float32:
            return cls(block_q=64, block_k=32, num_warps=4, num_stages=2)
        if hp <= 64:
            return cls(block_q=128, block_k=64, num_warps=4, num_stages=3)
        if hp <= 128:
            return cls(block_q=128, block_k=128, num_warps=8, num_stages=3)
        return cls(block_q=64, block_k=64, num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------
def _flash_kernel(
    *refs,
    qk_scale,
    causal,
    window,
    block_q,
    block_k,
    head_dim,
    seq_q,
    seq_k,
    packed,
    with_lse,
    num_q_blocks,
    reverse,
    dot_precision,
):
    if packed:
        q_ref, k_ref, v_ref, seg_ref, o_ref, *lse_ref = refs  # seg_ref: [T]
    else:
        q_ref, k_ref, v_ref, o_ref, *lse_ref = refs
        seg_ref = None
    # q_ref/o_ref: [T, Hp]; k_ref/v_ref: [S, Hp]; lse_ref: [T]
    head_pad = q_ref.shape[-1]
    qi = pl.program_id(2)
    if reverse:  # heaviest causal blocks first: better tail balance
        qi = num_q_blocks - 1 - qi
    q0 = qi * block_q
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    row_ok = rows < seq_q
    row_last = jnp.minimum(q0 + block_q, seq_q) - 1

    col_mask = None
    if head_pad != head_dim:
        col_mask = (jnp.arange(head_pad) < head_dim)[None, :]

    def and_cols(mask):
        return mask if col_mask is None else jnp.logical_and(mask, col_mask)

    q = plgpu.load(q_ref.at[pl.ds(q0, block_q), :], mask=and_cols(row_ok[:, None]), other=0.0)

    # Visible key range [lo, hi] per row, and its extremes over the block.
    offset = (seq_k - seq_q) if (causal and not packed) else 0
    pos = rows + offset
    pos_first, pos_last = q0 + offset, row_last + offset
    if packed:
        lo = plgpu.load(seg_ref.at[pl.ds(q0, block_q)], mask=row_ok, other=0)
        lo_first, lo_last = seg_ref[q0], seg_ref[row_last]
    else:
        lo = jnp.zeros((block_q,), jnp.int32)
        lo_first = lo_last = jnp.int32(0)
    if window is not None:
        lo = jnp.maximum(lo, pos - (window - 1))
        lo_first = jnp.maximum(lo_first, pos_first - (window - 1))
        lo_last = jnp.maximum(lo_last, pos_last - (window - 1))
    if causal:
        hi = pos
        hi_first, hi_last = pos_first, pos_last
    else:
        hi = jnp.full((block_q,), seq_k - 1, jnp.int32)
        hi_first = hi_last = jnp.int32(seq_k - 1)

    # kv blocks [start, end) hold every visible key; [full0, full1) are fully
    # visible to every row of this q block and need no masking.
    start = lax.div(lo_first, block_k)
    end = lax.div(hi_last + block_k, block_k)
    full0 = jnp.clip(lax.div(lo_last + block_k - 1, block_k), start, end)
    full1 = jnp.clip(lax.div(hi_first + 1, block_k), full0, end)

    def step(kb, carry, masked):
        k0 = kb * block_k
        cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
        if masked:
            kv_mask = and_cols((cols < seq_k)[:, None])
        else:
            kv_mask = col_mask
        kv_slice = (pl.ds(k0, block_k), slice(None))
        if kv_mask is None:
            k = plgpu.load(k_ref.at[kv_slice])
        else:
            k = plgpu.load(k_ref.at[kv_slice], mask=kv_mask, other=0.0)
        visible = None
        if masked:
            visible = jnp.logical_and(cols[None, :] >= lo[:, None], cols[None, :] <= hi[:, None])

        def load_v():
            if kv_mask is None:
                return plgpu.load(v_ref.at[kv_slice])
            return plgpu.load(v_ref.at[kv_slice], mask=kv_mask, other=0.0)

        return online_softmax_step(
            q, k, load_v, carry, qk_scale=qk_scale, visible=visible, dot_precision=dot_precision
        )

    carry = common.init_carry(block_q, head_pad)
    masked_step = functools.partial(step, masked=True)
    carry = lax.fori_loop(start, full0, masked_step, carry)
    carry = lax.fori_loop(full0, full1, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(full1, end, masked_step, carry)

    l = jnp.where(l == 0.0, 1.0, l)  # only rows past the end can have l == 0
    out = acc / l[:, None]
    plgpu.store(
        o_ref.at[pl.ds(q0, block_q), :], out.astype(o_ref.dtype), mask=and_cols(row_ok[:, None])
    )
    if with_lse:
        # m is in log2 units of the scaled logits; lse is natural-log.
        lse = (m + jnp.log2(l)) * (1.0 / LOG2_E)
        plgpu.store(lse_ref[0].at[pl.ds(q0, block_q)], lse, mask=row_ok)


# ----------------------------------------------------------------------------
# pallas_call wrapper.
# ----------------------------------------------------------------------------
def _flash_call(
    q, k, v, seg_start, *, sm_scale, causal, window, with_lse, config: FlashConfig, interpret: bool
):
    """q [B, T, N, H], k/v [B, S, K, H], seg_start [B, T] int32 or None."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    head_pad = pl.next_power_of_2(head_dim)
    block_q, block_k = config.block_q, config.block_k
    num_q_blocks = pl.cdiv(seq_q, block_q)
    packed = seg_start is not None
    dot_precision = common.dot_precision(q.dtype)

    kernel = functools.partial(
        _flash_kernel,
        qk_scale=sm_scale * LOG2_E,
        causal=causal,
        window=window,
        block_q=block_q,
        block_k=block_k,
        head_dim=head_dim,
        seq_q=seq_q,
        seq_k=seq_k,
        packed=packed,
        with_lse=with_lse,
        num_q_blocks=num_q_blocks,
        reverse=causal,
        dot_precision=dot_precision,
    )

    # Grid (N, B, q blocks): heads vary fastest so programs that share a kv
    # head run together and reuse its K/V from L2.
    grid = (num_heads, batch, num_q_blocks)
    q_spec = pl.BlockSpec((None, seq_q, None, head_pad), lambda n, b, i: (b, 0, n, 0))
    kv_spec = pl.BlockSpec((None, seq_k, None, head_pad), lambda n, b, i: (b, 0, n // group, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if packed:
        in_specs.append(pl.BlockSpec((None, seq_q), lambda n, b, i: (b, 0)))
        args.append(seg_start)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    if with_lse:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, seq_q), lambda n, b, i: (b, n, 0)))
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=f"flash_attention_h{head_dim}_bq{block_q}_bk{block_k}",
    )(*args)
    return outs if with_lse else (outs[0], None)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------
def _check_qkv(q, k, v, packed: bool):
    rank = 3 if packed else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != rank:
            form = "[T, N, H] (packed)" if packed else "[B, T, N, H]"
            raise ValueError(f"{name} must be {form}, got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not in bf16/f16/f32")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must match")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"batch of q {q.shape} and k {k.shape} differ")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"head dim of q {q.shape} and k {k.shape} differ")
    if not 16 <= head_dim <= 256 or head_dim % 8:
        raise ValueError(f"head dim {head_dim} must be a multiple of 8 in 16..256")
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"N={num_heads} not a multiple of K={num_kv_heads}")


def default_config(q, *, packed: bool, window, interpret: bool, hopper: bool | None = None):
    """The Mosaic GPU kernel on Hopper where it applies (bf16/f16, H a
    multiple of 64, batched, no window), else the Triton kernel's tiles.
    hopper: whether the device is an sm_90 GPU (default: `common.on_hopper()`)."""
    hopper = common.on_hopper() if hopper is None else hopper
    if hopper and mgpu.supported(q, packed=packed, window=window, interpret=interpret) is None:
        return mgpu.MgpuFlashConfig.default(q.shape[-1])
    return FlashConfig.default(q.shape[-1], q.dtype)


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    cu_seqlens=None,
    sliding_window: int | None = None,
    return_lse: bool = False,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
):
    """Flash attention (prefill), batched or packed.

    Args:
      q: [B, T, N, H] (or [T, N, H] with ``cu_seqlens``).
      k, v: [B, S, K, H] (or [T, K, H] with ``cu_seqlens``); N % K == 0.
      causal: causal mask; with T < S queries sit at the last T key positions.
      sm_scale: logit scale, default 1/sqrt(H).
      cu_seqlens: int32 [num_seqs + 1] sequence boundaries for the packed form
        (always causal). Tokens past ``cu_seqlens[-1]`` form one more sequence.
      sliding_window: key j is visible to query i iff i - window < j <= i.
      return_lse: also return the log-sum-exp [B, N, T] (packed: [N, T]) f32.
      config: ``FlashConfig`` (Triton kernel) or ``MgpuFlashConfig`` (Mosaic
        GPU kernel); default: ``default_config`` for the default device.
      interpret: run the kernel in Pallas interpret mode (default: on CPU).

    Returns:
      out with q's shape and dtype, and lse if asked.
    """
    packed = cu_seqlens is not None
    _check_qkv(q, k, v, packed)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if sliding_window is not None:
        if sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be >= 1")
        if not (causal or packed):
            raise ValueError("sliding_window needs causal attention")
    if causal and not packed and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal needs T <= S, got T={q.shape[1]}, S={k.shape[1]}")
    if packed:
        _check_packed(q, k, cu_seqlens)
    interpret = common.resolve_interpret(interpret)
    if config is None:
        config = default_config(q, packed=packed, window=sliding_window, interpret=interpret)
    if isinstance(config, mgpu.MgpuFlashConfig):
        why = mgpu.supported(q, packed=packed, window=sliding_window, interpret=interpret)
        if why is not None:
            raise ValueError(
                f"the Mosaic GPU flash kernel can't take {why}; "
                "pass a FlashConfig (Triton) or config=None"
            )
    out, lse = _flash_attention(
        q,
        k,
        v,
        cu_seqlens,
        causal=causal,
        sm_scale=sm_scale,
        window=sliding_window,
        return_lse=return_lse,
        config=config,
        interpret=interpret,
    )
    return (out, lse) if return_lse else out


def _check_packed(q, k, cu_seqlens):
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"packed q {q.shape} and k {k.shape} need the same T")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [num_seqs + 1], got {cu_seqlens.shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")


@functools.partial(
    jax.jit, static_argnames=("causal", "sm_scale", "window", "return_lse", "config", "interpret")
)
def _flash_attention(
    q, k, v, cu_seqlens, *, causal, sm_scale, window, return_lse, config, interpret
):
    """The checked call of ``flash_attention``, its config and interpret mode
    decided: (out, lse or None)."""
    if isinstance(config, mgpu.MgpuFlashConfig):
        return mgpu.flash_attention_mgpu(
            q, k, v, causal=causal, sm_scale=sm_scale, return_lse=return_lse, config=config
        )
    if cu_seqlens is None:
        return _flash_call(
            q,
            k,
            v,
            None,
            sm_scale=sm_scale,
            causal=causal,
            window=window,
            with_lse=return_lse,
            config=config,
            interpret=interpret,
        )
    tokens = jnp.arange(q.shape[0], dtype=jnp.int32)
    cu = cu_seqlens.astype(jnp.int32)
    seq_id = jnp.searchsorted(cu, tokens, side="right", method="compare_all") - 1
    seg_start = jnp.where(seq_id >= cu.shape[0] - 1, cu[-1], cu[seq_id])
    out, lse = _flash_call(
        q[None],
        k[None],
        v[None],
        seg_start[None],
        sm_scale=sm_scale,
        causal=True,
        window=window,
        with_lse=return_lse,
        config=config,
        interpret=interpret,
    )
    return out[0], None if lse is None else lse[0]


# ----------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------
def flash_attention_reference(
    q,
    k,
    v,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    cu_seqlens=None,
    sliding_window: int | None = None,
    return_lse: bool = False,
):
    """Plain-jnp attention with the same contract as ``flash_attention``:
    its masks over ``common.attention_reference`` (f32 [B, N, T, S] logits)."""
    packed = cu_seqlens is not None
    if packed:
        q, k, v = q[None], k[None], v[None]
    seq_q, seq_k = q.shape[1], k.shape[1]
    t = jnp.arange(seq_q)[:, None]
    s = jnp.arange(seq_k)[None, :]
    if packed:
        cu = cu_seqlens.astype(jnp.int32)
        seg = jnp.searchsorted(cu, jnp.arange(seq_q), side="right", method="compare_all")
        visible = (seg[:, None] == seg[None, :]) & (s <= t)
        pos = t
    else:
        pos = t + (seq_k - seq_q if causal else 0)
        visible = (s <= pos) if causal else jnp.ones((seq_q, seq_k), bool)
    if sliding_window is not None:
        visible &= s > pos - sliding_window
    out, lse = common.attention_reference(q, k, v, visible[None], sm_scale)
    out = out.astype(q.dtype)
    if packed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
