"""Flash attention (prefill) for Hopper, through Pallas's Mosaic GPU backend.

The batched form of ``flash_attention`` (q [B, T, N, H], k/v [B, S, K, H],
causal or not, T <= S with queries at the last T key positions, GQA,
optional lse) as a warp-specialised kernel in the FlashAttention-3 style,
which the Triton lowering cannot express: on an H100 the Triton kernel
reached 0.63-0.80 of cuDNN's TFLOP/s (NOTES.md).

One CTA = (query head, tile of 2 * block_q query rows, batch row), three
warpgroups:
  * two compute warpgroups, each owning block_q rows: S = Q K^T on the
    tensor cores (wgmma, operands in shared memory), the online softmax in
    registers, then O += P V (P from registers);
  * one memory warpgroup: TMA copies of the K and V tiles into a ring of
    ``stages`` shared-memory slots, refilled as the compute warpgroups
    release them (one "consumed" barrier per slot and tensor).
A schedule barrier makes the two compute warpgroups take turns on the
tensor cores, so one's softmax overlaps the other's matmuls.

Causal tiles walk the kv blocks in two stretches: blocks every row sees in
full (no mask arithmetic), then the blocks on the diagonal (masked). The
warpgroup holding the earlier rows runs out of blocks first and keeps
releasing the ring's slots and the schedule barrier until the other one is
done. Tiles run heaviest first.

Shapes the wrapper pads: T to a multiple of 2 * block_q (padded query rows
are computed and dropped), S to a multiple of block_kv (padded keys are
masked; under the causal mask they are past every real query anyway).
Needs: bf16/f16, H a multiple of 64 up to 256, a Hopper GPU. The packed
(cu_seqlens) form, sliding windows, f32 and other head dims stay on the
Triton kernel (``flash_attention`` picks).

Written after reading JAX's ``pallas/ops/gpu/attention_mgpu.py`` (its
barrier protocol); this one adds the softmax scale, bf16, GQA by index,
T < S, padding of any length, heaviest-first tiles and the lse output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import LOG2_E, SM90_SMEM_LIMIT


def _plgpu():
    # Imported on use: the Mosaic GPU module pulls in CUDA-only pieces that a
    # CPU-only install may lack.
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


@dataclasses.dataclass(frozen=True)
class MgpuFlashConfig:
    """Tiles of the Mosaic GPU kernel.

    Attributes:
      block_q: query rows per compute warpgroup (multiple of 64); a CTA holds
        2 * block_q rows.
      block_kv: key rows per step (multiple of 64).
      stages: K/V ring slots in shared memory (>= 2).
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            if getattr(self, name) % 64 or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 64")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")

    @classmethod
    def default(cls, head_dim: int) -> "MgpuFlashConfig":
        # 128-row K/V tiles were 1.04-1.16x faster than 64 on an H100 (JAX's
        # kernel, same structure); at H=256 two 128-row slots of K and V would
        # not fit beside Q in shared memory.
        return cls(block_kv=64 if head_dim > 128 else 128)


# Shared memory per CTA on sm_90 (227 KiB), and what barriers and alignment
# took beyond the buffers in a measured compile (2,680 bytes, H100).
SMEM_LIMIT = SM90_SMEM_LIMIT
SMEM_OVERHEAD = 3072


def smem_bytes(cfg: MgpuFlashConfig, head_dim: int, itemsize: int, with_lse: bool) -> int:
    """Shared memory the kernel asks for: Q/O tiles, the K/V ring, lse."""
    buffers = (2 * cfg.block_q + 2 * cfg.stages * cfg.block_kv) * head_dim * itemsize
    return buffers + (2 * cfg.block_q * 4 if with_lse else 0) + SMEM_OVERHEAD


