"""`Model` (config + params + tokenizer) and the cache-free `forward`."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxinfer import attention
from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import Decoder
from jaxinfer.sharding import Parallel
from pallas_kernels.common import on_hopper
from pallas_kernels.rope_write import supported as rope_write_supported

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def default_dtype() -> jnp.dtype:
    """bfloat16 on an accelerator; float32 on a CPU, where XLA widens 16-bit math to f32 anyway
    (so f32 is as fast, and exact) and copies a 16-bit KV pool at every write."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def resolve_dtype(dtype) -> jnp.dtype:
    """A supported dtype from a name or a dtype; None: `default_dtype()` of this device."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"dtype {dt} is not one of {sorted(DTYPES)}")
    return dt


@dataclasses.dataclass
class Model:
    """A loaded model. `params` is the Flax params pytree of `Decoder(config, dtype)`, placed
    on `parallel.mesh` when it has one (`sharding.place_params`)."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    dtype: jnp.dtype = jnp.bfloat16
    impl: str = dataclasses.field(default_factory=attention.default_impl)
    parallel: Parallel = dataclasses.field(default_factory=Parallel)

    def decoder(self, impl: str | None = None) -> Decoder:
        impl = attention.check_impl(self.impl if impl is None else impl)  # "" is no impl
        kernels = fused_kernels(self.config, self.dtype, impl, self.parallel)
        return Decoder(self.config, self.dtype, impl, self.parallel, **kernels)

    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel.size


def fused_kernels(cfg: ModelConfig, dtype, impl: str, parallel: Parallel) -> dict[str, bool]:
    """Which of the decoder's fused kernels run (`Decoder` fields): the residual add + RMSNorm
    (`norm_kernel`) and, in paged steps, RoPE + the K/V write (`rope_kernel`, for a head dim it
    takes; with Qwen3's q/k norms in it, on request), both Pallas kernels with the Pallas
    attention on one GPU (over a mesh the jnp forms, which XLA splits like the rest of the
    program); in decode steps, with `rope_kernel` (and so with Qwen3's norms on request too),
    the attention in that same kernel (`rope_decode`, `paged_attention.rope_paged_decode`; in
    every decode program with the new token joined after the kv loop, `rope_decode_last`, only
    when asked); and one token's projections as XLA row reductions (`row_gemv`,
    `layers.dense`), on any GPU; with the Pallas attention on one Hopper GPU in bf16, steps of
    65-128 tokens run gate/up and SiLU x up as one Mosaic GPU kernel (`swiglu_kernel`,
    `layers.MLP`); MoE experts run the block-aligned Mosaic GPU kernels (`expert_kernel`,
    `moe.MoE`) only when asked. $JAXINFER_NORM_KERNEL / $JAXINFER_ROPE_KERNEL /
    $JAXINFER_ROPE_DECODE / $JAXINFER_ROPE_DECODE_LAST / $JAXINFER_ROW_GEMV /
    $JAXINFER_SWIGLU_KERNEL / $JAXINFER_EXPERT_KERNEL = 0 or 1 decide instead (for measuring
    one against the other). Measured on an H200: bench/README."""
    gpu = jax.default_backend() == "gpu"
    pallas_alone = impl == "pallas" and parallel.mesh is None and gpu

    def choice(variable: str, auto: bool) -> bool:
        forced = os.environ.get(variable)
        return forced == "1" if forced in ("0", "1") else auto

    rope_fits = rope_write_supported(cfg.head_dim, dtype)
    # With Qwen3's q/k norms inside it, on request only until it has run on a GPU (bench/README)
    rope_kernel = rope_fits and choice("JAXINFER_ROPE_KERNEL", pallas_alone and not cfg.qk_norm)
    # follows rope_kernel: with Qwen3's q/k norms, on request as that kernel is
    rope_decode = rope_kernel and choice("JAXINFER_ROPE_DECODE", pallas_alone)
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    return dict(
        norm_kernel=choice("JAXINFER_NORM_KERNEL", pallas_alone),
        rope_kernel=rope_kernel,
        row_gemv=choice("JAXINFER_ROW_GEMV", gpu),
        rope_decode=rope_decode,
        # Opt-in until timed on a GPU (pallas_kernels/NOTES.md, "The new token last")
        rope_decode_last=rope_decode and choice("JAXINFER_ROPE_DECODE_LAST", False),
        swiglu_kernel=bf16 and choice("JAXINFER_SWIGLU_KERNEL", pallas_alone and on_hopper()),
        # Opt-in: on an H200 it ran a Mixtral layer at 0.82-1.04x the grouped matmul's speed
        # (bench/README, "Block-aligned expert kernels").
        expert_kernel=bf16 and bool(cfg.num_experts) and choice("JAXINFER_EXPERT_KERNEL", False),
    )


def abstract_params(cfg: ModelConfig, dtype) -> tuple[Any, Any]:
    """Shapes/dtypes of the params (ShapeDtypeStructs) and their logical axis names, no memory used."""
    dec = Decoder(cfg, resolve_dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: dec.init(jax.random.key(0), tokens, tokens))["params"]
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(cfg: ModelConfig, dtype="bfloat16", seed: int = 0) -> Any:
    """Random params (normal, std 0.02; norms at 1), initialised on the default device.

    Run op by op rather than as one jitted program: XLA took ~47 s to compile the one program
    of a Llama-3-8B's init on an H200, while each op here compiles in milliseconds, once per
    distinct shape."""
    dec = Decoder(cfg, resolve_dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(dec.init(jax.random.key(seed), tokens, tokens)["params"])


@functools.partial(jax.jit, static_argnames=("decoder",))
def _forward(decoder: Decoder, params, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = decoder.apply({"params": params}, tokens, positions)
    return logits


def forward(model: Model, token_ids, *, impl: str | None = None) -> Float[Array, "B T V"]:
    """A plain causal forward with no cache. token_ids: int32 [B, T] -> f32 logits [B, T, V]."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"token_ids must be a non-empty [B, T] array, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {tokens.dtype}")
    check_token_range(tokens, model.config)
    if tokens.shape[1] > model.config.max_position_embeddings:
        raise ValueError(
            f"{tokens.shape[1]} tokens exceed the context of {model.config.max_position_embeddings}"
        )
    return _forward(model.decoder(impl), model.params, jnp.asarray(tokens, jnp.int32))


def check_token_range(tokens: np.ndarray, cfg: ModelConfig) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
