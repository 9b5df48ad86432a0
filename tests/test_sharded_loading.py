"""Loading at scale: every tensor goes straight into its shards, one param at a time, cast on
its devices; host memory beyond the placed params stays within a small multiple of the largest
tensor; a layout that cannot split the model fails before any tensor is read."""

from __future__ import annotations

import json
import tracemalloc

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxinfer
from jaxinfer.checkpoint import hf_layout
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import load_shardings

pytestmark = pytest.mark.devices(8)  # the CPU's fake devices

# Small, but with tensors large enough (8 MiB at most, 74 MiB in all) that loading everything
# before placing it would show: the bound below is well under the whole model.
CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
SLACK = 4 << 20  # traced Python allocations of the load itself (tracing eval_shape, pytrees)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An HF directory of random float32 tensors, named and shaped as `hf_layout` reads them."""
    path = tmp_path_factory.mktemp("hf-sharded")
    (path / "config.json").write_text(json.dumps(CONFIG))
    rng = np.random.default_rng(0)
    names = {n: s for e in hf_layout(ModelConfig.from_hf(CONFIG)) for n, s in e.sources}
    save_file(
        {n: rng.standard_normal(s, dtype=np.float32) for n, s in names.items()},
        path / "model.safetensors",
    )
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    """The params loaded on one device, as host arrays."""
    model = jaxinfer.load_model(hf_dir, dtype="float32")
    return model, jax.tree.map(np.asarray, model.params)


def largest_tensor_bytes(hf_dir) -> int:
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", framework="numpy") as f:
        return max(4 * int(np.prod(f.get_slice(n).get_shape())) for n in f.keys())


def traced_load(path, **options):
    """(the model, the peak of numpy and Python host allocations while loading it)."""
    tracemalloc.start()
    try:
        model = jaxinfer.load_model(path, **options)
        return model, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_placed(model, expected_params, dtype):
    """Every param equals `expected_params` (cast to `dtype`) and sits on its load sharding."""
    shardings = load_shardings(model.config, dtype, model.parallel)
    got = jax.tree.leaves(model.params)
    assert len(got) == len(jax.tree.leaves(expected_params))
    for x, want, where in zip(got, jax.tree.leaves(expected_params), jax.tree.leaves(shardings)):
        assert x.sharding == where, (x.sharding, where)
        assert x.dtype == dtype
        np.testing.assert_array_equal(np.asarray(x), want.astype(dtype))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_safetensors_load_straight_into_shards(hf_dir, reference, tp):
    model, peak = traced_load(hf_dir, dtype="float32", tensor_parallel_size=tp)
    assert model.tensor_parallel_size == tp
    assert_placed(model, reference[1], np.float32)
    if tp > 1:  # the projections really are split: each device holds 1/tp of qkv
        qkv = model.params["layers_0"]["attn"]["qkv"]
        assert qkv.addressable_shards[0].data.shape == (4 // tp, 4, 64, 512)
    largest = largest_tensor_bytes(hf_dir)
    print(f"tp={tp}: peak {peak / 2**20:.1f} MiB, largest tensor {largest / 2**20:.1f} MiB")
    assert peak < 3 * largest + SLACK, (peak / 2**20, largest / 2**20)


def test_cast_per_tensor_into_shards(hf_dir, reference):
    """bfloat16 from float32 files: each param cast as it is placed, never the whole tree."""
    model, peak = traced_load(hf_dir, dtype="bfloat16", tensor_parallel_size=2)
    assert_placed(model, reference[1], jax.numpy.bfloat16)
    assert peak < 3 * largest_tensor_bytes(hf_dir) + SLACK


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_and_biases_load_into_shards(tmp_path, family):
    """Expert stacks split by expert or by F, Qwen2-MoE's shared expert and q/k/v biases."""
    from conftest import build_hf_model

    build_hf_model(family, tmp_path)
    want = jax.tree.map(np.asarray, jaxinfer.load_model(tmp_path, dtype="float32").params)
    for moe in ("expert", "ffn"):
        model = jaxinfer.load_model(tmp_path, dtype="float32", tensor_parallel_size=2, moe=moe)
        assert model.parallel.moe == moe
        assert_placed(model, want, np.float32)


def test_orbax_restores_each_shard(hf_dir, reference, tmp_path):
    jaxinfer.save_checkpoint(reference[0], tmp_path / "ckpt")
    model = jaxinfer.load_model(tmp_path / "ckpt", dtype="float32", tensor_parallel_size=2)
    assert model.tensor_parallel_size == 2
    assert_placed(model, reference[1], np.float32)
    model = jaxinfer.load_model(tmp_path / "ckpt", dtype="bfloat16", tensor_parallel_size=4)
    assert_placed(model, reference[1], jax.numpy.bfloat16)


def test_gguf_loads_into_shards(tmp_path):
    from test_gguf import TINY, tiny_hf_tensors, write_gguf

    def tokenizer(w):  # load_model builds the file's tokenizer too
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(TINY["vocab"])])

    tensors = {k: v for k, v in tiny_hf_tensors(False).items() if "bias" not in k}
    write_gguf(tmp_path / "tiny.gguf", tensors, configure=tokenizer)
    one = jaxinfer.load_model(tmp_path / "tiny.gguf", dtype="float32")
    two = jaxinfer.load_model(tmp_path / "tiny.gguf", dtype="float32", tensor_parallel_size=2)
    assert_placed(two, jax.tree.map(np.asarray, one.params), np.float32)


@pytest.mark.parametrize(
    "tp, message",
    [
        (3, "tensor_parallel_size 3 does not split this model's 8 query heads"),
        (0, "tensor_parallel_size must be an integer >= 1"),
    ],
)
@pytest.mark.parametrize("tied", [False, True])  # tied: the lm_head check reads no garbage
def test_bad_layout_fails_before_any_tensor_is_read(tmp_path, tp, message, tied):
    """The config alone decides: a garbage weights file is never opened."""
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": tied}))
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(3).bytes(5000))
    with pytest.raises(ValueError, match=message):
        jaxinfer.load_model(tmp_path, dtype="float32", tensor_parallel_size=tp)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        jaxinfer.load_model(tmp_path, dtype="float32", tensor_parallel_size=2)