def supported(q, *, packed: bool, window, interpret: bool) -> str | None:
    """Why this kernel can't take the call (None when it can)."""
    if interpret:
        return "interpret mode (Mosaic GPU kernels run on the GPU only)"
    if packed:
        return "packed (cu_seqlens) form"
    if window is not None:
        return "sliding window"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype}"
    if q.shape[-1] % 64 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (needs a multiple of 64, <= 256)"
    return None


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    scoped,
    *,
    cfg,
    causal,
    offset,
    seq_k,
    num_kv_blocks,
    num_q_tiles,
    group,
    qk_scale,
):
    """One CTA: rows [tile * 2 * bq, +2 * bq) of one query head.

    q_ref/out_ref: [B, Tp, N, H] (GMEM); k_ref/v_ref: [B, Sp, K, H];
    lse_ref: [B, N, Tp] f32 or None. Query row i sits at key position
    i + offset (causal).
    """
    plgpu = _plgpu()
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    (qo_smem2, k_smem, v_smem, lse_smem2), loaded, consumed, schedule = scoped
    k_loaded, v_loaded, q_loaded = loaded
    k_consumed, v_consumed = consumed
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("q_seq")
    if causal:  # heaviest tiles first: the short ones fill the tail
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")

    def kv_blocks_for(row_end):  # kv blocks holding the keys rows < row_end see
        if not causal:  # Python ints: a constant bound lowers to a literal that
            return num_kv_blocks  # Mosaic GPU (jax 0.11) rejected as an array
        return jnp.minimum(pl.cdiv(row_end + offset, jnp.int32(bkv)), num_kv_blocks)

    # Both warpgroups' rows: the memory warpgroup streams this many blocks.
    tile_blocks = kv_blocks_for((tile + 1) * (2 * bq))

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        row0 = tile * (2 * bq) + wg * bq
        kv_blocks = kv_blocks_for(row0 + bq)
        if causal:  # blocks every row of this warpgroup sees in full
            full_blocks = jnp.minimum(lax.div(row0 + offset + 1, jnp.int32(bkv)), kv_blocks)
        else:  # all but a padded last block
            full_blocks = seq_k // bkv

        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, bq), head], qo_smem, q_loaded.at[wg])
        plgpu.barrier_wait(q_loaded.at[wg])
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(kv_blocks > 0)
        def _():
            plgpu.barrier_wait(k_loaded.at[0])

        pl.when(wg == 1)(take_turn)

        def step(i, carry, masked):
            acc, m, l = carry
            slot = lax.rem(i, jnp.int32(stages))

            def qk_into(acc_ref):
                # transpose_ref: what ran on the GPU (jax 0.11 deprecates it for
                # ref.transpose, which lowers too but has not run there yet).
                plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(qk_into, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                cols = (
                    plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    + i * bkv
                )
                if causal:
                    visible = cols <= rows + (row0 + offset)
                else:
                    visible = cols < seq_k
                s = jnp.where(visible, s, -jnp.inf)
            # Every row sees a key in its first block (causal: the block of its
            # own position; otherwise block 0), so m is finite from then on.
            # m in log2 units of the scaled logits: one FMA per logit below.
            m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha
            p_in = p.astype(dtype)

            def softmax_done():
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(schedule)  # the tensor cores are ours again

            # The order of the row sum and the barriers changes the schedule
            # ptxas makes (JAX's kernel measured it): sum first up to H=128.
            if head_dim <= 128:
                l = l + p.sum(axis=1)
                acc, l, m_new, p_in = lax.optimization_barrier((acc, l, m_new, p_in))
                softmax_done()
            else:
                softmax_done()
                l = l + p.sum(axis=1)

            def pv_into(acc_ref):
                plgpu.wgmma(acc_ref, p_in, v_smem.at[slot])
                nxt = i + 1

                @pl.when(nxt < kv_blocks)
                def _():
                    plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(stages))])

            acc = pl.run_state(pv_into)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(0, full_blocks, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(
            full_blocks, kv_blocks, functools.partial(step, masked=True), carry
        )

        def release(i, _):  # blocks only the other warpgroup needs
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_arrive(k_consumed.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])
            take_turn()
            take_turn()

        if causal:
            lax.fori_loop(kv_blocks, tile_blocks, release, None)
        pl.when(wg == 0)(take_turn)

        acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        if lse_smem2 is not None:
            # m is in log2 units of the scaled logits; lse is natural-log.
            lse_smem2.at[wg][...] = m * (1.0 / LOG2_E) + jnp.log(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(row0, bq), head])
        if lse_smem2 is not None:
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[batch, head, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.int32(group))

        def load(i, slot):
            at = (batch, pl.ds(i * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_loaded.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_loaded.at[slot])

        for i in range(stages):  # stages <= num_kv_blocks (the wrapper clips)
            load(i, i)

        @pl.loop(0, tile_blocks - stages)
        def _(i):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            load(i + stages, slot)


def _pad_seq(x, length: int):
    """x [B, L, heads, H] padded with zeros to [B, length, heads, H]."""
    extra = length - x.shape[1]
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


def flash_attention_mgpu(
    q,
    k,
    v,
    *,
    causal: bool,
    sm_scale: float,
    return_lse: bool = False,
    config: MgpuFlashConfig | None = None,
):
    """q [B, T, N, H], k/v [B, S, K, H] -> out [B, T, N, H] (and lse [B, N, T]).

    Same contract as the batched ``flash_attention``; the caller has checked
    the shapes (``flash_attention._check_qkv``) and ``supported``.
    """
    plgpu = _plgpu()
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    cfg = config or MgpuFlashConfig.default(head_dim)
    bq, bkv = cfg.block_q, cfg.block_kv
    need = smem_bytes(cfg, head_dim, q.dtype.itemsize, return_lse)
    if need > SMEM_LIMIT:
        raise ValueError(
            f"{cfg} needs about {need} bytes of shared memory at "
            f"H={head_dim} (lse: {return_lse}); sm_90 has "
            f"{SMEM_LIMIT}: use fewer stages or smaller tiles"
        )
    num_q_tiles = pl.cdiv(seq_q, 2 * bq)
    # At least two kv blocks: the ring has two slots, and the memory warpgroup
    # fills every slot before the first one is consumed.
    num_kv_blocks = max(pl.cdiv(seq_k, bkv), 2)
    cfg = dataclasses.replace(cfg, stages=min(cfg.stages, num_kv_blocks))
    qp = _pad_seq(q, num_q_tiles * 2 * bq)
    kp, vp = _pad_seq(k, num_kv_blocks * bkv), _pad_seq(v, num_kv_blocks * bkv)
    kernel = functools.partial(
        _kernel,
        cfg=cfg,
        causal=causal,
        offset=seq_k - seq_q,
        seq_k=seq_k,
        num_kv_blocks=num_kv_blocks,
        num_q_tiles=num_q_tiles,
        group=num_heads // num_kv_heads,
        qk_scale=sm_scale * LOG2_E,
    )

    def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):
        # 128-byte swizzled (8, 64) tiles: the layout wgmma reads conflict-free.
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((2, bq, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((cfg.stages, bkv, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((cfg.stages, bkv, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((2, bq), jnp.float32) if return_lse else None,
        ]
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
            smem,
            (
                plgpu.Barrier(num_barriers=cfg.stages),  # K slot loaded
                plgpu.Barrier(num_barriers=cfg.stages),  # V slot loaded
                plgpu.Barrier(num_barriers=2),
            ),  # each warpgroup's Q
            (plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages),) * 2,
            plgpu.Barrier(num_arrivals=2),  # schedule (turns)
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct(qp.shape, q.dtype), None]
    if return_lse:  # T minor: 1D TMA stores of block_q values
        out_type[1] = jax.ShapeDtypeStruct((batch, num_heads, qp.shape[1]), jnp.float32)
    out, lse = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(num_heads, num_q_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(qp, kp, vp)
    out = out[:, :seq_q]
    if return_lse:
        return out, lse[:, :, :seq_q]
    return out, None
