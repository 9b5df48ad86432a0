"""Shared fixtures: tiny random HF models saved to temp dirs, one per supported family."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import zlib

# Fake CPU devices for sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Engines in tests keep no on-disk compilation cache (one test turns it on for itself).
os.environ["JAXINFER_COMPILATION_CACHE"] = ""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "devices(n): needs n JAX devices; skipped where fewer exist (one GPU)"
    )


def pytest_runtest_setup(item):
    """A test marked `devices(n)` runs on the CPU's 8 fake devices and is skipped, naming why, on
    an accelerator with fewer (the tests also run on one GPU, with JAX_PLATFORMS=cuda). On the
    CPU too few devices fail it: the fake devices were lost, and a skip would hide the test."""
    mark = item.get_closest_marker("devices")
    if mark is None:
        return
    import jax

    need, have = mark.args[0], jax.device_count()
    if have >= need:
        return
    if jax.default_backend() == "cpu":
        pytest.fail(f"needs {need} JAX devices, {have} exist: XLA_FLAGS should fake 8 on the CPU")
    pytest.skip(f"needs {need} JAX devices, {have} exist")


@pytest.fixture(autouse=True, scope="session")
def _one_compilation_cache(tmp_path_factory):
    """One on-disk compilation cache for the whole run: the suite's many engines of the same tiny
    models compile the same programs, and loading one is faster than compiling it again. A
    program loaded from it still counts as a compilation in `xla_compiles` (JAX logs both alike).
    $JAXINFER_TEST_COMPILATION_CACHE=0 leaves it off."""
    if os.environ.get("JAXINFER_TEST_COMPILATION_CACHE") == "0":
        yield
        return
    import jax
    from jax._src import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX memoises whether the cache is in use
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module: a CPU executable keeps its JIT'd code
    mapped, and the whole suite's hundreds of programs in one process crashed XLA's CPU compiler."""
    yield
    import jax

    jax.clear_caches()


TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)

FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=1, head_dim=32, sliding_window=None),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
        ),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
        ),
    ),
}


def load_script(name: str):
    """`scripts/<name>.py` as a module, for tests that call its functions."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@contextlib.contextmanager
def xla_compiles():
    """Counts the XLA compilations inside the block by program name ("jit(_decode_fn)": 2), from
    JAX's compile log: a program traced once but compiled twice (another argument placement)
    counts twice here, where a trace counter sees one."""
    import jax

    counts = collections.Counter()

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of "):
                counts[message.removeprefix("Finished XLA compilation of ").split(" in ")[0]] += 1

    handler, log = Handler(), logging.getLogger("jax")
    log.addHandler(handler)
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # process-wide: the warm-up compiles in threads
    try:
        yield counts
    finally:
        jax.config.update("jax_log_compiles", was)
        log.removeHandler(handler)


def build_hf_model(family: str, path, **overrides):
    """Builds a random float32 HF model of `family`, perturbs its norms and biases, saves it."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(zlib.crc32(family.encode()) % 1000)  # the same model in every run
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def hf_family(request, tmp_path_factory):
    """(family name, torch model, saved directory) for each family, built once per session."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, build_hf_model(request.param, path), path
