"""The block-aligned expert kernels (pallas_kernels/expert_matmul.py) and `moe.aligned_dispatch`:
the layout's arithmetic in jnp, the kernels in JAX's Mosaic GPU interpreter on the CPU at small
sizes, and on a Hopper GPU at Mixtral's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models import moe
from pallas_kernels import decode_matmul as dm
from pallas_kernels import expert_matmul as em
from pallas_kernels.common import mosaic_gpu_interpreter, on_hopper

needs_interpreter = pytest.mark.skipif(
    mosaic_gpu_interpreter() is None or jax.default_backend() != "cpu",
    reason="JAX's Mosaic GPU interpreter, on the CPU",
)


def test_layout_starts_each_expert_at_a_block_and_keeps_pair_order():
    expert = jnp.asarray([2, 0, 2, 5, 0, 2, -1, 2], jnp.int32)  # 5 and -1: no expert of 3
    lay = em.aligned_layout(expert, 3)
    nb = em.num_blocks(8, 3)
    assert nb == 3 and lay.block_expert.shape == (nb,)
    # expert 0 fills block 0 (rows 0, 1), expert 1 has none, expert 2 fills block 1
    np.testing.assert_array_equal(lay.block_expert, [0, 2, 3])
    np.testing.assert_array_equal(lay.dest, [128, 0, 129, 384, 1, 130, 384, 131])


def test_layout_of_an_expert_over_several_blocks():
    expert = jnp.asarray([1] * 300 + [0] * 5, jnp.int32)
    lay = em.aligned_layout(expert, 2)
    np.testing.assert_array_equal(lay.block_expert, [0, 1, 1, 1])  # 1 + 3 blocks: nb is 4
    dest = np.asarray(lay.dest)
    np.testing.assert_array_equal(dest[:300], 128 + np.arange(300))
    np.testing.assert_array_equal(dest[300:], np.arange(5))


@pytest.mark.parametrize("seed", range(20))
def test_blocks_never_run_out(seed):
    """num_blocks bounds every routing: random sizes, an expert's dest never past its blocks."""
    rng = np.random.default_rng(seed)
    e, r = int(rng.integers(1, 9)), int(rng.integers(1, 700))
    expert = jnp.asarray(rng.integers(0, e + 1, r), jnp.int32)  # e: routed nowhere
    lay = em.aligned_layout(expert, e)
    dest, blocks, ex = np.asarray(lay.dest), np.asarray(lay.block_expert), np.asarray(expert)
    p = blocks.shape[0] * em.ROWS
    mine = ex < e
    assert (dest[~mine] == p).all()
    assert len(set(dest[mine])) == mine.sum() and (dest[mine] < p).all()
    np.testing.assert_array_equal(blocks[dest[mine] // em.ROWS], ex[mine])


def test_to_and_from_layout_move_rows_and_zero_the_rest():
    x = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4) + 1
    token = jnp.asarray([0, 0, 1, 2], jnp.int32)
    lay = em.aligned_layout(jnp.asarray([1, 0, 1, 7], jnp.int32), 2)
    xa = em.to_layout(x, token, lay)
    assert xa.shape == (em.num_blocks(4, 2) * em.ROWS, 4)
    np.testing.assert_array_equal(xa[0], x[0])  # pair 1 (token 0) is expert 0's first row
    np.testing.assert_array_equal(xa[128:130], x[jnp.asarray([0, 1])])
    assert float(jnp.abs(xa).sum()) == float(jnp.abs(x[jnp.asarray([0, 0, 1])]).sum())
    back = em.from_layout(xa, lay)
    np.testing.assert_array_equal(back[:3], x[jnp.asarray([0, 0, 1])])
    np.testing.assert_array_equal(back[3], 0)  # routed nowhere


def test_configs_split_down_only_while_few_blocks_have_rows():
    assert em.default_configs(2, 8, 14336)[1].splits == 4
    assert em.default_configs(200, 8, 14336)[1].splits == 1
    assert em.default_configs(2, 8, 64 * 6)[1].splits == 2  # 6 K steps: 4 doesn't divide
    assert em.default_configs(2, 8, 64 * 7)[1].splits == 1  # neither 4 nor 2 divides 7


def test_why_not_names_what_does_not_fit():
    cfg = dm.DecodeMatmulConfig(128, 64, 4)
    assert em.why_not(4096, 14336, jnp.bfloat16, cfg, swiglu=True) is None
    assert "tile_n" in em.why_not(4096, 100, jnp.bfloat16, cfg)
    assert "bf16" in em.why_not(4096, 128, jnp.float32, cfg)
    split = dm.DecodeMatmulConfig(128, 64, 4, 2)
    assert "split" in em.why_not(4096, 128, jnp.bfloat16, split, swiglu=True)
    assert not moe.expert_kernel_fits(64, 128, jnp.bfloat16)  # D under one tile
    assert moe.expert_kernel_fits(4096, 14336, jnp.bfloat16)


def _moe_inputs(t, d, f, e, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (t, d), jnp.bfloat16)
    weights, experts = moe.route(jax.random.normal(ks[1], (t, e)), 2, True)
    gate_up = (jax.random.normal(ks[2], (e, d, 2, f)) * d**-0.5).astype(jnp.bfloat16)
    down = (jax.random.normal(ks[3], (e, f, d)) * f**-0.5).astype(jnp.bfloat16)
    return x, weights, experts, gate_up, down


def _check_against_reference(got, x, weights, experts, gate_up, down):
    ref = np.asarray(moe.moe_reference(x, weights, experts, gate_up, down))
    got = np.asarray(got, np.float32)
    assert got.shape == ref.shape
    assert np.abs(ref).max() > 0.3  # worth comparing
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()


@needs_interpreter
def test_aligned_dispatch_in_the_interpreter_matches_the_reference():
    """Both kernels through the layout: 4 experts, one over two blocks (130 of 140 pairs)."""
    x, weights, experts, gate_up, down = _moe_inputs(70, 128, 128, 4)
    experts = experts.at[:65].set(jnp.asarray([3, 1], jnp.int32))  # expert 3: 65 + ~1/4 of 5
    got = moe.aligned_dispatch(x, weights, experts, gate_up, down, interpret=True)
    _check_against_reference(got, x, weights, experts, gate_up, down)


@needs_interpreter
def test_pairs_routed_nowhere_add_nothing_in_the_interpreter():
    x, weights, experts, gate_up, down = _moe_inputs(6, 128, 128, 2, seed=1)
    nowhere = experts.at[2:].set(2)  # tokens 2.. are padding: expert E
    got = np.asarray(moe.aligned_dispatch(x, weights, nowhere, gate_up, down, interpret=True))
    assert (got[2:] == 0).all()
    _check_against_reference(got[:2], x[:2], weights[:2], experts[:2], gate_up, down)


@pytest.mark.skipif(not on_hopper(), reason="Mosaic GPU kernels: Hopper GPUs only")
@pytest.mark.parametrize("t", [1, 50, 500, 2048])
def test_aligned_dispatch_matches_the_reference_at_mixtral_sizes(t):
    x, weights, experts, gate_up, down = _moe_inputs(t, 4096, 14336, 8, seed=t)
    got = jax.jit(moe.aligned_dispatch)(x, weights, experts, gate_up, down)
    _check_against_reference(got, x, weights, experts, gate_up, down)


def _moe_config():
    """A one-layer MoE whose widths the kernels take (128: one tile)."""
    from jaxinfer.config import ModelConfig

    return ModelConfig(
        model_type="mixtral",
        vocab_size=64,
        hidden_size=128,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        max_position_embeddings=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
    )


def test_the_expert_kernel_runs_only_when_asked(monkeypatch):
    """Opt-in: off by default everywhere, on with $JAXINFER_EXPERT_KERNEL=1 for a bf16 MoE."""
    import dataclasses

    from jaxinfer import model as model_lib
    from jaxinfer.sharding import Parallel

    cfg = _moe_config()
    chosen = lambda c, dt: model_lib.fused_kernels(c, dt, "pallas", Parallel())["expert_kernel"]  # noqa: E731
    monkeypatch.delenv("JAXINFER_EXPERT_KERNEL", raising=False)
    assert not chosen(cfg, jnp.bfloat16)
    monkeypatch.setenv("JAXINFER_EXPERT_KERNEL", "1")
    assert chosen(cfg, jnp.bfloat16)
    assert not chosen(cfg, jnp.float32)  # the kernels take bf16 only
    assert not chosen(dataclasses.replace(cfg, num_experts=0), jnp.bfloat16)


@needs_interpreter
def test_moe_block_with_the_expert_kernel_matches_without():
    """The MoE block through `aligned_dispatch` (interpreter) against the grouped matmul path,
    padding tokens (valid False) included."""
    import flax.linen as nn

    cfg = _moe_config()
    x = jax.random.normal(jax.random.key(0), (1, 9, 128), jnp.bfloat16)
    valid = (jnp.arange(9) < 6)[None]
    plain = moe.MoE(cfg, jnp.bfloat16, "xla")
    params = nn.meta.unbox(plain.init(jax.random.key(1), x)["params"])
    params = jax.tree.map(lambda p: p * 4 if p.ndim == 4 else p, params)  # outputs of ~1
    want = np.asarray(plain.apply({"params": params}, x, valid), np.float32)
    kernel = moe.MoE(cfg, jnp.bfloat16, "xla", expert_kernel=True)
    got = np.asarray(kernel.apply({"params": params}, x, valid), np.float32)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    assert not got[0, 6:].any()


def test_bench_script_times_both_dispatches_and_compares_them(tmp_path):
    """`scripts/bench_expert_matmul.py` on the CPU (interpreters, tiny widths): both paths
    timed, their outputs compared (the tile sweep is left out: ~1 min in the interpreter)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "em.json"
    cmd = [sys.executable, "scripts/bench_expert_matmul.py", "--d", "128", "--f", "128"]
    cmd += ["--experts", "2", "--decode-batches", "3", "--prefill-tokens", "", "--repeats", "1"]
    cmd += ["--calls", "1"]
    cmd += ["--sweep-cases", ""]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=900)
    row = json.loads(out.read_text())["cases"]["decode_B3"]
    assert row["pairs"] == 6 and set(row["us"]) == {"triton", "aligned"}
    assert all(us > 0 for us in row["us"].values())
    assert row["max_rel_err_aligned_vs_triton"] < 3e-2
    assert "sweep" not in row
