"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2/3, Mixtral and Qwen2/3-MoE as variants of
one config (a MoE block replaces the MLP where the config has experts; Qwen3 norms q and k).

embed -> N x (norm -> attention -> residual -> norm -> mlp -> residual) -> norm -> logits.
Each residual add is done by the norm after it (`RMSNorm(x, h)`): a block returns the stream
without its MLP output added, and the next block's first norm (or the final norm) adds it, so
with `norm_kernel` every add and norm is one kernel.
Flax modules are used purely functionally (`Decoder(cfg).apply({"params": p}, ...)`); every
parameter declares logical axes through `layers.declare`. The KV cache is a tuple over layers of
(k, v) arrays [K, B, S, H], passed in and returned, never held by a module. That layout is a page
pool [K, B * S / L, L, H] as it stands, so the paged decode kernel reads it without a copy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxinfer import attention
from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import (
    MLP,
    NormScale,
    RMSNorm,
    apply_rope,
    declare,
    dense,
    rope_inv_freq,
)
from jaxinfer.models.moe import MoE
from jaxinfer.sharding import Parallel, kv_pool_heads, kv_sharding
from pallas_kernels.rms_norm import rms_norm_reference

LayerCache = tuple[Array, Array]  # (k, v), each [K, B, S, H]


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype, parallel: Parallel | None = None
) -> tuple[LayerCache, ...]:
    """A zeroed contiguous cache for `batch` sequences of up to `max_len` tokens, split by kv
    heads over `parallel`'s mesh (each kv head repeated when there are fewer than devices)."""
    parallel = parallel or Parallel()
    shape = (kv_pool_heads(cfg, parallel.size), batch, max_len, cfg.head_dim)  # [K, B, S, H]
    sharding = kv_sharding(parallel)
    zeros = lambda: jnp.zeros(shape, dtype, device=sharding)
    return tuple((zeros(), zeros()) for _ in range(cfg.num_layers))


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    impl: str
    parallel: Parallel = Parallel()
    rope_kernel: bool = False  # paged steps: RoPE and the K/V write as one Pallas kernel
    row_gemv: bool = False  # one token's projections as row reductions (`layers.dense`)
    rope_decode: bool = False  # with rope_kernel, decode steps: the attention in that kernel too
    # with rope_decode: in every decode program, the new token joined after the kv loop
    rope_decode_last: bool = False

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        cache: LayerCache | None,
        prefill: bool,
        paged: attention.PagedMeta | None,
    ):
        c, dt = self.cfg, self.dtype
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        g = c.q_per_kv
        # q, k and v in one matmul: per kv head, its G query heads then its k and its v head
        # (one weight read, one launch; sharding splits the K axis and keeps each group whole).
        # Both weights keep their input axes last, as HF does (`layers.dense`).
        wqkv = declare(self, "qkv", (k, g + 2, h, d), ("kv_heads", "qkv", "head_dim", "embed"), dt)
        wo = declare(self, "o", (d, n, h), ("embed", "heads", "head_dim"), dt)
        qkv = dense(x, wqkv, 1, self.row_gemv)  # [B, T, K, G + 2, H]
        if c.qkv_bias:
            qkv = qkv + declare(
                self,
                "qkv_bias",
                (k, g + 2, h),
                ("kv_heads", "qkv", "head_dim"),
                dt,
                nn.initializers.zeros,
            )
        b, t = x.shape[:2]
        q = qkv[:, :, :, :g].reshape(b, t, n, h)  # query head n uses kv head n // G
        kk, vv = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        qk_norm = None
        if c.qk_norm:  # per head, before RoPE (Qwen3)
            scales = [NormScale(dt, "head_dim", name=f"{x}_norm")(h) for x in "qk"]
            qk_norm = (*scales, c.rms_norm_eps)
        inv_freq = rope_inv_freq(h, c.rope_theta, c.rope_scaling)
        if paged is not None and self.rope_kernel:  # (q/k norm,) RoPE, K/V write: one kernel
            out, cache = attention.rope_paged_attention(
                qkv[0],
                *cache,
                paged,
                positions[0],
                inv_freq,
                qk_norm=qk_norm,
                impl=self.impl,
                fused=self.rope_decode,
                new_token_last=self.rope_decode_last,
            )
            out = out[None]
        else:
            if qk_norm is not None:
                q = rms_norm_reference(q, qk_norm[0], c.rms_norm_eps)[0]
                kk = rms_norm_reference(kk, qk_norm[1], c.rms_norm_eps)[0]
            q, kk = apply_rope(q, positions, inv_freq), apply_rope(kk, positions, inv_freq)
            out, cache = self._attend(q, kk, vv, positions, cache, prefill, paged)
        y = dense(out, wo, 2, self.row_gemv)  # [B, T, D]
        if c.o_bias:
            y = y + declare(self, "o_bias", (d,), ("embed",), dt, nn.initializers.zeros)
        return y, cache

    def _attend(self, q, k, v, positions, cache, prefill, paged):
        mesh = self.parallel.mesh
        if paged is not None:  # one packed row of tokens from many sequences, a page pool
            out, cache = attention.paged_attention(
                q[0], k[0], v[0], *cache, paged, impl=self.impl, mesh=mesh
            )
            return out[None], cache
        return attention.contiguous_attention(
            q, k, v, positions, cache, prefill, impl=self.impl, mesh=mesh
        )


