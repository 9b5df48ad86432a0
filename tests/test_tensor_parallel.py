"""Tensor and expert parallelism on 8 fake CPU devices: sharded results equal single-device ones,
the compiled decode step communicates as the Megatron layout says, bad sizes are refused."""

from __future__ import annotations

import collections
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxinfer
from jaxinfer.config import ModelConfig
from jaxinfer.engine import LLM, Engine
from jaxinfer.model import Model, init_params
from jaxinfer.sampling import SamplingParams
from jaxinfer.sharding import MODEL, shard_model

pytestmark = pytest.mark.devices(8)  # the CPU's fake devices

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny(kv_heads: int = 2, layers: int = 2, heads: int = 4, vocab: int = 320, **extra) -> Model:
    cfg = ModelConfig(
        model_type="mixtral" if extra.get("num_experts") else "llama",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=256,
        **extra,
    )
    return Model(cfg, init_params(cfg, "float32", seed=3), None, jnp.float32, "xla")


def prompts(n: int = 5, vocab: int = 320) -> list[list[int]]:
    return [np.random.RandomState(i).randint(0, vocab, 4 + 5 * i).tolist() for i in range(n)]


def hlo_collectives(text: str) -> collections.Counter:
    ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    return collections.Counter(re.findall(rf"= \S+ ({ops})(?:-start)?\(", text))


# -- the model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_model(hf_family):
    family, _, path = hf_family
    return family, jaxinfer.load_model(path, dtype="float32")


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_logits_equal_one_device(family_model, size):
    """Every family at N = 2 and 4 (at 4 each kv head of the K = 1 and 2 families is repeated);
    the MoE families with both expert layouts."""
    family, model = family_model
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 23))
    ref = np.asarray(jaxinfer.forward(model, ids))
    for moe in ("expert", "ffn") if family in MOE_FAMILIES else ("expert",):
        sharded = shard_model(model, size, moe=moe)
        assert sharded.tensor_parallel_size == size
        out = jaxinfer.forward(sharded, ids)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5, err_msg=family)


def test_sharded_generate_equals_one_device(family_model):
    family, model = family_model
    ps = prompts(3, model.config.vocab_size)
    ref = jaxinfer.generate(model, ps, max_new_tokens=10)
    assert jaxinfer.generate(shard_model(model, 2), ps, max_new_tokens=10) == ref, family


def test_params_are_split_as_the_rules_say():
    model = shard_model(tiny(kv_heads=2), 2)
    p = model.params["layers_0"]
    expect = {
        "attn/qkv": PartitionSpec(MODEL, None, None, None),  # kv heads
        "attn/o": PartitionSpec(None, MODEL, None),  # heads: the input axes
        "mlp/gate_up": PartitionSpec(None, None, MODEL),  # F: columns
        "mlp/down": PartitionSpec(MODEL, None),  # F: rows
        "attn_norm/scale": PartitionSpec(None),
    }
    for name, spec in expect.items():
        a, b = name.split("/")
        assert p[a][b].sharding.spec == spec, name
        assert p[a][b].sharding.mesh.shape[MODEL] == 2
    assert model.params["embed"].sharding.spec == PartitionSpec(MODEL, None)  # vocab
    # Each device holds half of a split weight.
    down = p["mlp"]["down"]
    assert {s.data.shape for s in down.addressable_shards} == {(80, 64)}


def test_more_devices_than_kv_heads_repeat_them_in_the_pool():
    """K = 2 at N = 4: the pool has 4 head slots, one per device, and the qkv weight is whole."""
    llm = LLM(model=tiny(kv_heads=2), tensor_parallel_size=4, num_pages=32, max_model_len=128)
    k_pages = llm.engine.runner.pages[0][0]
    assert k_pages.shape[0] == 4
    assert {s.data.shape[0] for s in k_pages.addressable_shards} == {1}
    qkv = llm.engine.model.params["layers_0"]["attn"]["qkv"]
    assert qkv.sharding.spec == PartitionSpec(None, None, None, None)


# -- the engine -----------------------------------------------------------------------------------


def make_llm(model: Model, **options) -> LLM:
    return LLM(
        model=model,
        max_num_seqs=4,
        num_pages=64,
        max_model_len=128,
        max_num_batched_tokens=32,
        **options,
    )


