"""The Mosaic GPU decode matmul: its shape checks everywhere, its numbers in JAX's Mosaic GPU
interpreter on the CPU and on a Hopper GPU."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script

from jaxinfer import model as model_lib
from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import Decoder
from pallas_kernels import decode_matmul as dm
from pallas_kernels.common import mosaic_gpu_interpreter, on_hopper


def test_config_rejects_tiles_the_kernel_cannot_lay_out():
    with pytest.raises(ValueError, match="tile_n=96 must be a multiple of 64"):
        dm.DecodeMatmulConfig(tile_n=96)
    with pytest.raises(ValueError, match="tile_k=512"):
        dm.DecodeMatmulConfig(tile_k=512)
    with pytest.raises(ValueError, match="stages=1"):
        dm.DecodeMatmulConfig(stages=1)
    with pytest.raises(ValueError, match="splits=0"):
        dm.DecodeMatmulConfig(splits=0)
    with pytest.raises(ValueError, match="cluster=3"):
        dm.DecodeMatmulConfig(cluster=3)


def test_why_not_names_the_shape_that_does_not_fit():
    cfg = dm.DecodeMatmulConfig(tile_n=128, tile_k=64, stages=4, splits=4)
    assert dm.why_not(128, 4096, 4096, jnp.bfloat16, cfg) is None
    assert "129 rows" in dm.why_not(129, 4096, 4096, jnp.bfloat16, cfg)
    assert "N=4000" in dm.why_not(128, 4096, 4000, jnp.bfloat16, cfg)
    pairs = dm.DecodeMatmulConfig(tile_n=128, cluster=2)
    assert "tile_n * cluster = 256" in dm.why_not(128, 4096, 384, jnp.bfloat16, pairs)
    assert "K=4000" in dm.why_not(128, 4000, 4096, jnp.bfloat16, cfg)
    assert "float32" in dm.why_not(128, 4096, 4096, jnp.float32, cfg)
    big = dm.DecodeMatmulConfig(tile_n=256, tile_k=256, stages=6)
    assert "shared memory" in dm.why_not(128, 4096, 4096, jnp.bfloat16, big)
    x, w = jnp.zeros((200, 256), jnp.bfloat16), jnp.zeros((256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="200 rows"):
        dm.decode_matmul(x, w, w_nk=False)
    with pytest.raises(ValueError, match="disagree on K"):
        dm.decode_matmul(x[:8], w, w_nk=True)


def test_smem_bytes_counts_the_ring_and_the_output_chunks():
    cfg = dm.DecodeMatmulConfig(tile_n=256, tile_k=64, stages=3, splits=2)
    ring = 3 * (128 + 256) * 64 * 2
    chunks = 2 * 2 * 64 * 64  # two warpgroups, two 64 x 64 slots each
    assert dm.smem_bytes(cfg) == ring + chunks * 4 + dm.SMEM_OVERHEAD  # float32 partials
    bf16_out = dataclasses.replace(cfg, splits=1)
    assert dm.smem_bytes(bf16_out) == ring + chunks * 2 + dm.SMEM_OVERHEAD
    narrow = dm.DecodeMatmulConfig(tile_n=64, tile_k=128, stages=4, splits=2)  # one chunk, one slot
    assert dm.smem_bytes(narrow) == 4 * (128 + 64) * 128 * 2 + 2 * 64 * 64 * 4 + dm.SMEM_OVERHEAD


@pytest.mark.parametrize("w_nk", [False, True])
def test_reference_is_the_product_in_either_layout(w_nk):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (5, 64), jnp.bfloat16)
    w = jax.random.normal(kw, (64, 96), jnp.bfloat16)
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    got = dm.decode_matmul_reference(x, w.T if w_nk else w, w_nk=w_nk)
    assert got.shape == (5, 96) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: Hopper GPUs only")
@pytest.mark.parametrize("w_nk", [False, True])
@pytest.mark.parametrize(
    "m,k,n,cfg",
    [
        (128, 4096, 1024, dm.DecodeMatmulConfig(128, 64, 4, 1)),
        (100, 4096, 1024, dm.DecodeMatmulConfig(128, 64, 4, 4)),
        (1, 2048, 512, dm.DecodeMatmulConfig(256, 64, 3, 2)),
        (128, 512, 256, dm.DecodeMatmulConfig(64, 64, 6, 4)),  # fewer K steps than stages
        (128, 4096, 2048, dm.DecodeMatmulConfig(256, 64, 3, 2, cluster=2)),  # x multicast
        (64, 2048, 1024, dm.DecodeMatmulConfig(64, 128, 4, 1, cluster=4)),
        (128, 4096, 1024, dm.DecodeMatmulConfig(64, 128, 4, 1, pdl=True)),  # weights first
        (128, 512, 256, dm.DecodeMatmulConfig(64, 64, 6, 2, pdl=True)),
    ],
)
def test_kernel_matches_the_float32_product(m, k, n, cfg, w_nk):
    kx, kw = jax.random.split(jax.random.key(m + k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    got = dm.decode_matmul(x, w.T if w_nk else w, w_nk=w_nk, config=cfg)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - exact).max() / np.abs(exact).max()
    assert err < 1e-2, err


@pytest.mark.parametrize(
    "m,k,n,cfg",
    [
        (100, 256, 128, dm.DecodeMatmulConfig(64, 64, 2, 1)),
        (128, 512, 256, dm.DecodeMatmulConfig(128, 64, 4, 2)),  # f32 partials, summed
        (7, 256, 128, dm.DecodeMatmulConfig(64, 64, 6, 1)),  # fewer K steps than stages
        (128, 512, 512, dm.DecodeMatmulConfig(256, 64, 3, 1)),  # 4 output chunks, 2 slots
    ],
)
def test_kernel_in_jaxs_mosaic_gpu_interpreter_matches_the_product(m, k, n, cfg):
    """The same kernel, run on the CPU by JAX's Mosaic GPU interpreter (threads, TMA
    copies, barriers and wgmma simulated): the ring, the slot releases and the output chunks
    are checked without a GPU."""
    if mosaic_gpu_interpreter() is None or jax.default_backend() != "cpu":
        pytest.skip("JAX's Mosaic GPU interpreter, on the CPU")
    kx, kw = jax.random.split(jax.random.key(m + k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.05).astype(jnp.bfloat16)
    got = dm.decode_matmul(x, w, w_nk=False, config=cfg, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    err = np.abs(np.asarray(got, np.float32) - exact).max() / np.abs(exact).max()
    assert err < 1e-2, err


def _swiglu_inputs(m, k, n, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed + m + k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (k, 2, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    return x, w


def _swiglu_exact(x, w):
    gu = np.einsum("mk,kcf->cmf", np.asarray(x, np.float32), np.asarray(w, np.float32))
    return gu[0] / (1 + np.exp(-gu[0])) * gu[1]


def _check_swiglu(got, x, w):
    want = dm.decode_swiglu_reference(x, w)
    assert got.shape == want.shape == (x.shape[0], w.shape[2]) and got.dtype == jnp.bfloat16
    got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got32 - want32).max() <= 2e-2 * np.abs(want32).max()
    exact = _swiglu_exact(x, w)  # and not just the reference's own mistakes
    assert np.abs(got32 - exact).max() <= 3e-2 * np.abs(exact).max()
    assert np.abs(exact).max() > 0.5  # a product worth comparing


@pytest.mark.parametrize(
    "m,k,n,cfg",
    [
        (100, 256, 128, dm.DecodeMatmulConfig(64, 64, 2, 1)),
        (128, 512, 256, dm.DecodeMatmulConfig(128, 64, 3, 1)),  # 2 output chunks a tile
        (7, 128, 64, dm.DecodeMatmulConfig(64, 64, 4, 1)),  # fewer K steps than stages
    ],
)
def test_swiglu_in_the_interpreter_matches_the_reference(m, k, n, cfg):
    """gate's and up's tiles of a column range in one ring slot, two products, their SwiGLU
    stored: on the CPU, by JAX's Mosaic GPU interpreter."""
    if mosaic_gpu_interpreter() is None or jax.default_backend() != "cpu":
        pytest.skip("JAX's Mosaic GPU interpreter, on the CPU")
    x, w = _swiglu_inputs(m, k, n)
    _check_swiglu(dm.decode_swiglu(x, w, config=cfg, interpret=True), x, w)


@pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: Hopper GPUs only")
@pytest.mark.parametrize(
    "m,k,n,cfg",
    [
        (128, 4096, 1024, dm.DecodeMatmulConfig(128, 64, 4, 1)),
        (100, 4096, 1024, dm.DecodeMatmulConfig(128, 64, 3, 1, cluster=2)),
        (64, 1024, 512, dm.DecodeMatmulConfig(64, 64, 6, 1)),
        (128, 4096, 14336, dm.DecodeMatmulConfig(128, 64, 4, 1)),  # Llama-3-8B's gate/up
    ],
)
def test_swiglu_kernel_matches_the_reference(m, k, n, cfg):
    x, w = _swiglu_inputs(m, k, n)
    _check_swiglu(dm.decode_swiglu(x, w, config=cfg), x, w)


def test_swiglu_refuses_what_it_cannot_do():
    x = jnp.zeros((128, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"must be \[K, 2, F\] with K = 512"):
        dm.decode_swiglu(x, jnp.zeros((512, 256), jnp.bfloat16))
    with pytest.raises(ValueError, match="can't split K"):
        dm.decode_swiglu(
            x, jnp.zeros((512, 2, 128), jnp.bfloat16), config=dm.DecodeMatmulConfig(splits=2)
        )
    with pytest.raises(ValueError, match="shared memory"):  # two weight tiles a slot
        cfg = dm.DecodeMatmulConfig(tile_n=256, tile_k=64, stages=4)
        assert dm.why_not(128, 512, 512, jnp.bfloat16, cfg) is None  # one tile a slot fits
        dm.decode_swiglu(x, jnp.zeros((512, 2, 512), jnp.bfloat16), config=cfg)


@pytest.mark.parametrize(
    "w_nk,cfg,lacks",
    [
        (True, dm.DecodeMatmulConfig(64, 64, 2), "w_nk"),
        (False, dm.DecodeMatmulConfig(64, 64, 2, cluster=2), "cluster"),
        (False, dm.DecodeMatmulConfig(64, 64, 2, pdl=True), "pdl"),
    ],
)
def test_interpreter_refuses_what_it_cannot_simulate(w_nk, cfg, lacks):
    x = jnp.zeros((128, 256), jnp.bfloat16)
    w = jnp.zeros((128, 256) if w_nk else (256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"interpreter can't run decode_matmul with.*{lacks}"):
        dm.decode_matmul(x, w, w_nk=w_nk, config=cfg, interpret=True)


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_waits_once_for_the_kernel_before_and_only_when_asked(pdl):
    """Traced on any machine (the kernel lowers on Hopper only): with `pdl` the memory
    warpgroup lets the next kernel launch and waits once, after its first weight loads."""
    x = jnp.zeros((128, 512), jnp.bfloat16)
    w = jnp.zeros((512, 256), jnp.bfloat16)
    cfg = dm.DecodeMatmulConfig(64, 64, 6, 2, pdl=pdl)
    fn = lambda x, w: dm.decode_matmul(x, w, w_nk=False, config=cfg, interpret=False)  # noqa: E731
    text = str(jax.make_jaxpr(fn)(x, w))
    assert text.count("griddepcontrol_wait") == pdl
    assert text.count("griddepcontrol_launch_dependents") == pdl
    if pdl:  # the weight copies of the first slots come before the wait, x's after it: a
        # CTA's K (512 over 2 splits) is 4 steps of 64, fewer than the 6 slots
        before, after = text.split("griddepcontrol_wait")
        assert before.count("copy_gmem_to_smem") == after.count("copy_gmem_to_smem") == 4


@pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernel: Hopper GPUs only")
@pytest.mark.parametrize(
    "m,k,layers,cfg",
    [
        (128, 2048, 4, dm.DecodeMatmulConfig(64, 128, 4)),
        (100, 1024, 3, dm.DecodeMatmulConfig(128, 64, 5)),
        (7, 256, 5, dm.DecodeMatmulConfig(64, 64, 8)),  # fewer K steps than stages
    ],
)
def test_chain_is_bitwise_the_matmuls_one_by_one(m, k, layers, cfg):
    """The persistent chain runs the same tiles in the same order as separate kernels, so each
    layer's bf16 product, and the last one, are the same bits."""
    kx, kw = jax.random.split(jax.random.key(m + k + layers))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    ws = (jax.random.normal(kw, (layers, k, k), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    want = x
    for w in ws:
        want = dm.decode_matmul(want, w, w_nk=False, config=cfg)
    for _ in range(3):  # again: the grid barrier's semaphore starts from zero on every call
        got = dm.decode_matmul_chain(x, ws, config=cfg)
        assert got.shape == (m, k) and got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    exact = np.asarray(x, np.float32)
    for w in np.asarray(ws, np.float32):
        exact = exact @ w
    err = np.abs(np.asarray(got, np.float32) - exact).max() / np.abs(exact).max()
    assert err < 3e-2, err


def test_chain_loads_a_layers_weights_before_it_waits_for_the_layer_before():
    """Traced on any machine: L - 1 grid-barrier waits, one signal per compute warpgroup and
    layer but the last, and before each wait the next layer's first weight copies (4 slots;
    the first layer's 4 steps of 128 come before any wait, with its x copies)."""
    x = jnp.zeros((128, 512), jnp.bfloat16)
    ws = jnp.zeros((3, 512, 512), jnp.bfloat16)
    cfg = dm.DecodeMatmulConfig(64, 128, 4)
    text = str(jax.make_jaxpr(lambda x, ws: dm.decode_matmul_chain(x, ws, config=cfg))(x, ws))
    assert text.count("semaphore_signal") == 2 and text.count("semaphore_wait") == 2
    first, second, third = text.split("semaphore_wait")  # only the memory warpgroup copies in
    assert first.count("copy_gmem_to_smem") == 4 + 4 + 4  # layer 0's x and w, layer 1's w
    assert second.count("copy_gmem_to_smem") == 4 + 4  # layer 1's x, layer 2's w
    assert third.count("copy_gmem_to_smem") == 4  # layer 2's x


def test_chain_refuses_what_it_cannot_run():
    x = jnp.zeros((128, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\[L, K, K\]"):
        dm.decode_matmul_chain(x, jnp.zeros((2, 512, 256), jnp.bfloat16))
    with pytest.raises(ValueError, match="splits"):
        dm.decode_matmul_chain(
            x, jnp.zeros((2, 512, 512), jnp.bfloat16), config=dm.DecodeMatmulConfig(splits=2)
        )
    with pytest.raises(ValueError, match="129 rows"):
        dm.decode_matmul_chain(
            jnp.zeros((129, 512), jnp.bfloat16), jnp.zeros((2, 512, 512), jnp.bfloat16)
        )


def test_bench_sweeps_only_configs_of_one_or_two_waves():
    script = load_script("bench_decode_matmul")
    cfgs = script.mgpu_configs(False, 4096, [1, 2])
    waves = [4096 // c.tile_n * c.splits for c in cfgs]
    assert cfgs and all(64 <= w <= 264 for w in waves), waves
    assert {c.cluster for c in cfgs} == {1, 2}
    assert dm.DecodeMatmulConfig(64, 128, 4, 2) in cfgs  # 128 CTAs: the best for o and down
    assert dm.DecodeMatmulConfig(64, 128, 4, 1) in cfgs  # 64
    assert dm.DecodeMatmulConfig(64, 128, 4, 4) in cfgs  # 256: two waves
    wide = script.mgpu_configs(False, 28672, [1])  # 448 tiles of 64 columns: more than two waves
    assert wide and all(c.tile_n >= 128 for c in wide)


def test_bench_triton_tiles_are_the_ones_its_rows_name():
    script = load_script("bench_decode_matmul")
    (quick,) = script.tiles(True)
    assert (quick.block_m, quick.tail_m, quick.block_n, quick.block_k) == (128, 0, 64, 64)
    assert (quick.num_warps, quick.num_stages, quick.split_k) == (4, 2, 2)
    full = script.tiles(False)
    assert len(full) == 4 * 2 * 2 * 3 and all(c.block_m == 128 and c.tail_m == 0 for c in full)
    assert {(c.block_n, c.num_warps) for c in full} == {(64, 4), (128, 4), (128, 8), (256, 8)}
    assert {c.block_k for c in full} == {64, 128} and {c.split_k for c in full} == {1, 2, 4}


def test_bench_rotation_gives_each_call_its_own_x():
    # One x for all calls let XLA merge them into one matmul over the joined weights.
    script = load_script("bench_decode_matmul")
    sets = script.rotation(64, 32, 8, 3)
    assert [(x.shape, w.shape) for x, w in sets] == [((8, 64), (64, 32))] * 3
    xs = [np.asarray(x, np.float32) for x, _ in sets]
    ws = [np.asarray(w, np.float32) for _, w in sets]
    for i in range(3):
        for j in range(i):
            assert not np.array_equal(xs[i], xs[j]) and not np.array_equal(ws[i], ws[j])


def test_bench_sweep_orders_by_time_and_keeps_each_failure_with_its_error():
    script = load_script("bench_decode_matmul")
    x = np.ones((2, 3), np.float32)

    def fn_for(scale):
        if scale == 3:
            return lambda w: jnp.zeros((5,)) + w  # the wrong shape: a broadcasting error
        return lambda w: (x @ w) * scale

    w = np.ones((3, 4), np.float32)
    exact = x @ w
    timed = lambda fn, sets: float(np.asarray(fn(*sets[0])).sum())  # "time": scale x 24
    rows = script.sweep(fn_for, [2, 1, 3], lambda s: [s], [(w,)], exact, timed)
    assert [r["cfg"] for r in rows] == [[1], [2], [3]]  # fastest first, the failure last
    assert rows[0]["us"] == 24.0 and rows[1]["us"] == 48.0
    assert rows[0]["err"] == 0.0 and rows[1]["err"] == pytest.approx(1.0)  # twice the product
    assert "us" not in rows[2] and "Incompatible shapes" in rows[2]["error"]


def test_decoder_with_the_swiglu_kernel_matches_without():
    """A step of 100 tokens runs the MLP's gate/up and SiLU x up as the fused kernel (on the CPU
    in JAX's Mosaic GPU interpreter), with the logits of the unfused decoder; a step of 40 tokens
    (fewer rows than the kernel pays off at) keeps XLA's form."""
    if mosaic_gpu_interpreter() is None and not on_hopper():
        pytest.skip("JAX's Mosaic GPU interpreter or a Hopper GPU")
    cfg = ModelConfig(
        model_type="llama",
        max_position_embeddings=128,
        vocab_size=97,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    )
    params = model_lib.init_params(cfg, "bfloat16", seed=5)
    logits = {}
    for t in (100, 40):
        tokens = jnp.asarray(np.random.default_rng(t).integers(0, 97, (1, t)), jnp.int32)
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        for fused in (False, True):
            dec = Decoder(cfg, jnp.bfloat16, "xla", swiglu_kernel=fused)
            run = lambda p, tk, ps, dec=dec: dec.apply({"params": p}, tk, ps)[0]  # noqa: E731
            text = str(jax.make_jaxpr(run)(params, tokens, positions))
            assert ("_decode_matmul" in text) == (fused and t == 100)
            logits[t, fused] = np.asarray(jax.jit(run)(params, tokens, positions), np.float32)
    assert np.std(logits[100, False]) > 0.1
    np.testing.assert_allclose(logits[100, True], logits[100, False], rtol=0, atol=3e-2)
    np.testing.assert_array_equal(logits[40, True], logits[40, False])


def test_l2_bench_times_a_chain_over_distinct_weights_and_over_one(tmp_path):
    script = load_script("bench_l2_weights")
    out = tmp_path / "l2.json"
    argv = ["--rows", "8", "--sets", "3", "--quick", "--repeats", "1", "--min-time", "0.001"]
    assert script.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["m"], row["k"], row["sets"]) == (8, 64, 3)
    assert row["cold_us"] > 0 and row["hot_us"] > 0
