"""grouped_matmul against both references, in Pallas interpret mode.

Interpret mode fills output buffers with NaN before the kernel runs, so the
finiteness check below proves that every output element was written
(padding rows included: the kernel must store their zeros itself).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (
    GroupedMatmulConfig,
    grouped_matmul,
    grouped_matmul_dense_loop,
    grouped_matmul_reference,
    make_work_list,
)

from kernel_checks import assert_close as _assert_close

# Small tiles on the CPU: groups span several row tiles (and start off the
# multiples of block_m) at modest M.
SMALL = GroupedMatmulConfig(block_m=16, block_n=32, block_k=32)
SPLIT3 = dataclasses.replace(SMALL, split_k=3)
# Items of up to 16 + 16 rows: the second row tile runs only for items over 16 rows.
TAIL = GroupedMatmulConfig(block_m=16, tail_m=16, block_n=32, block_k=32)
TAIL128 = GroupedMatmulConfig(block_m=128, tail_m=32, block_n=256, block_k=64, num_warps=8)


def assert_close(out, ref, dtype):
    # every element within tol relative + tol * max|ref|; an all-zero reference must come out zero
    _assert_close(out, ref, dtype, elem_rtol=1.0, elem_atol=1.0, zero_ref_ok=True)


def _operands(seed, m, k, n, num_groups, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    return (
        jax.random.normal(ks[0], (m, k), dtype),
        jax.random.normal(ks[1], (num_groups, k, n), dtype),
    )


# (group_sizes, M, K, N, config)
CASES = [
    ((50,), 50, 64, 64, SMALL),  # E=1, all rows
    ((37,), 50, 72, 100, SMALL),  # E=1, padding rows
    ((0, 17, 0, 20), 40, 40, 24, SMALL),  # zeros + padding
    ((5, 0, 40, 1), 60, 72, 100, SMALL),  # straddling tiles
    ((0, 0, 0, 64), 64, 32, 32, SMALL),  # one group, all rows
    ((1, 2, 3, 4), 13, 48, 40, SMALL),  # groups < one tile
    ((3, 0, 0, 29, 16, 0, 1, 15), 70, 96, 72, SMALL),  # E=8, uneven
    ((0,) * 8, 20, 32, 48, SMALL),  # no rows at all
    ((0, 1, 0, 0, 2, 0, 0, 0), 3, 64, 160, SMALL),  # decode: 3 tokens
    ((40, 0, 90, 70), 211, 136, 200, None),  # default tiles
    # split-K: f32 partials over K ranges, summed after the kernel
    ((5, 0, 40, 1), 60, 72, 100, SPLIT3),  # K tail in last split
    ((0, 17, 0, 20), 40, 40, 24, SPLIT3),  # zeros + padding
    ((0, 1, 0, 0, 2, 0, 0, 0), 3, 200, 160, SPLIT3),  # decode: 3 tokens
    ((2, 0, 1, 0), 3, 64, 48, dataclasses.replace(SMALL, split_k=8)),  # > steps
    ((2, 0, 1, 0), 3, 160, 48, dataclasses.replace(SMALL, split_k=4)),  # empty
    # a tail row tile: groups of 17-32 rows in one item, longer ones in several
    ((5, 0, 40, 1), 60, 72, 100, TAIL),  # 40 > 16 + 16: cut into 16-row items as without it
    ((20, 17, 0, 33), 80, 40, 24, TAIL),  # 20 and 17 rows: two-tile items; padding rows
    ((0, 1, 0, 0, 2, 0, 0, 0), 3, 64, 160, TAIL),  # decode: head tiles only
    ((20, 17, 0, 33), 80, 40, 24, dataclasses.replace(TAIL, split_k=3)),  # with split-K
    ((150, 0, 129, 20), 320, 64, 256, TAIL128),  # 128 + 32: items of 150, 129 and 20 rows
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sizes,m,k,n,config", CASES)
def test_against_references(sizes, m, k, n, config, dtype):
    lhs, rhs = _operands(m * 7 + k, m, k, n, len(sizes), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, group_sizes, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = grouped_matmul_reference(lhs, rhs, group_sizes)
    loop = grouped_matmul_dense_loop(lhs, rhs, group_sizes)
    assert_close(out, ref, dtype)
    assert_close(out, loop, dtype)
    # padding rows are exactly zero
    assert (np.asarray(out[sum(sizes) :], np.float32) == 0).all()


def test_float16():
    sizes = (7, 0, 33, 12)
    lhs, rhs = _operands(5, 60, 72, 100, len(sizes), jnp.float16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, group_sizes, config=SMALL)
    assert out.dtype == jnp.float16
    assert_close(out, grouped_matmul_reference(lhs, rhs, group_sizes), jnp.float16)


@pytest.mark.parametrize("config", [SMALL, SPLIT3, TAIL])
def test_empty_expert_weights_never_read(config):
    """NaN in every expert that got no rows (and in padding rows of lhs)."""
    sizes = (0, 9, 0, 0, 30, 0, 4, 0)
    m, k, n = 50, 48, 40
    lhs, rhs = _operands(3, m, k, n, len(sizes), jnp.float32)
    empty = np.asarray(sizes) == 0
    rhs = jnp.where(jnp.asarray(empty)[:, None, None], jnp.nan, rhs)
    lhs = lhs.at[sum(sizes) :].set(jnp.nan)  # padding rows: never read either
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, group_sizes, config=config)
    assert np.isfinite(np.asarray(out)).all()
    clean = jnp.where(jnp.isnan(rhs), 0.0, rhs)
    assert_close(out, grouped_matmul_dense_loop(lhs, clean, group_sizes), jnp.float32)


@pytest.mark.parametrize(
    "sizes,m,block_m",
    [
        ((5, 0, 40, 1), 60, 16),
        ((0,) * 4, 7, 16),
        ((64,), 64, 16),
        ((3, 0, 0, 29, 16, 0, 1, 15), 70, 32),
        ((1, 1, 1, 1), 4, 128),
        ((7, 9, 8, 8, 16, 3, 9, 4), 64, 16),
    ],
)  # decode-like: groups straddle tile lines
def test_work_list(sizes, m, block_m):
    """Each row is covered by exactly one active item; empty groups get none."""
    work = jax.tree.map(np.asarray, make_work_list(jnp.asarray(sizes, jnp.int32), m, block_m))
    num_groups = len(sizes)
    assert work.group.shape == (-(-m // block_m) + num_groups,)
    bounds = np.concatenate([[0], np.cumsum(sizes), [m]])
    owner = np.full(m, -1)
    items = np.zeros(num_groups + 1, int)
    for g, lo, hi in zip(*work):
        if lo == hi:  # inactive
            assert g == num_groups
            continue
        assert lo < hi <= lo + block_m
        assert bounds[g] <= lo and hi <= bounds[g + 1]
        assert (lo - bounds[g]) % block_m == 0  # tiles start at the group's first row
        items[g] += 1
        assert (owner[lo:hi] == -1).all()
        owner[lo:hi] = g
    expected = np.repeat(np.arange(num_groups + 1), np.diff(bounds))
    np.testing.assert_array_equal(owner, expected)
    visited = set(work.group[work.hi > work.lo].tolist()) - {num_groups}
    assert visited == {g for g, s in enumerate(sizes) if s}
    # Fewest items: a group of up to block_m rows is one item (its weights read once).
    np.testing.assert_array_equal(items, -(-np.diff(bounds) // block_m))


@pytest.mark.parametrize(
    "lhs_shape,rhs_shape,gs_shape,dtypes,match",
    [
        ((8, 16), (2, 16), (2,), ("float32",) * 2, "rhs must be"),
        ((8,), (2, 16, 8), (2,), ("float32",) * 2, "lhs must be"),
        ((8, 16), (2, 16, 8), (3,), ("float32",) * 2, "group count"),
        ((8, 16), (2, 16, 8), (2, 1), ("float32",) * 2, "group_sizes must be"),
        ((8, 16), (2, 24, 8), (2,), ("float32",) * 2, "contraction"),
        ((8, 16), (2, 16, 8), (2,), ("float32", "bfloat16"), "dtypes differ"),
        ((8, 16), (2, 16, 8), (2,), ("int32",) * 2, "not in bf16"),
    ],
)
def test_bad_input(lhs_shape, rhs_shape, gs_shape, dtypes, match):
    lhs = jnp.zeros(lhs_shape, dtypes[0])
    rhs = jnp.zeros(rhs_shape, dtypes[1])
    with pytest.raises(ValueError, match=match):
        grouped_matmul(lhs, rhs, jnp.zeros(gs_shape, jnp.int32))


def test_float_group_sizes_rejected():
    with pytest.raises(ValueError, match="int32"):
        grouped_matmul(jnp.zeros((8, 16)), jnp.zeros((2, 16, 8)), jnp.zeros((2,), jnp.float32))


def test_bad_config():
    with pytest.raises(ValueError, match="power of two"):
        GroupedMatmulConfig(block_m=24)
    with pytest.raises(ValueError, match="tail_m=24"):
        GroupedMatmulConfig(tail_m=24)


def test_work_list_with_tail():
    """With a tail tile, a group of up to block_m + tail_m rows is one item (its weights read
    once); a longer group is cut into block_m-row items as without the tail."""
    sizes = (150, 0, 300, 100, 160, 161)  # padding segment: 1000 - 871 = 129 rows
    work = jax.tree.map(
        np.asarray, make_work_list(jnp.asarray(sizes, jnp.int32), 1000, 128, tail_m=32)
    )
    got = [(int(g), int(hi - lo)) for g, lo, hi in zip(*work) if hi > lo]
    assert got == [
        (0, 150),
        (2, 128),
        (2, 128),
        (2, 44),
        (3, 100),
        (4, 160),
        (5, 128),
        (5, 33),
        (6, 129),  # the padding rows: one item, stored as zeros
    ]
