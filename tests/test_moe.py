"""The sparse MoE dispatch against the dense reference, on routings with empty and crowded experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.moe import dispatch, moe_reference, route


def _weights(e=4, d=16, f=24, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (e, d, 2, f)) * 0.3, jax.random.normal(k2, (e, f, d)) * 0.3)


@pytest.mark.parametrize("routing", ["random", "one_expert_takes_all", "some_empty"])
def test_dispatch_matches_dense_reference(routing):
    t, e, k = 13, 4, 2
    gate_up, down = _weights(e)
    x = jax.random.normal(jax.random.key(1), (t, 16))
    rng = np.random.RandomState(2)
    if routing == "random":
        experts = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    elif routing == "one_expert_takes_all":  # expert 2 gets every token, expert 0 every second one
        experts = np.stack([[2, 0 if i % 2 else 3] for i in range(t)])
    else:  # experts 1 and 3 get nothing
        experts = np.stack([[0, 2]] * t)
    weights = jax.nn.softmax(jnp.asarray(rng.randn(t, k)), axis=-1)
    experts = jnp.asarray(experts, jnp.int32)
    ours = dispatch(x, weights, experts, gate_up, down, impl="xla")
    ref = moe_reference(x, weights, experts, gate_up, down)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_route_renormalises_top_k():
    logits = jnp.asarray([[3.0, 1.0, 2.0, 0.0]])
    w, ex = route(logits, 2, normalize=True)
    assert ex.tolist() == [[0, 2]]
    np.testing.assert_allclose(np.asarray(w), [[np.e / (np.e + 1), 1 / (np.e + 1)]], rtol=1e-6)
    w, _ = route(logits, 2, normalize=False)
    p = np.exp([3.0, 1.0, 2.0, 0.0]) / np.exp([3.0, 1.0, 2.0, 0.0]).sum()
    np.testing.assert_allclose(np.asarray(w), [[p[0], p[2]]], rtol=1e-6)


def test_dispatch_holds_no_dense_expert_tensor():
    """The dispatch's program holds nothing of shape [tokens, experts, ...]."""
    t, e = 64, 8
    gate_up, down = _weights(e)
    x = jnp.zeros((t, 16))
    experts = jnp.zeros((t, 2), jnp.int32)
    text = (
        jax.jit(lambda *a: dispatch(*a, impl="xla"))
        .lower(x, jnp.ones((t, 2)), experts, gate_up, down)
        .as_text()
    )
    assert f"{t}x{e}x" not in text and f"[{t},{e}," not in text


