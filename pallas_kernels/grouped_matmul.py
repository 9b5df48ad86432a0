"""Grouped (ragged) matmul for MoE expert layers: one weight matrix per group.

Shapes (jaxinfer's letter table): R rows (tokens x chosen experts, sorted by
expert), I contraction width, O output width, E groups (experts).

    out[r] = lhs[r] @ rhs[g(r)]   for rows r < sum(group_sizes)
    out[r] = 0                    for padding rows past sum(group_sizes)

where group g owns rows ``sum(group_sizes[:g]) .. + group_sizes[g]``.

Sparse by construction. The rows [0, R) are cut into E + 1 segments (the E
groups, then the padding segment); each segment is cut into row tiles of up to
block_m rows that start at the segment's first row (not at multiples of
block_m), and the grid walks these *work items* times the O tiles. So a group
of up to block_m rows is one item wherever it starts, and its weight panel is
read once per O tile: with tiles at fixed boundaries, a group straddling one
was visited twice (measured 1.32x the weight-byte floor at 64 decode rows on
an H100, see NOTES.md). Each item loads and stores only its own rows (row
mask). A group with no rows gets no work item, so its weights are never read:
a decode step reads only the experts that got tokens. Padding items store
zeros without reading any weight, so every output element is written by the
kernel (no extra pass).

Items number at most ``cdiv(R, block_m) + E``: the work list has that static
length; items past the real count are inactive (empty row range, no K steps,
a fully masked store).

File layout: metadata (jnp) -> kernel -> pallas_call wrapper (tile sizes in
GroupedMatmulConfig) -> validated public entry ``grouped_matmul`` (decides
the config and interpret mode, then calls its jitted part with them static) ->
``grouped_matmul_reference`` (lax.ragged_dot) and
``grouped_matmul_dense_loop`` (a Python loop over experts, for tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.common import SUPPORTED_DTYPES, check_tiles


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tile sizes and launch parameters of the grouped-matmul kernel.

    Attributes:
      block_m: rows of a work item's row tile (power of two, >= 16).
      tail_m: 0, or the rows (power of two, >= 16) of a second row tile that an
        item of more than block_m rows also multiplies, in the same K loop and
        by the same weight tiles: a group of up to block_m + tail_m rows is then
        one item, so a group a little over block_m rows reads its weights once.
        Longer groups are cut into block_m-row items as without it.
      block_n: output columns per program (power of two, >= 16).
      block_k: contraction step of the in-kernel K loop (power of two, >= 16).
      num_warps: warps per program (Triton backend).
      num_stages: software-pipelining depth of the K loop (Triton backend).
      group_m: work items per launch-order group (L2 swizzle, see _gmm_call).
      split_k: programs sharing one output tile's K range (f32 partials summed
        after the kernel). Opt-in, see choose_split_k.
      backend: "triton" (Pallas Triton lowering). Mosaic GPU is not wired yet.
    """

    block_m: int = 64
    tail_m: int = 0
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1
    backend: str = "triton"

    def __post_init__(self):
        check_tiles(self, ("block_m", "block_n", "block_k"))
        if self.tail_m and (self.tail_m < 16 or self.tail_m & (self.tail_m - 1)):
            raise ValueError(f"tail_m={self.tail_m} must be 0 or a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if self.num_warps < 1 or self.num_stages < 1 or self.group_m < 1:
            raise ValueError(
                f"num_warps={self.num_warps}, num_stages={self.num_stages} "
                f"and group_m={self.group_m} must be >= 1"
            )

    @classmethod
    def default(
        cls, m: int, num_groups: int, dtype, k_dim: int | None = None, n_dim: int | None = None
    ) -> "GroupedMatmulConfig":
        """Row tile by the rows per group: 16 rows up to 8 a group, 64 rows up to 64, else 128.

        Tiles from the H100 and H200 sweeps in NOTES.md. k_dim / n_dim (optional)
        pick the 16-row tiles' K step: a long, narrow weight (Mixtral's down
        projection, I 14336 x O 4096) has few output tiles to spread over the SMs,
        and a 128-deep K step keeps more bytes in flight per program (1.1x at
        batch 1 on an H100). No tail tile by default: on a random-weight
        Mixtral's routing at 500 decode rows it was 1% slower summed over the 32
        layers, though ~10% faster on balanced routing (NOTES.md, "A tail row
        tile").
        """
        rows_per_group = max(1, -(-m // max(num_groups, 1)))
        block_m = min(128, max(16, pl.next_power_of_2(rows_per_group)))
        if jnp.dtype(dtype) == jnp.float32:
            return cls(block_m=min(block_m, 64), block_n=64, block_k=32, num_warps=4, num_stages=2)
        # bn 256: 1.15-1.3x bn 128 from 2048 rows up (H100); at 1024 rows as fast
        # (H100) or 1.04-1.1x (H200, NOTES.md).
        if block_m >= 128:
            return cls(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
        if rows_per_group > 8:
            # 9-64 rows a group: one 64-row tile, 3 stages. On an H200 4-11% faster than the
            # group-sized tile, on uniform routing and on a random-weight Mixtral's skewed one:
            # fewer items for an expert that gets more than its share (NOTES.md).
            return cls(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
        long_k = k_dim is not None and n_dim is not None and k_dim >= 2 * n_dim
        return cls(
            block_m=block_m, block_n=128, block_k=128 if long_k else 64, num_warps=4, num_stages=4
        )


# ----------------------------------------------------------------------------
# Group metadata (work list), in jnp.
# ----------------------------------------------------------------------------
class WorkList(NamedTuple):
    """Work items, each consecutive rows of one segment; all int32 [items].

    group: the group whose weights the item multiplies; E for padding items
      (store zeros) and for inactive items (row range empty).
    lo, hi: the item's rows are [lo, hi), hi - lo <= block_m (+ tail_m for a segment
      of at most block_m + tail_m rows).
    """

    group: jax.Array
    lo: jax.Array
    hi: jax.Array


def make_work_list(group_sizes, m: int, block_m: int, tail_m: int = 0) -> WorkList:
    """Builds the work items from ``group_sizes`` [E]: each segment (the E
    groups, then the padding rows [sum, R)) cut into row tiles of block_m that
    start at the segment's first row, so a group of up to block_m rows is one
    item and its weights are read once per O tile, wherever it starts. With
    tail_m, a segment of up to block_m + tail_m rows is one item too (the
    kernel's second row tile takes its last rows); longer ones are still cut
    into block_m rows, so only the group a little over one tile pays for the
    tail. Empty segments get no item. Static length cdiv(R, block_m) + E,
    which bounds the items over the E + 1 segments. Group ends past R are
    clipped to R.
    """
    num_groups = group_sizes.shape[0]
    num_items = pl.cdiv(m, block_m) + num_groups
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])  # [E + 1]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    rows = ends - starts
    one = rows <= block_m + tail_m  # [E + 1]: the whole segment in one item (or none)
    count = jnp.where(one, jnp.minimum(rows, 1), (rows + block_m - 1) // block_m)
    height = jnp.where(one, block_m + tail_m, block_m)  # [E + 1] rows an item may hold
    cum = jnp.cumsum(count)  # inclusive

    w = jnp.arange(num_items, dtype=jnp.int32)
    active = w < cum[-1]
    # compare_all: one fused compare-and-sum; the default "scan" method is a
    # while loop, i.e. several tiny kernel launches per call on a GPU.
    seg = jnp.searchsorted(cum, w, side="right", method="compare_all")
    seg = jnp.minimum(seg, num_groups)
    seg = seg.astype(jnp.int32)
    lo = starts[seg] + (w - (cum[seg] - count[seg])) * height[seg]
    hi = jnp.minimum(lo + height[seg], ends[seg])
    return WorkList(
        group=jnp.where(active, seg, num_groups),
        lo=jnp.where(active, lo, 0),
        hi=jnp.where(active, hi, 0),
    )


# ----------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------
def _swizzle(pid, num_items: int, num_n_tiles: int, group_m: int):
    """Launch order -> (work item, O tile): groups of ``group_m`` items sweep
    the O tiles together, items fastest, so the programs in flight share a few
    lhs row tiles and a few weight panels in L2 (Triton's GROUP_M ordering)."""
    per_group = group_m * num_n_tiles
    first = (pid // per_group) * group_m
    size = jnp.minimum(num_items - first, group_m)
    local = pid % per_group
    return first + local % size, local // size


def _gmm_kernel(
    group_ref,
    lo_ref,
    hi_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    num_groups,
    k_dim,
    n_dim,
    block_m,
    tail_m,
    block_n,
    block_k,
    group_m,
    split_k,
    dot_precision,
):
    # group/lo/hi_ref: [items]; lhs_ref: [R, I]; rhs_ref: [E * I, O];
    # out_ref: [R, O], or [split_k * R, O] f32 partials when split_k > 1.
    # One program = (contraction split, work item, O tile).
    num_items, num_n_tiles = group_ref.shape[0], pl.cdiv(n_dim, block_n)
    per_split = num_items * num_n_tiles
    pid = pl.program_id(0)
    split = pid // per_split
    w, ni = _swizzle(pid % per_split, num_items, num_n_tiles, group_m)
    g, r0, hi = group_ref[w], lo_ref[w], hi_ref[w]
    n0 = ni * block_n
    cols_ok = None
    if n_dim % block_n:
        cols_ok = (n0 + jnp.arange(block_n, dtype=jnp.int32)) < n_dim
    k_tail = k_dim % block_k != 0

    def rows_ok(start, height):  # [height]: this item's rows only (they start at r0)
        return (start + jnp.arange(height, dtype=jnp.int32)) < hi

    def step(ki, accs, tiles):
        k0 = ki * block_k
        rhs_mask = cols_ok[None, :] if cols_ok is not None else None
        k_ok = None
        if k_tail:
            k_ok = (k0 + jnp.arange(block_k, dtype=jnp.int32)) < k_dim
            rhs_mask = (
                k_ok[:, None] if rhs_mask is None else jnp.logical_and(rhs_mask, k_ok[:, None])
            )
        w_slice = rhs_ref.at[pl.ds(g * k_dim + k0, block_k), pl.ds(n0, block_n)]
        if rhs_mask is None:
            wt = plgpu.load(w_slice)
        else:
            wt = plgpu.load(w_slice, mask=rhs_mask, other=0.0)
        out = []
        for (start, height), acc in zip(tiles, accs):  # every row tile uses the one weight tile
            lhs_mask = rows_ok(start, height)[:, None]
            if k_ok is not None:
                lhs_mask = jnp.logical_and(lhs_mask, k_ok[None, :])
            x = plgpu.load(
                lhs_ref.at[pl.ds(start, height), pl.ds(k0, block_k)], mask=lhs_mask, other=0.0
            )
            out.append(acc + plgpu.dot(x, wt, precision=dot_precision))  # f32 out
        return tuple(out)

    # Padding and inactive items (g == E) take no K step: no weight is read,
    # and the store below writes zeros (padding) or nothing (empty range).
    # Arithmetic, not jnp.where: the Triton lowering turned where(pred, 4, 0)
    # with literal branches into an i1 loop bound (seen with jax 0.10/0.11).
    steps_per_split = pl.cdiv(pl.cdiv(k_dim, block_k), split_k)
    first = split * steps_per_split
    last = jnp.minimum(first + steps_per_split, pl.cdiv(k_dim, block_k))
    last = first + (g < num_groups).astype(jnp.int32) * (last - first)

    def run(tiles):  # tiles: ((first row, height), ...), all multiplied in one K loop
        zeros = tuple(jnp.zeros((h, block_n), jnp.float32) for _, h in tiles)
        accs = lax.fori_loop(first, last, functools.partial(step, tiles=tiles), zeros)
        for (start, height), acc in zip(tiles, accs):
            out_mask = rows_ok(start, height)[:, None]
            if cols_ok is not None:
                out_mask = jnp.logical_and(out_mask, cols_ok[None, :])
            out_row = split * (out_ref.shape[0] // split_k) + start
            plgpu.store(
                out_ref.at[pl.ds(out_row, height), pl.ds(n0, block_n)],
                acc.astype(out_ref.dtype),
                mask=out_mask,
            )

    head = ((r0, block_m),)
    if not tail_m:
        run(head)
        return
    # An item of more than block_m rows also multiplies its last rows, in a tile of tail_m,
    # by the same weight tiles: its weights are read once, not once per row tile.
    lax.cond(hi - r0 > block_m, lambda: run((*head, (r0 + block_m, tail_m))), lambda: run(head))


# ----------------------------------------------------------------------------
# pallas_call wrapper.
# ----------------------------------------------------------------------------
def choose_split_k(config: GroupedMatmulConfig, k_dim: int) -> int:
    """Programs per output tile along K: config.split_k, at most the number of
    K steps.

    Split-K is opt-in. It was meant for decode sizes, where (item, O tile)
    programs alone leave SMs idle (Mixtral's down projection at batch 1: 64
    programs on 132 SMs), but on an H100 one layer's expert work changed by
    -2%, +1.5% and -6% at 2, 16 and 64 rows (NOTES.md), so the default stays 1.
    """
    return min(config.split_k, pl.cdiv(k_dim, config.block_k))


def _gmm_call(lhs, rhs, work: WorkList, *, config: GroupedMatmulConfig, interpret: bool):
    """lhs [R, I], rhs [E, I, O], work list -> out [R, O]."""
    m, k_dim = lhs.shape
    num_groups, _, n_dim = rhs.shape
    num_items = work.group.shape[0]
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    split_k = choose_split_k(config, k_dim)
    dot_precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    kernel = functools.partial(
        _gmm_kernel,
        num_groups=num_groups,
        k_dim=k_dim,
        n_dim=n_dim,
        block_m=block_m,
        tail_m=config.tail_m,
        block_n=block_n,
        block_k=block_k,
        group_m=config.group_m,
        split_k=split_k,
        dot_precision=dot_precision,
    )

    # One flat grid: contraction splits slowest, then items x O-tile programs in swizzled
    # order (see _swizzle).
    grid = (split_k * num_items * pl.cdiv(n_dim, block_n),)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    rhs_rows = rhs.reshape(num_groups * k_dim, n_dim)  # free: contiguous
    out_dtype = lhs.dtype if split_k == 1 else jnp.float32
    tail = f"t{config.tail_m}" if config.tail_m else ""
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole((num_items,))] * 3 + [whole((m, k_dim)), whole(rhs_rows.shape)],
        out_specs=whole((split_k * m, n_dim)),
        out_shape=jax.ShapeDtypeStruct((split_k * m, n_dim), out_dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name=f"grouped_matmul_bm{block_m}{tail}_bn{block_n}_bk{block_k}_s{split_k}",
    )(work.group, work.lo, work.hi, lhs, rhs_rows)
    if split_k == 1:
        return out
    return out.reshape(split_k, m, n_dim).sum(axis=0).astype(lhs.dtype)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------
def _check_args(lhs, rhs, group_sizes):
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [R, I], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [E, I, O], got shape {rhs.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [E], got shape {group_sizes.shape}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not in bf16/f16/f32")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"dtypes differ: lhs {lhs.dtype}, rhs {rhs.dtype}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int32, got {group_sizes.dtype}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"contraction dims differ: lhs {lhs.shape} has "
            f"I={lhs.shape[1]}, rhs {rhs.shape} has I={rhs.shape[1]}"
        )
    if group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"group count mismatch: group_sizes has "
            f"{group_sizes.shape[0]} groups, rhs has E={rhs.shape[0]}"
        )
    if 0 in (*lhs.shape, *rhs.shape):
        raise ValueError(f"empty dimension: lhs {lhs.shape}, rhs {rhs.shape}")


def grouped_matmul(
    lhs,
    rhs,
    group_sizes,
    *,
    config: GroupedMatmulConfig | None = None,
    interpret: bool | None = None,
):
    """Grouped matmul: rows of group g times ``rhs[g]``, f32 accumulation.

    Args:
      lhs: [R, I], rows sorted by group.
      rhs: [E, I, O], one weight matrix per group; same dtype as lhs.
      group_sizes: int32 [E], rows per group (zeros allowed). sum <= R; rows
        past the sum are padding and come out 0 (group ends past R are
        clipped to R).
      config: tile sizes; default picked from R, E and dtype.
      interpret: run the kernel in Pallas interpret mode (default: on CPU).

    Returns:
      out [R, O] in lhs's dtype. A group with no rows never has its weights
      read.
    """
    _check_args(lhs, rhs, group_sizes)
    if config is None:
        config = GroupedMatmulConfig.default(
            lhs.shape[0], rhs.shape[0], lhs.dtype, rhs.shape[1], rhs.shape[2]
        )
    return _grouped_matmul(
        lhs, rhs, group_sizes, config=config, interpret=common.resolve_interpret(interpret)
    )


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _grouped_matmul(lhs, rhs, group_sizes, *, config, interpret):
    work = make_work_list(group_sizes, lhs.shape[0], config.block_m, config.tail_m)
    return _gmm_call(lhs, rhs, work, config=config, interpret=interpret)


# ----------------------------------------------------------------------------
# References.
# ----------------------------------------------------------------------------
def grouped_matmul_reference(lhs, rhs, group_sizes):
    """``lax.ragged_dot`` in f32 (HIGHEST), rows past sum(group_sizes) zeroed."""
    group_sizes = group_sizes.astype(jnp.int32)
    out = lax.ragged_dot(
        lhs, rhs, group_sizes, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    rows = jnp.arange(lhs.shape[0])
    out = jnp.where((rows < jnp.sum(group_sizes))[:, None], out, 0.0)
    return out.astype(lhs.dtype)


def grouped_matmul_dense_loop(lhs, rhs, group_sizes):
    """A Python loop over groups slicing rows (concrete group_sizes only)."""
    m, n_dim = lhs.shape[0], rhs.shape[2]
    out = jnp.zeros((m, n_dim), jnp.float32)
    start = 0
    for g, size in enumerate(int(s) for s in jax.device_get(group_sizes)):
        if size:
            part = jnp.dot(
                lhs[start : start + size].astype(jnp.float32),
                rhs[g].astype(jnp.float32),
                precision=lax.Precision.HIGHEST,
            )
            out = out.at[start : start + size].set(part)
        start += size
    return out.astype(lhs.dtype)
