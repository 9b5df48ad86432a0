"""The GEMV kernels (a token's matmul: split-K partials of W [K, N], and W [N, K] rows) against
the float32 reference, in interpret mode on the CPU; bad inputs name what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemv import (
    GemvConfig,
    GemvRowsConfig,
    gemv_partials,
    gemv_reference,
    gemv_rows,
)


def _inputs(k, n, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (k,), jnp.float32).astype(dtype)
    w = (0.1 * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "config", [GemvConfig(32, 256, 64), GemvConfig(64, 128, 128, num_stages=1)]
)
def test_partials_sum_to_the_product(dtype, config):
    x, w = _inputs(512, 192, dtype)
    partials = gemv_partials(x, w, config)
    assert partials.shape == (512 // config.block_k, 192) and partials.dtype == jnp.float32
    ref = np.asarray(gemv_reference(x, w))
    np.testing.assert_allclose(np.asarray(partials.sum(0)), ref, rtol=1e-5, atol=1e-4)
    # each split is its own rows' product
    k0 = config.block_k
    np.testing.assert_allclose(
        np.asarray(partials[0]), np.asarray(gemv_reference(x[:k0], w[:k0])), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("config", [GemvRowsConfig(16, 128), GemvRowsConfig(8, 256, 8, 4)])
def test_rows_gives_the_product_in_the_dtype(dtype, config):
    x, w = _inputs(512, 96, dtype)
    y = gemv_rows(x, w.T, config)
    assert y.shape == (96,) and y.dtype == dtype
    ref = np.asarray(gemv_reference(x, w))
    # float32 accumulation, one rounding to the dtype at the end: within half its ulp
    tol = 1e-6 if dtype == jnp.float32 else 2.0**-9
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol, atol=tol * scale)


def test_bad_inputs_name_what_is_wrong():
    x, w = _inputs(512, 96, jnp.float32)
    with pytest.raises(ValueError, match=r"must be \[K\] and \[K, N\]"):
        gemv_partials(x[:256], w)
    with pytest.raises(ValueError, match="must be one of"):
        gemv_partials(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="does not split"):
        gemv_partials(x, w, GemvConfig(block_n=64))  # 96 columns
    with pytest.raises(ValueError, match=r"must be \[K\] and \[N, K\]"):
        gemv_rows(x, w)
    with pytest.raises(ValueError, match="must be one of"):
        gemv_rows(x.astype(jnp.bfloat16), w.T)
    with pytest.raises(ValueError, match="does not split"):
        gemv_rows(x, w.T, GemvRowsConfig(block_n=64))


def test_the_benchmark_runs_and_checks_each_kernel(tmp_path):
    """`scripts/bench_gemv.py --cpu-smoke`: every peer timed, each kernel's error measured."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gemv.json"
    cmd = [sys.executable, "scripts/bench_gemv.py", "--cpu-smoke", "--repeats", "1"]
    subprocess.run(
        [*cmd, "--batch", "16", "--xla-splits", "2", "--out", str(out)], cwd=root, check=True
    )
    row = json.loads(out.read_text())["small"]
    keys = ("xla_us", "xla_nk_us", "xla_reduce_us", "xla_nk_reduce_us", "xla_m16_us")
    for key in (*keys, "xla_nk_m16_us", "xla_split2_us"):
        assert row[key] > 0, key
    assert row["xla_reduce_err"] < 1e-2 and row["xla_nk_reduce_err"] < 1e-2  # bf16 output
    for kind in ("rows_configs", "configs"):
        (best,) = row[kind]
        assert best["us"] > 0 and best["err"] < 1e-2, best  # bf16 output: its rounding
