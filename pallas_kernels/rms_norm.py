"""RMSNorm with the residual add before it, one kernel: (x, h) -> (norm(x + h) * scale, x + h).

A decoder layer's norms read the residual stream right after an add. XLA made each norm two
kernels on a GPU at batch 1 (the row's sum of squares, then the scaling, ~1.3 us each); here the
add and the norm are one launch per block of rows. The math is the reference's, step for step:
the sum rounded to the stream's dtype (the stream is stored in it), normalised in float32, cast
back, times the scale (a product of two 16-bit floats is exact in float32, so rounding it once
gives the dtype's own multiply). Measured gain and why it is small: NOTES.md.

Shapes: R rows (tokens), D the width; a block of rows per program, D padded to a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels import common


def rms_norm_reference(
    x: Float[Array, "... D"], scale: Float[Array, "D"], eps: float, h: Float[Array, "... D"] = None
) -> tuple[Float[Array, "... D"], Float[Array, "... D"]]:
    """(norm(x + h) * scale, x + h) in plain jnp (h None: no add), as HF Llama computes it."""
    if h is not None:
        x = x + h
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype), x


def _kernel(*refs, eps: float, rows: int, width: int, add: bool):
    """One block of rows: [Rb, Dp] loads (rows past `rows`, columns past `width` masked), f32
    statistics."""
    if add:
        x_ref, h_ref, scale_ref, out_ref, sum_ref = refs
    else:
        x_ref, scale_ref, out_ref = refs
    block_rows, width_pad = x_ref.shape
    row = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    col_ok = jnp.arange(width_pad) < width
    ok = (row < rows)[:, None] & col_ok[None, :]
    x = plgpu.load(x_ref, mask=ok, other=0.0)
    if add:
        h = plgpu.load(h_ref, mask=ok, other=0.0)
        x = (x.astype(jnp.float32) + h.astype(jnp.float32)).astype(x_ref.dtype)
        plgpu.store(sum_ref, x, mask=ok)
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) / width + eps)  # [Rb, 1]
    y = (x32 * r).astype(x_ref.dtype).astype(jnp.float32)
    scale = plgpu.load(scale_ref, mask=col_ok, other=0.0).astype(jnp.float32)
    plgpu.store(out_ref, (y * scale[None, :]).astype(out_ref.dtype), mask=ok)


def default_tiles(rows: int, width: int) -> tuple[int, int]:
    """(rows a program, warps): enough work per launch for many rows, one row when they are
    few; 4 warps up to 4,096 columns (padded), else 8."""
    width_pad = pl.next_power_of_2(width)
    block_rows = 1 if rows < 64 else max(1, min(16, 8192 // width_pad))
    return block_rows, 4 if width_pad <= 4096 else 8


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "tiles"))
def _rms_norm_call(x, h, scale, *, eps: float, interpret: bool, tiles: tuple[int, int] | None):
    rows, width = x.shape
    width_pad = pl.next_power_of_2(width)
    block_rows, num_warps = tiles or default_tiles(rows, width)
    row_spec = pl.BlockSpec((block_rows, width_pad), lambda r: (r, 0))
    add = h is not None
    out_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, rows=rows, width=width, add=add),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[row_spec] * (2 if add else 1) + [pl.BlockSpec((width_pad,), lambda r: (0,))],
        out_specs=[row_spec] * (2 if add else 1),
        out_shape=[out_shape] * (2 if add else 1),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"add_rms_norm_d{width}" if add else f"rms_norm_d{width}",
    )(*((x, h, scale) if add else (x, scale)))
    return (outs[0], outs[1]) if add else (outs[0], x)


def rms_norm(
    x: Float[Array, "... D"],
    scale: Float[Array, "D"],
    eps: float,
    h: Float[Array, "... D"] | None = None,
    *,
    tiles: tuple[int, int] | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "... D"], Float[Array, "... D"]]:
    """(norm(x + h) * scale, x + h), or (norm(x) * scale, x) without h; x, h and scale of one
    dtype. tiles: (rows a program, warps), powers of two (None: `default_tiles`). interpret:
    Pallas interpret mode (default: on CPU)."""
    if tiles is not None and not all(t >= 1 and t & (t - 1) == 0 for t in tiles):
        raise ValueError(f"tiles {tiles} must be (rows, warps), each a power of two")
    if h is not None and (h.shape != x.shape or h.dtype != x.dtype):
        raise ValueError(f"h {h.shape} {h.dtype} must match x {x.shape} {x.dtype}")
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"scale {scale.shape} must be [{x.shape[-1]}]")
    if x.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"dtype {x.dtype} is not one of {common.SUPPORTED_DTYPES}")
    lead, width = x.shape[:-1], x.shape[-1]
    flat = lambda a: None if a is None else a.reshape(-1, width)
    out, total = _rms_norm_call(
        flat(x),
        flat(h),
        scale.astype(x.dtype),
        eps=float(eps),
        interpret=common.resolve_interpret(interpret),
        tiles=None if tiles is None else tuple(int(t) for t in tiles),
    )
    return out.reshape(*lead, width), total.reshape(*lead, width)
