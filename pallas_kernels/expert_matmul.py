"""MoE experts' matmuls on Hopper over a block-aligned row layout, through Mosaic GPU.

Shapes (jaxinfer's letter table): R (token, expert) pairs, E experts, D model width, F an
expert's intermediate width, P rows of the aligned layout, NB = P / 128 blocks.

The grouped matmul (`grouped_matmul.py`, Pallas Triton) reads rows sorted by expert and packed
tight, so a work item starts anywhere and masks its rows. Here each expert's rows start at a
multiple of 128 instead (`aligned_layout`): every 128-row block belongs to one expert, or to
none past the last one. A CTA (block, column tile[, K split]) is then the decode batch's matmul
of `decode_matmul.py` on whole tiles: one memory warpgroup streams x's and the expert's weight
tiles through a ring of TMA copies, two compute warpgroups run wgmma, and the output leaves by
TMA with no row mask. The gate/up form stores SiLU(gate) * up (`decode_matmul.decode_swiglu`'s
epilogue), so the [R, 2F] product never reaches HBM, and down reads it in the same layout.

Blocks are the grid's fastest axis: the blocks of one expert run side by side on the same
column tile, so an expert with several blocks reads each weight tile from HBM about once (L2).

What the layout costs: each expert's last block is padded to 128 rows (zero rows of x, whose
products are zero and never read), and the blocks past the last expert's do nothing; their
output rows are left unwritten and must not be read (`dest` never points there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import decode_matmul as dm
from pallas_kernels.common import mosaic_gpu_interpreter

ROWS = dm.ROWS  # rows of a block: the kernel's two compute warpgroups of 64


class ExpertLayout(NamedTuple):
    """Where each pair goes in the aligned layout.

    dest: int32 [R], the pair's row in the layout; P (one past the last row) for a pair routed
      to no expert here (expert index outside [0, E)).
    block_expert: int32 [NB], each block's expert; E for a block past the last expert's rows.
    """

    dest: jax.Array
    block_expert: jax.Array


def num_blocks(pairs: int, num_experts: int) -> int:
    """Blocks the layout of `pairs` rows over `num_experts` experts may need: each expert's rows
    round up to whole blocks, and ceil(a) + ceil(b) <= ceil(a + b) + 1."""
    return pl.cdiv(pairs, ROWS) + num_experts - 1


def aligned_layout(expert: jax.Array, num_experts: int) -> ExpertLayout:
    """The layout of the pairs whose experts are `expert` int32 [R] (values outside [0, E) go
    nowhere): expert e's pairs, in their order, fill rows from block_start[e] * 128 on."""
    r = expert.shape[0]
    nb = num_blocks(r, num_experts)
    mine = (expert >= 0) & (expert < num_experts)
    flat = jnp.where(mine, expert, num_experts).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]; others dropped
    blocks = (sizes + ROWS - 1) // ROWS  # [E]
    block_end = jnp.cumsum(blocks)  # [E], inclusive
    first_row = (block_end - blocks) * ROWS  # [E]
    order = jnp.argsort(flat, stable=True)  # [R] pairs by expert, others last
    by_expert = flat[order]
    e = jnp.minimum(by_expert, num_experts - 1)
    rank = jnp.arange(r, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[e]  # within its expert
    dest_sorted = jnp.where(by_expert < num_experts, first_row[e] + rank, nb * ROWS)
    dest = jnp.zeros((r,), jnp.int32).at[order].set(dest_sorted)
    # compare_all: one fused compare-and-sum (the default is a while loop of small kernels).
    block_expert = jnp.searchsorted(
        block_end, jnp.arange(nb, dtype=jnp.int32), side="right", method="compare_all"
    ).astype(jnp.int32)
    return ExpertLayout(dest=dest, block_expert=block_expert)


def to_layout(x: jax.Array, token: jax.Array, layout: ExpertLayout) -> jax.Array:
    """x [T, D] -> [P, D]: row dest[p] is x[token[p]]; the other rows are 0."""
    p = layout.block_expert.shape[0] * ROWS
    src = jnp.full((p,), x.shape[0], jnp.int32).at[layout.dest].set(token, mode="drop")
    return jnp.take(x, src, axis=0, mode="fill", fill_value=0)


def from_layout(y: jax.Array, layout: ExpertLayout) -> jax.Array:
    """y [P, N] -> [R, N]: each pair's row; 0 for a pair routed to no expert here."""
    return jnp.take(y, layout.dest, axis=0, mode="fill", fill_value=0)


# The tiles of both kernels (down may split K, `default_configs`).
TILES = dm.DecodeMatmulConfig(tile_n=128, tile_k=64, stages=4)


def default_configs(
    pairs: int, num_experts: int, f: int
) -> tuple[dm.DecodeMatmulConfig, dm.DecodeMatmulConfig]:
    """Tiles of the gate/up (SwiGLU) and the down kernels for `pairs` rows over `num_experts`
    experts of width F. Down has few output tiles (D / 128 a block): while few blocks have
    rows its K is split, by a count that divides F's steps."""
    busy_blocks = min(pl.cdiv(pairs, ROWS) + num_experts - 1, pairs)
    want = 4 if busy_blocks <= 2 else 2 if busy_blocks <= 4 else 1
    splits = next(s for s in (want, 2, 1) if s <= want and (f // TILES.tile_k) % s == 0)
    return TILES, dataclasses.replace(TILES, splits=splits)


def why_not(k: int, n: int, dtype, cfg: dm.DecodeMatmulConfig, swiglu: bool = False) -> str | None:
    """Why `expert_matmul` (or with `swiglu`, `expert_swiglu`) can't take weights [E, K, N]
    ([E, K, 2, N]) in this dtype with this config (None when it can)."""
    if swiglu and cfg.splits != 1:
        return f"the SwiGLU form can't split K: {cfg}"
    if cfg.cluster != 1 or cfg.pdl:
        return f"neither clusters nor pdl: {cfg}"
    return dm.why_not(ROWS, k, n, dtype, cfg, parts=2 if swiglu else 1)


def _kernel(expert_ref, x_ref, w_ref, out_ref, scoped, *, cfg, k_steps, num_experts, swiglu):
    """One CTA: block b's 128 rows, one column tile, one K split; nothing for a block of no
    expert. expert_ref int32 [NB]; x_ref [P, K]; w_ref [E, K, N or 2N]; out_ref [P, N], or
    [splits, P, N] float32 (GMEM)."""
    block = lax.axis_index("m")
    e = expert_ref[block]
    rows = pl.ds(block * ROWS, ROWS)

    @pl.when(e < num_experts)
    def _():
        out = out_ref.at[rows] if cfg.splits == 1 else out_ref.at[:, rows]
        dm._kernel(
            x_ref.at[rows],
            w_ref.at[e],
            out,
            scoped,
            cfg=cfg,
            w_nk=False,
            k_steps=k_steps,
            swiglu=swiglu,
        )


@functools.partial(jax.jit, static_argnames=("config", "interpret", "swiglu"))
def _expert_matmul(block_expert, x, w, *, config, interpret: bool, swiglu: bool):
    """x [P, K] times expert w [E, K, N] (swiglu: [E, K, 2N], gate then up) per block."""
    plgpu = dm._plgpu()
    cfg = config
    parts = 2 if swiglu else 1
    num_experts, k, wide = w.shape
    n = wide // parts
    p = x.shape[0]
    k_steps = k // (cfg.tile_k * cfg.splits)
    out_dtype = x.dtype if cfg.splits == 1 else jnp.float32
    out_shape = (p, n) if cfg.splits == 1 else (cfg.splits, p, n)
    kernel = functools.partial(
        _kernel, cfg=cfg, k_steps=k_steps, num_experts=num_experts, swiglu=swiglu
    )

    def entry(expert_ref, x_ref, w_ref, out_ref):
        pl.run_scoped(
            lambda *scoped: kernel(expert_ref, x_ref, w_ref, out_ref, scoped),
            *dm._scratch(cfg, x.dtype, w.dtype, out_dtype, parts, w_nk=False),
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        # Blocks fastest (CUDA's x): an expert's blocks share each weight tile in L2.
        grid=(p // ROWS, n // cfg.tile_n, cfg.splits),
        grid_names=("m", "n", "k"),
        num_threads=3,
        thread_name="wg",
        interpret=mosaic_gpu_interpreter() if interpret else False,
    )(block_expert, x, w)
    if cfg.splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out


def _check(name, block_expert, x, w, cfg, swiglu, interpret):
    if x.ndim != 2 or x.shape[0] != block_expert.shape[0] * ROWS:
        raise ValueError(
            f"{name}: x {x.shape} must be [P, K] with P = 128 x {block_expert.shape[0]} blocks"
        )
    k = x.shape[1]
    want = (k, 2) if swiglu else (k,)
    if w.ndim != 3 + swiglu or w.shape[1 : 1 + len(want)] != want:
        form = "[E, K, 2, F]" if swiglu else "[E, K, N]"
        raise ValueError(f"{name}: w {w.shape} must be {form} with K = {k}, x's columns")
    if x.dtype != w.dtype:
        raise ValueError(f"{name}: dtypes differ: x {x.dtype}, w {w.dtype}")
    if reason := why_not(k, w.shape[-1], x.dtype, cfg, swiglu):
        raise ValueError(f"{name} can't take this call: {reason}")
    return dm._interpret_or_refuse(name, interpret, False, cfg)


def expert_matmul(
    block_expert,
    x,
    w,
    *,
    config: dm.DecodeMatmulConfig | None = None,
    interpret: bool | None = None,
):
    """out[b] = x[b] @ w[block_expert[b]] for each 128-row block b of x [P, K] (an
    `aligned_layout`), w [E, K, N] bf16 -> [P, N]; blocks of no expert (>= E) are left
    unwritten. Hopper GPUs, or JAX's Mosaic GPU interpreter on the CPU (`interpret`)."""
    cfg = config or TILES
    interpret = _check("expert_matmul", block_expert, x, w, cfg, False, interpret)
    return _expert_matmul(block_expert, x, w, config=cfg, interpret=interpret, swiglu=False)


def expert_swiglu(
    block_expert,
    x,
    w_gate_up,
    *,
    config: dm.DecodeMatmulConfig | None = None,
    interpret: bool | None = None,
):
    """silu(x[b] @ gate) * (x[b] @ up), gate and up of expert block_expert[b], for each block
    b of x [P, K]; w_gate_up [E, K, 2, F] bf16 -> [P, F]. gate and up are rounded to bf16
    before silu, as the unfused form stores them."""
    cfg = config or TILES
    interpret = _check("expert_swiglu", block_expert, x, w_gate_up, cfg, True, interpret)
    e, k, _, f = w_gate_up.shape
    w = w_gate_up.reshape(e, k, 2 * f)  # gate's columns, then up's
    return _expert_matmul(block_expert, x, w, config=cfg, interpret=interpret, swiglu=True)