@pytest.mark.parametrize("decode_steps", [1, 4], ids=["single-steps", "4-step-programs"])
def test_mixtral_through_the_engine_equals_generate(tmp_path, decode_steps):
    """Greedy tokens of the engine, one step a program and 4 decode steps a program (the
    sparse dispatch inside the device-side loop), are generate()'s."""
    from conftest import build_hf_model

    import jaxinfer

    build_hf_model("mixtral", tmp_path)
    model = jaxinfer.load_model(tmp_path, dtype="float32")
    rng = np.random.RandomState(7)
    prompts = [rng.randint(0, model.config.vocab_size, n).tolist() for n in (3, 21, 9)]
    expected = [jaxinfer.generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    llm = jaxinfer.LLM(
        model=model,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        num_pages=16,
        warmup=False,
        attention_impl="xla",
        num_decode_steps=decode_steps,
    )
    outs = llm.generate(
        prompts,
        jaxinfer.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.token_ids for o in outs] == expected
    programs = llm.engine.stats["decode_row_steps"]
    assert (programs > 0) == (decode_steps > 1)  # the 4-step case ran multi-step programs


def _tiny_moe_config():
    from jaxinfer.config import ModelConfig

    return ModelConfig(
        model_type="mixtral",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
    )


def test_moe_sows_its_routing():
    """Applied with mutable intermediates, the MoE block records each token's top-k experts
    (what bench_generate counts): those of route() on its router logits."""
    import flax.linen as nn

    from jaxinfer.models.moe import MoE

    cfg = _tiny_moe_config()
    block = MoE(cfg, jnp.float32, "xla")
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
    _, state = block.apply({"params": params}, x, mutable=["intermediates"])
    (sown,) = state["intermediates"]["experts"]
    _, expected = route(x.reshape(10, 16) @ params["router"], 2, cfg.norm_topk_prob)
    assert sown.shape == (2, 5, 2)
    np.testing.assert_array_equal(np.asarray(sown).reshape(10, 2), np.asarray(expected))
    assert block.apply({"params": params}, x).shape == x.shape  # not mutable: no state, no error


@pytest.fixture
def expert_rows(monkeypatch):
    """The rows every grouped matmul of the MoE dispatch gets, in call order (a callback, so
    jitted layers report too; read after `jax.effects_barrier()`)."""
    from jaxinfer.models import moe

    rows, real = [], moe.grouped_matmul

    def counting(lhs, rhs, sizes, impl):
        jax.debug.callback(lambda n: rows.append(int(n)), jnp.sum(sizes))
        return real(lhs, rhs, sizes, impl)

    monkeypatch.setattr(moe, "grouped_matmul", counting)
    return rows


def test_padding_tokens_add_no_expert_rows(expert_rows):
    """Tokens marked not valid (a bucket's padding) reach no expert: the grouped matmuls get
    only the valid tokens' pairs, the valid tokens' outputs are those of the unmasked block, and
    the padding's output is 0."""
    import flax.linen as nn

    from jaxinfer.models import moe

    cfg = _tiny_moe_config()
    block = moe.MoE(cfg, jnp.float32, "xla")
    x = jax.random.normal(jax.random.key(0), (1, 12, 16))
    valid = (jnp.arange(12) < 7)[None]  # 7 real tokens, 5 of padding
    params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
    jax.effects_barrier()
    expert_rows.clear()  # init's own dispatch
    full = block.apply({"params": params}, x)
    masked = block.apply({"params": params}, x, valid)
    jax.effects_barrier()
    assert expert_rows == [24, 24, 14, 14]  # 12 tokens x top-2, then only the 7 real ones
    np.testing.assert_allclose(np.asarray(masked[0, :7]), np.asarray(full[0, :7]), rtol=1e-6)
    assert not np.any(np.asarray(masked[0, 7:]))


def test_generate_prefill_gives_prompt_padding_no_expert_rows(tmp_path, expert_rows):
    """generate()'s prefill of right-padded prompts routes only the real tokens to experts, and
    its last-token logits are those of each prompt alone."""
    from conftest import build_hf_model

    import jaxinfer
    from jaxinfer.generate import prefill
    from jaxinfer.models.llama import init_cache

    build_hf_model("mixtral", tmp_path)
    model = jaxinfer.load_model(tmp_path, dtype="float32")
    k = model.config.num_experts_per_tok
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, model.config.vocab_size, n).tolist() for n in (3, 8)]
    tokens = jnp.asarray([p + [0] * (8 - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.asarray([3, 8], jnp.int32)
    decoder = model.decoder(None)
    cache = init_cache(model.config, 2, 16, jnp.float32)
    logits, _ = jax.block_until_ready(prefill(decoder, model.params, cache, tokens, lengths))
    jax.effects_barrier()
    # every layer's gate_up and down: the 11 real tokens only
    assert set(expert_rows) == {(3 + 8) * k}
    for i, p in enumerate(prompts):
        alone, _ = prefill(
            decoder,
            model.params,
            init_cache(model.config, 1, 16, jnp.float32),
            jnp.asarray([p]),
            jnp.asarray([len(p)]),
        )
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(alone[0]), atol=1e-4)


def test_bench_check_reports_routing_agreement():
    """The benchmark's whole-model check (bench_generate): in f32 every impl routes exactly as the reference
    (agreement 1.0 in each layer, logits within 1e-5); the decode-routing count of a batch of
    one is exactly top-k."""
    from jaxinfer.benchmark import check_impls, random_model, routed_experts

    model = random_model("tiny-moe", "float32", layers=3)
    cfg = model.config
    report = check_impls(model, ["xla"], np.random.RandomState(0))
    assert report["routing_agreement_by_layer"]["xla"] == [1.0, 1.0, 1.0]
    assert report["argmax_agreement"]["xla"] == 1.0
    assert report["rel_error_vs_reference"]["xla"] < 1e-5
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 12)), jnp.int32)
    assert routed_experts(model, tokens, last=4) == cfg.num_experts_per_tok
    assert (
        cfg.num_experts_per_tok
        < routed_experts(model, jnp.tile(tokens, (4, 1)).at[:, 0].set(jnp.arange(4)), last=4)
        <= cfg.num_experts
    )