def outputs(llm: LLM, params: SamplingParams):
    return llm.generate(prompts(), params, use_tqdm=False)


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
SAMPLED = SamplingParams(  # over a mesh: drawn among each device's top candidates
    temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=6, logprobs=3, ignore_eos=True
)
NUCLEUS = SamplingParams(  # no top-k: over a mesh the filter gathers the rows
    temperature=1.0, top_p=0.8, min_p=0.01, seed=2, max_tokens=6, ignore_eos=True
)


@pytest.fixture(scope="module")
def one_device_refs():
    """The one-device engine's outputs for GREEDY, SAMPLED and NUCLEUS, once per model (the
    three llama cases below share one model)."""
    refs = {}

    def get(kv_heads: int, extra: dict) -> list:
        key = (kv_heads, tuple(sorted(extra.items())))
        if key not in refs:
            one = make_llm(tiny(kv_heads, layers=1 if extra else 2, **extra), num_decode_steps=1)
            refs[key] = [outputs(one, p) for p in (GREEDY, SAMPLED, NUCLEUS)]
        return refs[key]

    return get


@pytest.mark.parametrize(
    "kv_heads,size,extra,steps",
    [
        (2, 2, {}, 1),
        (2, 2, {}, 4),
        (2, 4, {}, 1),
        (4, 4, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48), 1),
    ],
    ids=["llama-tp2", "llama-tp2-decode-steps", "llama-tp4-repeated-kv", "moe-tp4"],
)
def test_engine_outputs_equal_one_device(one_device_refs, kv_heads, size, extra, steps):
    """Greedy tokens, seeded samples (top-k / top-p: the filter mode) and logprobs; `steps`:
    decode steps a program over the mesh (one device: one a program)."""
    model = tiny(kv_heads, layers=1 if extra else 2, **extra)
    refs = one_device_refs(kv_heads, extra)
    for moe in ("expert", "ffn") if extra else ("expert",):
        llm = make_llm(model, tensor_parallel_size=size, moe_parallel=moe, num_decode_steps=steps)
        for params, ref in zip((GREEDY, SAMPLED, NUCLEUS), refs):
            got = outputs(llm, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in ref], moe
            for a, b in zip(got, ref):
                for x, y in zip(a.logprobs or [], b.logprobs or []):
                    assert x.keys() == y.keys()
                    np.testing.assert_allclose(list(x.values()), list(y.values()), atol=1e-5)


