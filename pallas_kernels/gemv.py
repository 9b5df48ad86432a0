"""One token's matmul with a weight matrix (a GEMV), in two forms; measured, not used by the engine.

At batch 1 a decode step is weight reads: XLA's GEMV of each projection splits K for enough
programs and then sums the splits in a kernel of its own (~1.3 us each, three a layer on an
H200). These kernels were written to drop those sums:
- `gemv_partials`: a program reads a [block_k, block_n] tile of W [K, N] and writes its float32
  partial sums, for the kernel that consumes the product to add as it loads them;
- `gemv_rows`: W stored [N, K] (as HF's Linear stores it), a program computes block_n outputs
  over all of K and writes them in the dtype, no partials.
On an H200 neither beat XLA's GEMV (its sum included) by what a removed sum would save
(NOTES.md, "GEMV"), so the engine keeps XLA's; they stay as measured parts.

Shapes: K the input width, N the output width, S = K / block_k splits. Partials [S, N] float32;
their sum over S is x @ W accumulated in float32 (in another order than XLA's dot).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """A program reads block_k rows x block_n columns of W, chunk_k rows a loop step."""

    block_n: int = 64
    block_k: int = 512
    chunk_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, k: int, n: int) -> bool:
        """W [k, n] splits into whole tiles of this config."""
        return k % self.block_k == 0 and n % self.block_n == 0 and self.block_k % self.chunk_k == 0


def gemv_reference(x: Float[Array, "K"], w: Float[Array, "K N"]) -> Float[Array, "N"]:
    """x @ W accumulated in float32."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))


def _check_inputs(x, w, config, *, k_axis: int, layout: str) -> None:
    """Both forms' entry checks: x [K], W 2-D with K on `k_axis`, one supported dtype, whole
    tiles of `config`."""
    if x.ndim != 1 or w.ndim != 2 or w.shape[k_axis] != x.shape[0]:
        raise ValueError(f"x {x.shape} and W {w.shape} must be [K] and {layout}")
    if x.dtype != w.dtype or x.dtype not in common.SUPPORTED_DTYPES:
        raise ValueError(f"x {x.dtype} and W {w.dtype} must be one of {common.SUPPORTED_DTYPES}")
    if not config.fits(*w.shape):
        raise ValueError(f"W {w.shape} does not split into {config} tiles")


def _kernel(x_ref, w_ref, out_ref, *, chunk_k: int):
    # x_ref [block_k]; w_ref [block_k, block_n]; out_ref [block_n] (this split's row)
    block_k, block_n = w_ref.shape

    def step(c, acc):  # acc [chunk_k, block_n]: products summed over K once, at the end
        rows = pl.ds(pl.multiple_of(c * chunk_k, chunk_k), chunk_k)
        x = x_ref[rows].astype(jnp.float32)
        return acc + x[:, None] * w_ref[rows, :].astype(jnp.float32)

    acc = jnp.zeros((chunk_k, block_n), jnp.float32)
    acc = lax.fori_loop(0, block_k // chunk_k, step, acc)
    out_ref[...] = jnp.sum(acc, axis=0)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _gemv_call(x, w, *, config: GemvConfig, interpret: bool):
    k, n = w.shape
    c = config
    splits = k // c.block_k
    return pl.pallas_call(
        functools.partial(_kernel, chunk_k=c.chunk_k),
        grid=(n // c.block_n, splits),
        in_specs=[
            pl.BlockSpec((c.block_k,), lambda j, s: (s,)),
            pl.BlockSpec((c.block_k, c.block_n), lambda j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((None, c.block_n), lambda j, s: (s, j)),
        out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name=f"gemv_k{k}_n{n}",
    )(x, w)


def gemv_partials(
    x: Float[Array, "K"],
    w: Float[Array, "K N"],
    config: GemvConfig = GemvConfig(),
    *,
    interpret: bool | None = None,
) -> Float[Array, "S N"]:
    """The split-K partial sums of x @ W, float32 [K / block_k, N]; x and W of one dtype."""
    _check_inputs(x, w, config, k_axis=0, layout="[K, N]")
    return _gemv_call(x, w, config=config, interpret=common.resolve_interpret(interpret))


# ----------------------------------------------------------------------------
# W stored [N, K] (each output's weights contiguous, as HF's Linear stores them).
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemvRowsConfig:
    """A program computes block_n outputs over all of K, chunk_k columns a loop step."""

    block_n: int = 16
    chunk_k: int = 512
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % self.chunk_k == 0


def _rows_kernel(x_ref, w_ref, out_ref, *, chunk_k: int):
    # x_ref [K]; w_ref [block_n, K]; out_ref [block_n]
    block_n, k = w_ref.shape

    def step(c, acc):  # acc [block_n, chunk_k]: summed over K once, at the end
        cols = pl.ds(pl.multiple_of(c * chunk_k, chunk_k), chunk_k)
        x = x_ref[cols].astype(jnp.float32)
        return acc + w_ref[:, cols].astype(jnp.float32) * x[None, :]

    acc = lax.fori_loop(0, k // chunk_k, step, jnp.zeros((block_n, chunk_k), jnp.float32))
    out_ref[...] = jnp.sum(acc, axis=1).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _gemv_rows_call(x, w, *, config: GemvRowsConfig, interpret: bool):
    n, k = w.shape
    c = config
    return pl.pallas_call(
        functools.partial(_rows_kernel, chunk_k=c.chunk_k),
        grid=(n // c.block_n,),
        in_specs=[
            pl.BlockSpec((k,), lambda j: (0,)),
            pl.BlockSpec((c.block_n, k), lambda j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((c.block_n,), lambda j: (j,)),
        out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name=f"gemv_rows_n{n}_k{k}",
    )(x, w)


def gemv_rows(
    x: Float[Array, "K"],
    w: Float[Array, "N K"],
    config: GemvRowsConfig = GemvRowsConfig(),
    *,
    interpret: bool | None = None,
) -> Float[Array, "N"]:
    """W @ x in x's dtype (float32 accumulation), W stored [N, K]; x and W of one dtype."""
    _check_inputs(x, w, config, k_axis=1, layout="[N, K]")
    return _gemv_rows_call(x, w, config=config, interpret=common.resolve_interpret(interpret))
