"""Shared checks of kernel outputs against their references (interpret mode poisons outputs
with NaN first, so the finiteness check proves every element was written)."""

import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def assert_close(out, ref, dtype, *, elem_rtol=0.0, elem_atol=30.0, zero_ref_ok=False):
    """Norm-relative error <= TOL[dtype], then every element within
    elem_rtol * tol relative plus elem_atol * tol * max|ref| absolute."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "NaN/inf in output (unwritten element?)"
    tol = TOL[dtype]
    scale = np.abs(ref).max()
    if zero_ref_ok and scale == 0:
        assert (out == 0).all()
        return
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= tol, f"relative error {rel:.3g} > {tol}"
    np.testing.assert_allclose(out, ref, rtol=elem_rtol * tol, atol=elem_atol * tol * scale)