def test_engine_with_pallas_kernels_under_shard_map(one_device_refs):
    """The Pallas paged kernels (interpret mode) and the grouped matmul on each device's shard."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    model = tiny(4, layers=1, **moe)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = one_device_refs(4, moe)[0]  # GREEDY's 10 tokens (the moe-tp4 case's model)
    got = outputs(make_llm(model, tensor_parallel_size=2, attention_impl="pallas"), params)
    assert [o.token_ids for o in got] == [o.token_ids[:6] for o in ref]


def decode_step_hlo(engine: Engine) -> str:
    for fn, args in engine.runner.warmup_programs():
        if fn is engine.runner._forward and args[3].meta.decode:
            return fn.lower(*args).compile().as_text()
    raise AssertionError("no decode program")


@pytest.mark.parametrize(
    "kv_heads,size", [(4, 4), (2, 4), (8, 8)], ids=["split-kv", "repeated-kv", "N=8"]
)
def test_decode_step_all_reduces_twice_a_layer_and_gathers_no_weight(kv_heads, size):
    layers = 3
    engine = Engine(
        tiny(kv_heads, layers=layers, heads=8),
        tensor_parallel_size=size,
        max_num_seqs=4,
        num_pages=32,
        max_model_len=128,
        max_num_batched_tokens=16,
    )
    ops = hlo_collectives(decode_step_hlo(engine))
    # After o and after down in every layer; one more for the vocab-split embedding lookup.
    assert ops["all-reduce"] == 2 * layers + 1, ops
    assert ops["all-gather"] == 0 and ops["all-to-all"] == 0, ops


def test_sampler_gathers_candidates_not_rows():
    """Greedy, plain sampling and top-k filtering on vocab-split logits move [B, devices]-sized
    pieces and the top candidates, never a [B, V] row."""
    engine = Engine(
        tiny(4, vocab=4096),
        tensor_parallel_size=4,
        max_num_seqs=4,
        num_pages=32,
        max_model_len=128,
    )
    modes = ("greedy", "sample", "filter_top_k")
    assert engine.runner.sampler_mode([SAMPLED]) == "filter_top_k"
    assert engine.runner.sampler_mode([SAMPLED, NUCLEUS]) == "filter"
    for fn, args in engine.runner.warmup_programs():
        if fn is engine.runner._sample and args[-1] in modes:
            text = fn.lower(*args).compile().as_text()
            b, v = args[0].shape
            assert f"f32[{b},{v}]" not in " ".join(
                line for line in text.splitlines() if "all-gather" in line
            ), args[-1]


def test_no_compiles_after_start_up():
    """The programs compiled at start-up are the ones the steps use: the forward pins its
    logits to the vocab-split layout the sampler and the programs that adjust them (logit
    bias, min_tokens, penalties) were compiled for."""
    engine = Engine(
        tiny(4),
        tensor_parallel_size=2,
        max_num_seqs=4,
        num_pages=32,
        max_model_len=128,
        max_num_batched_tokens=16,
        warmup=True,
    )
    compiles = engine.runner.num_compiles
    options = ({}, {"logit_bias": {3: 5.0}, "min_tokens": 2}, {"repetition_penalty": 1.5})
    for i, (prompt, extra) in enumerate(zip(prompts(3), options)):
        params = SamplingParams(max_tokens=4, temperature=i / 2, **extra)
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.num_compiles == compiles


# -- bad sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,message",
    [
        (
            3,
            r"does not split this model's 4 query heads and 2 kv heads evenly: use one of \[1, 2, 4\]",
        ),
        (16, r"tensor_parallel_size 16"),
        (0, r"must be an integer >= 1"),
    ],
)
def test_bad_sizes_say_what_would_work(size, message):
    with pytest.raises(ValueError, match=message):
        shard_model(tiny(2), size)


def test_more_devices_than_exist_is_refused():
    model = tiny(kv_heads=1)
    cfg = model.config.__class__(**{**model.config.to_dict(), "num_heads": 16})
    with pytest.raises(
        ValueError, match=r"needs 16 devices but 8 exist: use one of \[1, 2, 4, 8\]"
    ):
        jaxinfer.sharding.check_tensor_parallel(cfg, 16)


def test_expert_parallel_needs_divisible_experts():
    model = tiny(4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48)
    with pytest.raises(ValueError, match="6 experts to divide evenly: use moe='ffn'"):
        shard_model(model, 4)
    assert shard_model(model, 4, moe="ffn").tensor_parallel_size == 4


def test_moe_refusals_advise_only_what_would_work():
    """4 experts of width 36 over 8 devices: neither layout splits them, so neither message
    sends the user to the other (they used to point at each other)."""
    model = tiny(4, heads=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=36)
    for moe in ("expert", "ffn"):
        with pytest.raises(ValueError, match="to divide evenly: use a size that divides") as e:
            shard_model(model, 8, moe=moe)
        assert "use moe=" not in str(e.value)


def test_data_parallel_names_a_tensor_parallel_size_that_cannot_fit():
    with pytest.raises(ValueError, match="tensor_parallel_size 16 needs that many devices but 8"):
        make_llm(tiny(2), tensor_parallel_size=16, data_parallel_size=2)


def test_moe_layout_asked_without_a_size_is_applied():
    """moe_parallel alone re-splits a model's experts over the devices it is on (a replica's
    too); left out, the model keeps its own layout; an unknown one is refused."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    model = shard_model(tiny(4, layers=1, **moe), 2, moe="expert")
    assert make_llm(model).engine.model.parallel.moe == "expert"
    engine = make_llm(model, moe_parallel="ffn").engine
    assert engine.model.parallel.moe == "ffn"
    assert engine.model.parallel.mesh == model.parallel.mesh
    replicas = make_llm(tiny(4, layers=1, **moe), moe_parallel="ffn", data_parallel_size=2)
    devices = [
        {d.id for d in e.model.params["embed"].sharding.device_set} for e in replicas.engines
    ]
    assert devices == [{0}, {1}]
    assert [e.model.parallel.moe for e in replicas.engines] == ["ffn", "ffn"]
    with pytest.raises(ValueError, match="moe_parallel must be one of"):
        make_llm(model, moe_parallel="experts")


