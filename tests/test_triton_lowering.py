"""Every Pallas kernel lowers to a Triton module that MLIR verifies, for sm_90, on the CPU.

Interpret mode never builds Triton IR, so a kernel can pass every numeric test here and still
fail on the GPU: the first GPU run of the grouped matmul died on an i1 loop bound that
`jnp.where(pred, 4, 0)` lowered to. `jax.export` for platform "cuda" runs the same Pallas ->
Triton lowering without a GPU; a hook verifies each module it builds.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
from jax import export
from jax._src.pallas.triton import pallas_call_registration as registration

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.grouped_matmul import GroupedMatmulConfig, grouped_matmul
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention


@pytest.fixture
def triton_modules(monkeypatch):
    """Collects (name, verified) for every Triton module lowered while the test runs."""
    built = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def checked(*args, **kwargs):
        result = lower(*args, **kwargs)
        op = result.module.operation
        built.append((str(op.attributes["sym_name"]).strip('"'), op.verify()))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", checked)
    return built


def lower_for_cuda(fn, *args) -> str:
    """Lowers `fn` for the cuda platform (no GPU needed; Triton and Mosaic GPU custom calls
    allowed); returns the StableHLO module text."""
    allow = [
        export.DisabledSafetyCheck.custom_call(name)
        for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu")
    ]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(
        *args
    ).mlir_module()


def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def assert_all_verified(built, expected_prefix: str | tuple[str, ...]):
    assert built, "no Triton module was lowered"
    assert all(name.startswith(expected_prefix) for name, _ in built), built
    assert all(ok for _, ok in built), f"MLIR verification failed: {built}"


@pytest.mark.parametrize(
    "config",
    [
        None,
        GroupedMatmulConfig(block_m=16, block_n=64),
        GroupedMatmulConfig(block_m=128, block_n=256, num_warps=8),
        GroupedMatmulConfig(block_m=128, tail_m=32, block_n=256, num_warps=8),
    ],
)
@pytest.mark.parametrize("k_dim", [256, 200])  # 200: masked K tail
def test_grouped_matmul_lowers(triton_modules, config, k_dim):
    fn = functools.partial(grouped_matmul, config=config, interpret=False)
    lower_for_cuda(fn, spec((512, k_dim)), spec((8, k_dim, 384)), spec((8,), jnp.int32))
    assert_all_verified(triton_modules, "grouped_matmul")


def test_grouped_matmul_split_k_lowers(triton_modules):
    # decode-sized: 2 rows, K spread over 4 programs per output tile
    fn = functools.partial(
        grouped_matmul, config=GroupedMatmulConfig(block_m=16, split_k=4), interpret=False
    )
    lower_for_cuda(fn, spec((2, 1024)), spec((8, 1024, 384)), spec((8,), jnp.int32))
    assert_all_verified(triton_modules, "grouped_matmul")
    assert triton_modules[0][0].endswith("_s4"), triton_modules


@pytest.mark.parametrize("window", [None, 128])
def test_flash_attention_lowers(triton_modules, window):
    fn = functools.partial(flash_attention, sliding_window=window, return_lse=True, interpret=False)
    lower_for_cuda(fn, spec((2, 300, 8, 128)), spec((2, 300, 2, 128)), spec((2, 300, 2, 128)))
    assert_all_verified(triton_modules, "flash_attention")


def test_paged_attention_lowers(triton_modules):
    pool = spec((2, 64, 16, 128))
    fn = functools.partial(paged_attention, interpret=False)
    lower_for_cuda(
        fn, spec((4, 8, 128)), pool, pool, spec((4, 16), jnp.int32), spec((4,), jnp.int32)
    )
    for skip in (False, True):
        fn = functools.partial(ragged_paged_attention, interpret=False, skip_single_token=skip)
        lower_for_cuda(
            fn,
            spec((40, 8, 128)),
            pool,
            pool,
            spec((4, 16), jnp.int32),
            spec((4,), jnp.int32),
            spec((5,), jnp.int32),
        )
    assert len(triton_modules) >= 4, triton_modules
    # 8 (sequence, kv head) pairs split 4 ways: the splits' combine is a kernel of its own
    assert any(name.startswith("paged_decode_combine") for name, _ in triton_modules)
    assert_all_verified(triton_modules, ("paged_decode", "ragged_paged"))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("new_token_last", [False, True])
def test_rope_paged_decode_lowers(triton_modules, new_token_last, qk_norm):
    """RoPE, the K/V write and the decode in one kernel; with `new_token_last`, the new token
    joining the softmax from registers after the loop; with Qwen3's q/k norms."""
    from pallas_kernels.paged_attention import PagedConfig, rope_paged_decode

    pool = spec((8, 64, 16, 128))
    config = PagedConfig(new_token_last=new_token_last)
    norms = (spec((128,)), spec((128,))) if qk_norm else ()

    def fn(qkv, k_pages, v_pages, table, lengths, positions, slots, inv_freq, *scales):
        qk = (*scales, 1e-6) if scales else None
        args = (qkv, k_pages, v_pages, table, lengths, positions, slots, inv_freq, qk)
        return rope_paged_decode(*args, config=config, interpret=False)

    ints = spec((4,), jnp.int32)
    table = spec((4, 16), jnp.int32)
    lower_for_cuda(
        fn,
        spec((4, 8, 6, 128)),
        pool,
        pool,
        table,
        ints,
        ints,
        ints,
        spec((64,), jnp.float32),
        *norms,
    )
    assert_all_verified(triton_modules, ("rope_paged_decode", "paged_decode_combine"))
    assert triton_modules[0][0].startswith("rope_paged_decode_qk_norm") is qk_norm, triton_modules


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_write_lowers(triton_modules, qk_norm):
    """RoPE + the K/V write, and with Qwen3's q/k norms in it (their reductions over a head)."""
    from pallas_kernels.rope_write import rope_write

    pool = spec((8, 64, 16, 128))
    norms = (spec((128,)), spec((128,))) if qk_norm else ()

    def fn(qkv, k_pages, v_pages, positions, slots, inv_freq, *scales):
        qk = (*scales, 1e-6) if scales else None
        return rope_write(qkv, k_pages, v_pages, positions, slots, inv_freq, qk, interpret=False)

    ints = spec((4,), jnp.int32)
    lower_for_cuda(
        fn, spec((4, 8, 6, 128)), pool, pool, ints, ints, spec((64,), jnp.float32), *norms
    )
    assert_all_verified(triton_modules, "rope_write_kv")
    assert triton_modules[0][0].endswith("_qk_norm") is qk_norm, triton_modules


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Kernels called with interpret=None lower for the GPU (not interpret mode) while on a CPU."""
    from pallas_kernels import common

    # the kernels' entries decide interpret mode through this one function, outside their jits
    monkeypatch.setattr(
        common,
        "resolve_interpret",
        lambda interpret: False if interpret is None else bool(interpret),
    )
    jax.clear_caches()  # traces made in interpret mode must not be reused
    yield
    jax.clear_caches()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("decode", [True, False])
def test_engine_programs_have_no_host_waits(gpu_kernels, family, decode):
    """The engine's GPU programs (forward, sampler) have no while loop and no cond: XLA runs a
    cond (and a while loop's predicate) by copying a flag to the host and waiting for it, which
    stalled every 256-sequence step on an H100 until the step ran on the device. Except mode
    "filter"'s sampler, whose rows that sort their whole rows are branches: the runner queues
    its programs from a worker thread (`Runner.dispatch`)."""
    from jaxinfer.config import ModelConfig
    from jaxinfer.kv_cache import init_pages
    from jaxinfer.model import Model, init_params
    from jaxinfer.runner import Runner
    from jaxinfer.sharding import one_device

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    cfg = ModelConfig(
        model_type=family,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        **(moe if family == "mixtral" else {}),
    )
    model = Model(cfg, init_params(cfg, "bfloat16"), None, jnp.bfloat16, impl="pallas")
    pages = init_pages(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 16, jnp.bfloat16, one_device()
    )
    runner = Runner(
        model.decoder(),
        model.params,
        pages,
        page_size=16,
        max_num_seqs=16,
        max_num_batched_tokens=32,
        max_model_len=256,
    )
    batch = runner._padding_batch(16 if decode else 32, decode)
    forward = lower_for_cuda(
        runner._forward_fn,
        model.params,
        pages,
        runner.prev_tokens,
        batch._replace(sampling=None, history=None, history_is_output=None),
    )
    assert "__gpu$xla.gpu.triton" in forward  # the Pallas kernels, not interpret mode
    assert "stablehlo.while" not in forward and "stablehlo.case" not in forward
    logits = jnp.zeros((16, cfg.vocab_size), jnp.float32)
    for mode in runner.sampler_modes():
        sampler = lower_for_cuda(
            functools.partial(runner._sample_fn, mode=mode), logits, logits, batch.sampling
        )
        assert "stablehlo.while" not in sampler, mode
        assert mode == "filter" or "stablehlo.case" not in sampler, mode
    # the programs that adjust the logits (logit bias, penalty state, penalties)
    programs = runner.warmup_programs()
    for jitted, fn in (
        (runner._add_bias, runner._add_bias_fn),
        (runner._penalty_state, runner._penalty_state_fn),
        (runner._penalize, runner._penalize_fn),
    ):
        args = [a for f, a in programs if f is jitted and a[0].shape[0] == 16][-1]  # the widest
        text = lower_for_cuda(fn, *args)
        assert "stablehlo.while" not in text and "stablehlo.case" not in text, fn
    # past 256 tokens a row, mode "filter" has its branches, and still no loop
    wide = jnp.zeros((16, 1000), jnp.float32)
    sampler = lower_for_cuda(
        functools.partial(runner._sample_fn, mode="filter"), wide, wide, batch.sampling
    )
    assert "stablehlo.case" in sampler and "stablehlo.while" not in sampler


@pytest.mark.parametrize(
    "t,s,h,causal,lse",
    [
        (256, 256, 128, True, False),
        (200, 300, 64, True, True),
        (130, 200, 256, False, True),
        (40, 40, 128, True, False),
    ],
)
def test_mgpu_flash_attention_lowers(t, s, h, causal, lse):
    """The Hopper kernel lowers to one Mosaic GPU custom call (Pallas -> Mosaic GPU IR, layouts
    and barriers checked at lowering), with padding of T and S and T < S."""
    from pallas_kernels.flash_attention_mgpu import MgpuFlashConfig

    fn = functools.partial(
        flash_attention,
        causal=causal,
        return_lse=lse,
        config=MgpuFlashConfig.default(h),
        interpret=False,
    )
    text = lower_for_cuda(fn, spec((2, t, 8, h)), spec((2, s, 2, h)), spec((2, s, 2, h)))
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
