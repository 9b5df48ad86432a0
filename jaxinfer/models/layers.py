"""Small layers shared by the decoders: parameter declaration, RMSNorm, rotary embedding, MLP."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxinfer.config import ModelConfig, RopeScaling
from pallas_kernels import decode_matmul as dm
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference

_INIT = nn.initializers.normal(stddev=0.02)


def dense(
    x: Float[Array, "..."], w: Float[Array, "..."], contract: int, row_gemv: bool = False
) -> Float[Array, "..."]:
    """x [*B, *C] times w [*O, *C] -> [*B, *O], summed over C, the last `contract` axes of each:
    w holds its output axes first and its input axes last, as HF stores a linear layer's weight.

    `row_gemv` with a single token: a float32 multiply and sum over w's trailing axes, which XLA
    runs as one row-reduction kernel; its GEMV splits K and sums the partials in a kernel of its
    own. Llama-3-8B, one token, H200 (`scripts/bench_gemv.py`): q/k/v 13.6 us against 15.1, o
    9.4 against 11.0; the batch-1 engine TPOT 4.10 ms against 4.21 (bench/README.md). Gate/up
    and down keep [in, out]: over [out, in] cuBLAS was slower at 128 rows."""
    lead = x.shape[: x.ndim - contract]
    x_axes, w_axes = range(x.ndim - contract, x.ndim), range(w.ndim - contract, w.ndim)
    if not (row_gemv and math.prod(lead) == 1):
        return jnp.tensordot(x, w, axes=(tuple(x_axes), tuple(w_axes)))
    xs = x.reshape((1,) * (w.ndim - contract) + x.shape[x.ndim - contract :])
    y = jnp.sum(xs.astype(jnp.float32) * w.astype(jnp.float32), axis=tuple(w_axes))
    return y.astype(x.dtype).reshape(lead + y.shape)


def declare(
    module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=_INIT
) -> Array:
    """One declaration per array: shape, dtype, logical axes and init (sharding reads the axes)."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis (the model width, or a head's width for Qwen3's q/k norm),
    with the residual add before it: (x, h) -> (norm(x + h) * scale, x + h); h None: no add.

    Normalised in f32 and cast back before the scale, as HF Llama does. `kernel`: one Pallas
    kernel for the add and the norm (`pallas_kernels.rms_norm`); else plain jnp, the kernel's
    reference."""

    eps: float
    dtype: jnp.dtype
    axis_name: str = "embed"
    kernel: bool = False

    @nn.compact
    def __call__(
        self, x: Float[Array, "... D"], h: Float[Array, "... D"] | None = None
    ) -> tuple[Float[Array, "... D"], Float[Array, "... D"]]:
        scale = declare(
            self, "scale", (x.shape[-1],), (self.axis_name,), self.dtype, nn.initializers.ones
        )
        if self.kernel:
            return rms_norm(x, scale, self.eps, h)
        return rms_norm_reference(x, scale, self.eps, h)


class NormScale(nn.Module):
    """The scale [width] of an RMS norm whose math a kernel does (Qwen3's q/k norm inside
    `rope_write`): the parameter an `RMSNorm` of the same name declares, so checkpoints and
    sharding see one tree either way."""

    dtype: jnp.dtype
    axis_name: str

    @nn.compact
    def __call__(self, width: int) -> Float[Array, "W"]:
        init = nn.initializers.ones
        return declare(self, "scale", (width,), (self.axis_name,), self.dtype, init)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with HF's `linear` and `llama3` scalings."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Float[Array, "B T N H"]:
    """Rotary embedding in HF's half-split layout (pairs are (i, i + H/2))."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# `MLP.swiglu_kernel`: the rows where the fused kernel beat XLA's gate/up and SiLU x up in a
# layer on an H200 (by 3.8 us at 128 rows, 1.4 at 96; 3.0 us slower at 64, as it pads to 128
# rows; bench/README), and its tiles.
SWIGLU_ROWS = (65, dm.ROWS)
SWIGLU_CONFIG = dm.DecodeMatmulConfig(tile_n=128, tile_k=64, stages=4)


def swiglu_kernel_fits(rows: int, d: int, f: int, dtype) -> bool:
    """Whether `MLP.swiglu_kernel` takes a step of `rows` tokens."""
    if not SWIGLU_ROWS[0] <= rows <= SWIGLU_ROWS[1]:
        return False
    return dm.why_not(rows, d, f, jnp.dtype(dtype), SWIGLU_CONFIG, parts=2) is None


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)).

    `swiglu_kernel` (Hopper, bf16): steps of 65-128 tokens run gate/up and SiLU x up as one
    Mosaic GPU kernel (`decode_matmul.decode_swiglu`), which never writes the [T, 2F] product;
    other steps, and shapes it does not take, as below."""

    cfg: ModelConfig
    dtype: jnp.dtype
    features: int | None = None  # F; default: the config's intermediate_size
    swiglu_kernel: bool = False

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        d, f = self.cfg.hidden_size, self.features or self.cfg.intermediate_size
        # gate and up in one matmul: one weight read, one launch.
        gate_up = declare(self, "gate_up", (d, 2, f), ("embed", "gate_up", "mlp"), self.dtype)
        down = declare(self, "down", (f, d), ("mlp", "embed"), self.dtype)
        b, t = x.shape[:2]
        if self.swiglu_kernel and swiglu_kernel_fits(b * t, d, f, x.dtype):
            h = dm.decode_swiglu(x.reshape(b * t, d), gate_up, config=SWIGLU_CONFIG)
            h = h.reshape(b, t, f)
        else:
            h = jnp.einsum("BTD,DCF->BTCF", x, gate_up)  # [B, T, 2, F]
            h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
        return jnp.einsum("BTF,FD->BTD", h, down)