def test_sharded_model_back_on_one_device():
    model = tiny(2)
    back = shard_model(shard_model(model, 2), 1)
    assert back.parallel.mesh is None
    ids = np.asarray(prompts(1)[0])[None]
    np.testing.assert_allclose(
        np.asarray(jaxinfer.forward(back, ids)), np.asarray(jaxinfer.forward(model, ids)), atol=1e-6
    )


def test_default_sizes_read_the_memory_of_the_mesh_cards(monkeypatch):
    """An engine left to size itself asks for the memory of the cards its mesh spans (the least
    of them), not of the default device alone."""
    import jaxinfer.engine as engine_module

    asked = []

    def memory(devices=None):
        asked.append(None if devices is None else sorted(d.id for d in devices))
        return None  # unknown, as on a CPU

    monkeypatch.setattr(engine_module, "device_memory_bytes", memory)
    Engine(tiny(4), tensor_parallel_size=4, num_pages=32, max_model_len=128)
    assert asked == [sorted(d.id for d in jax.devices()[:4])]


def test_no_code_picks_the_first_device_by_hand():
    """Placement goes through sharding.py or `default_device()`, never `jax.devices()[0]`."""
    root = pathlib.Path(__file__).resolve().parent.parent
    for folder in ("jaxinfer", "pallas_kernels", "scripts"):
        for path in (root / folder).rglob("*.py"):
            assert "jax.devices()[0]" not in path.read_text(), path


def test_mesh_argument_and_size_must_agree():
    mesh = jaxinfer.sharding.make_mesh(2)
    model = shard_model(tiny(2), mesh=mesh)
    assert model.parallel.mesh == mesh
    with pytest.raises(ValueError, match="differs from the mesh's size 2"):
        shard_model(tiny(2), 4, mesh=mesh)
    weights = model.params["layers_0"]["mlp"]["down"]
    assert isinstance(weights.sharding, NamedSharding)
    assert jax.tree.leaves(model.params)[0].sharding.mesh == mesh


# -- data parallel replicas -----------------------------------------------------------------------


def test_data_parallel_replicas_equal_one_engine():
    """Two replicas of N = 2 on devices 0-1 and 2-3; unseeded samples too (one seed stream)."""
    model = tiny(2)
    sampled = SamplingParams(temperature=0.9, max_tokens=6, ignore_eos=True)
    one = make_llm(model)
    refs = [outputs(one, p) for p in (GREEDY, sampled)]
    llm = make_llm(model, tensor_parallel_size=2, data_parallel_size=2)
    devices = [{d.id for d in e.model.params["embed"].sharding.device_set} for e in llm.engines]
    assert devices == [{0, 1}, {2, 3}]
    for params, ref in zip((GREEDY, sampled), refs):
        got = outputs(llm, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert all(e.stats["steps"] > 0 for e in llm.engines)  # both did work


def test_data_parallel_needs_the_devices():
    with pytest.raises(
        ValueError, match=r"needs 12 devices but 8 exist: use data_parallel_size <= 2"
    ):
        make_llm(tiny(2), tensor_parallel_size=4, data_parallel_size=3)


@pytest.mark.parametrize("moe", ["expert", "ffn"])
def test_eight_devices_equal_one(moe):
    """N = 8: 8 query heads over 2 kv heads (each repeated 4 times), 8 experts one per device
    (or every expert's width split 8 ways)."""
    model = tiny(2, heads=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    ids = np.random.RandomState(5).randint(0, 320, (2, 9))
    ref = np.asarray(jaxinfer.forward(model, ids))
    out = jaxinfer.forward(shard_model(model, 8, moe=moe), ids)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    ps = prompts(2)
    assert jaxinfer.generate(shard_model(model, 8, moe=moe), ps, max_new_tokens=6) == (
        jaxinfer.generate(model, ps, max_new_tokens=6)
    )


def test_sharded_generate_samples_like_one_device():
    """`generate()` with top-k (drawn among each device's candidates) and with top-p alone (the
    rows gathered) on a vocab-split model: the one-device samples, seed for seed."""
    model = tiny(2, vocab=2048)
    sharded = shard_model(model, 4)
    ps = prompts(3, 2048)
    for options in (dict(top_k=40, top_p=0.9), dict(top_p=0.8)):
        ref = jaxinfer.generate(model, ps, max_new_tokens=8, temperature=0.9, seed=7, **options)
        got = jaxinfer.generate(sharded, ps, max_new_tokens=8, temperature=0.9, seed=7, **options)
        assert got == ref, options