class Block(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    impl: str
    parallel: Parallel = Parallel()
    norm_kernel: bool = False
    rope_kernel: bool = False
    row_gemv: bool = False
    rope_decode: bool = False
    swiglu_kernel: bool = False
    expert_kernel: bool = False
    rope_decode_last: bool = False

    @nn.compact
    def __call__(self, x, delta, positions, cache, prefill, paged, valid=None):
        """x: the residual stream; delta: the previous block's MLP output, not yet added (None
        in the first block); valid [B, T]: the real tokens (others pad a bucket or a batch; an
        MoE block gives them no expert work). Returns (x, this block's MLP output, cache)."""
        eps, kernel = self.cfg.rms_norm_eps, self.norm_kernel
        h, x = RMSNorm(eps, self.dtype, kernel=kernel, name="attn_norm")(x, delta)
        h, cache = Attention(
            self.cfg,
            self.dtype,
            self.impl,
            self.parallel,
            self.rope_kernel,
            self.row_gemv,
            self.rope_decode,
            self.rope_decode_last,
            name="attn",
        )(h, positions, cache, prefill, paged)
        h, x = RMSNorm(eps, self.dtype, kernel=kernel, name="mlp_norm")(x, h)
        if self.cfg.num_experts:
            moe = MoE(
                self.cfg, self.dtype, self.impl, self.parallel, self.expert_kernel, name="moe"
            )
            h = moe(h, valid)
        else:
            h = MLP(self.cfg, self.dtype, swiglu_kernel=self.swiglu_kernel, name="mlp")(h)
        return x, h, cache


def _apply_block(block: Block, params, x, delta, positions, cache, prefill: bool, paged, valid):
    return block.apply({"params": params}, x, delta, positions, cache, prefill, paged, valid)


# Every layer has the same shapes: as a nested jit, a layer is traced once per program, not
# once per layer (tracing 32 unrolled layers was ~1 s of each program's start-up); XLA inlines
# the calls, so the compiled program is the same.
_apply_block_jit = jax.jit(_apply_block, static_argnames=("block", "prefill"))


class Decoder(nn.Module):
    """Token ids -> f32 logits, optionally reading and writing a KV cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    impl: str = "xla"
    parallel: Parallel = Parallel()  # the mesh the params and caches are split over, if any
    norm_kernel: bool = False  # residual adds and norms as Pallas kernels (`RMSNorm`)
    rope_kernel: bool = False  # paged steps: RoPE and the K/V write as one Pallas kernel
    row_gemv: bool = False  # one token's projections as row reductions (`layers.dense`)
    # with rope_kernel, decode steps: RoPE, the K/V write and the attention as one kernel
    rope_decode: bool = False
    swiglu_kernel: bool = False  # steps of 65-128 tokens: gate/up and SiLU x up as one kernel
    expert_kernel: bool = False  # MoE experts: the block-aligned Mosaic GPU kernels (`MoE`)
    # with rope_decode: in every decode program, the new token joined after the kv loop
    rope_decode_last: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: tuple[LayerCache, ...] | None = None,
        prefill: bool = False,
        logits_at: Int[Array, "B"] | None = None,
        paged: attention.PagedMeta | None = None,
        valid: Bool[Array, "B T"] | None = None,
    ):
        """Returns logits [B, T, V] (or [B, 1, V] at `logits_at`) in f32 and the new cache.

        `positions` are absolute; with a cache, row b's tokens are written at slots
        positions[b]. `prefill=True` says the cache was empty before. With `paged`, tokens and
        positions are one packed row [1, T], the cache holds page pools [K, P, L, H], and
        `logits_at` picks B of the T tokens. `valid` marks the real tokens of right-padded
        rows (a paged step's are those before cu_q_lens[-1]): an MoE block routes the others
        to no expert.
        """
        c = self.cfg
        embed = declare(
            self, "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.dtype
        )
        x, delta = jnp.take(embed, tokens, axis=0), None  # [B, T, D]
        if paged is not None:  # a paged step's tokens past cu_q_lens[-1] pad its bucket
            valid = (jnp.arange(tokens.shape[1]) < paged.cu_q_lens[-1])[None]
        new_cache = []
        for i in range(c.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, delta, layer_cache = self._layer(
                i, x, delta, positions, layer_cache, prefill, paged, valid
            )
            new_cache.append(layer_cache)
        if paged is not None and logits_at is not None:
            x, delta = x[0][logits_at][:, None], delta[0][logits_at][:, None]  # [B, 1, D]
        elif logits_at is not None:
            rows = jnp.arange(x.shape[0])
            x, delta = x[rows, logits_at][:, None], delta[rows, logits_at][:, None]  # [B, 1, D]
        x, _ = RMSNorm(c.rms_norm_eps, self.dtype, kernel=self.norm_kernel, name="final_norm")(
            x, delta
        )
        if c.tie_word_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, embed, preferred_element_type=jnp.float32)
        else:
            head = declare(
                self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.dtype
            )
            logits = jnp.einsum("BTD,DV->BTV", x, head, preferred_element_type=jnp.float32)
        return logits, (None if cache is None else tuple(new_cache))

    def _layer(self, i: int, x, delta, positions, cache, prefill, paged, valid):
        """Layer i: declared as a submodule at init (and where intermediates are sown),
        otherwise applied through the one nested jit that every layer shares."""
        args = (
            self.cfg,
            self.dtype,
            self.impl,
            self.parallel,
            self.norm_kernel,
            self.rope_kernel,
            self.row_gemv,
            self.rope_decode,
            self.swiglu_kernel,
            self.expert_kernel,
            self.rope_decode_last,
        )
        if self.is_initializing() or self.is_mutable_collection("intermediates"):
            return Block(*args, name=f"layers_{i}")(
                x, delta, positions, cache, prefill, paged, valid
            )
        params = self.variables["params"][f"layers_{i}"]
        block = Block(*args, parent=None)
        return _apply_block_jit(block, params, x, delta, positions, cache, prefill, paged, valid)
