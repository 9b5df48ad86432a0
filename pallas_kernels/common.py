"""What every kernel file shares: constants, tile checks, device facts, the
online-softmax step, and the one plain-jnp reference attention.

Device facts (interpret mode, Hopper or not, the SM count) are read here, by
the public entry points, before their jitted parts: they reach the compiled
programs as static arguments, so they are part of every jit cache key and
never read at trace time.

Shapes (jaxinfer's letter table): B batch, T query tokens, S key tokens,
N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

# Finite "minus infinity": exp2(MASK - m) is exactly 0 for any real m, and
# MASK - MASK = 0 never makes a NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The kernels take exp2 of logits pre-scaled by log2(e) (one multiply folded
# into the logit scale instead of one per exp).
LOG2_E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SM_COUNT_FALLBACK = 132  # an H100 / H200 SXM, for devices that report none
SM90_SMEM_LIMIT = 232448  # shared memory a CTA may take on sm_90 (227 KiB), Mosaic GPU kernels


# ----------------------------------------------------------------------------
# Configs and device facts (host side, outside every jit).
# ----------------------------------------------------------------------------
def check_tiles(config, names, backends=("triton",)) -> None:
    """Tile sizes are powers of two >= 16; the backend is one that exists."""
    for name in names:
        b = getattr(config, name)
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    if config.backend not in backends:
        raise ValueError(f"unknown backend {config.backend!r}")


def default_device() -> jax.Device:
    """The device new arrays go to: `jax.default_device` where set, else the
    first device of the default backend."""
    device = jax.config.jax_default_device
    if isinstance(device, str):  # a platform name
        return jax.local_devices(backend=device)[0]
    return device if device is not None else jax.local_devices()[0]


def resolve_interpret(interpret: bool | None) -> bool:
    """None means interpret mode exactly when JAX runs on the CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def mosaic_gpu_interpreter():
    """JAX's simulator of Mosaic GPU kernels on the CPU (warpgroups, TMA copies, barriers,
    wgmma) as the `interpret` argument of `plgpu.kernel`, or None where this jax has none.
    It lacks transposed shared-memory views, clusters, semaphores and programmatic
    dependent launch (jax 0.10.2)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams()


def on_hopper(device: jax.Device | None = None) -> bool:
    """The device (default: `default_device()`) is an sm_90 GPU (H100/H200),
    where wgmma exists."""
    device = device or default_device()
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9"
    )


def num_sms(device: jax.Device | None = None) -> int:
    """Streaming multiprocessors of the device (default: `default_device()`)."""
    device = device or default_device()
    return int(getattr(device, "core_count", 0) or SM_COUNT_FALLBACK)


# ----------------------------------------------------------------------------
# Kernel pieces (traced inside the Triton kernels).
# ----------------------------------------------------------------------------
def init_carry(rows: int, head_pad: int):
    """(acc [rows, Hp], running max [rows], running sum [rows]) of an empty
    online softmax."""
    return (
        jnp.zeros((rows, head_pad), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(q, k, load_v, carry, *, qk_scale, visible, dot_precision):
    """One kv tile of an online softmax (log2 units).

    q [rows, Hp], k [block_k, Hp]; load_v() gives v [block_k, Hp] (called after
    the logits, so the V load can wait until they are computed); visible
    [rows, block_k] or None for all. carry = (acc, m, l) as in `init_carry`.
    """
    acc, m_prev, l_prev = carry
    s = plgpu.dot(q, k, trans_b=True, precision=dot_precision) * qk_scale
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    v = load_v()
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=dot_precision)
    return acc, m_new, l_new


def dot_precision(dtype):
    """f32 inputs get true f32 dots (tf32 would miss the references)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------
# The reference.
# ----------------------------------------------------------------------------
def attention_reference(q, k, v, visible, sm_scale: float | None = None):
    """Plain-jnp attention in f32 (HIGHEST precision): the yardstick of every
    attention kernel.

    Args:
      q: [B, T, N, H].
      k, v: [B, S, K, H]; N % K == 0 (no K/V repeat: q is viewed as [K, G]).
      visible: bool [B or 1, T, S], key s visible to query t.
      sm_scale: logit scale, default 1/sqrt(H).

    Returns:
      out [B, T, N, H] f32 and lse [B, N, T] f32 (natural log; rows that see
      no key give NaN out and -inf lse).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    sm_scale = 1.0 / math.sqrt(h) if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads, h)
    logits = (
        jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        * sm_scale
    )
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    return out.reshape(b, t, n, h), lse.reshape(b, n, t)
