"""The decoder against HF transformers on tiny random models of every supported family (float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_hf_model

import jaxinfer


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def loaded(hf_family):
    family, hf_model, path = hf_family
    return family, hf_model, jaxinfer.load_model(path, dtype="float32")


def test_logits_match_hf(loaded):
    family, hf_model, model = loaded
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (3, 37))
    ours = np.asarray(jaxinfer.forward(model, ids))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert ours.shape == ref.shape == (3, 37, model.config.vocab_size)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), family


def test_greedy_tokens_match_hf(loaded):
    family, hf_model, model = loaded
    prompt = np.random.RandomState(2).randint(0, model.config.vocab_size, 11).tolist()
    (ours,) = jaxinfer.generate(model, [prompt], max_new_tokens=32)
    assert ours == hf_greedy(hf_model, prompt, 32), family


def test_one_token_projections_as_row_reductions_match_hf(loaded, monkeypatch):
    """`layers.dense`'s row-reduction form (on by default on a GPU), forced here: the one-token
    decode steps of a batch of one take it, the prefill does not."""
    family, hf_model, model = loaded
    monkeypatch.setenv("JAXINFER_ROW_GEMV", "1")
    assert model.decoder().row_gemv
    prompt = np.random.RandomState(2).randint(0, model.config.vocab_size, 11).tolist()
    (ours,) = jaxinfer.generate(model, [prompt], max_new_tokens=32)
    assert ours == hf_greedy(hf_model, prompt, 32), family
    one = np.array([[prompt[0]]])
    logits = np.asarray(jaxinfer.forward(model, one))
    with torch.no_grad():
        ref = hf_model(torch.tensor(one)).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max(), family


def test_batch_of_uneven_prompts_equals_each_alone(loaded):
    _, _, model = loaded
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, model.config.vocab_size, n).tolist() for n in (1, 9, 70, 4)]
    batched = jaxinfer.generate(model, prompts, max_new_tokens=12)
    alone = [jaxinfer.generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


def test_stream_equals_generate(loaded):
    _, _, model = loaded
    prompt = [5, 17, 42, 7]
    assert (
        list(jaxinfer.stream(model, prompt, max_new_tokens=10))
        == jaxinfer.generate(model, [prompt], max_new_tokens=10)[0]
    )


def test_stop_token_ends_generation(loaded):
    _, _, model = loaded
    prompt = [3, 1, 4, 1, 5]
    (full,) = jaxinfer.generate(model, [prompt], max_new_tokens=16)
    stop = full[5]
    first = full.index(stop)
    (stopped,) = jaxinfer.generate(model, [prompt], max_new_tokens=16, stop_token_ids=[stop])
    assert stopped == full[: first + 1]  # the stop token ends the output and is kept
    assert list(jaxinfer.stream(model, prompt, max_new_tokens=16, stop_token_ids=[stop])) == stopped


# The sampler does not depend on the family (each family's own tokens are checked against HF
# above): one dense family and one MoE family.
@pytest.mark.parametrize("hf_family", ["llama3", "qwen3_moe"], indirect=True)
def test_sampling_is_seeded_and_top_k_1_is_greedy(loaded):
    _, _, model = loaded
    prompt = [9, 8, 7]
    greedy = jaxinfer.generate(model, [prompt], max_new_tokens=8)
    assert jaxinfer.generate(model, [prompt], max_new_tokens=8, temperature=1.0, top_k=1) == greedy
    a = jaxinfer.generate(model, [prompt] * 2, max_new_tokens=8, temperature=1.5, seed=7)
    b = jaxinfer.generate(model, [prompt] * 2, max_new_tokens=8, temperature=1.5, seed=7)
    c = jaxinfer.generate(model, [prompt] * 2, max_new_tokens=8, temperature=1.5, seed=8)
    assert a == b and a != c
    assert all(0 <= t < model.config.vocab_size for row in a + c for t in row)
    nucleus = jaxinfer.generate(model, [prompt], max_new_tokens=8, temperature=1.0, top_p=1e-6)
    assert nucleus == greedy  # a vanishing nucleus keeps only the most likely token


def test_sharded_safetensors_and_bf16(tmp_path):
    hf_model = build_hf_model("llama3", tmp_path / "m")
    hf_model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = np.arange(20)[None] % 300
    a = jaxinfer.load_model(tmp_path / "m", dtype="float32")
    b = jaxinfer.load_model(tmp_path / "sharded", dtype="float32")
    np.testing.assert_array_equal(jaxinfer.forward(a, ids), jaxinfer.forward(b, ids))
    half = jaxinfer.load_model(tmp_path / "m", dtype="bfloat16")
    assert half.params["embed"].dtype == np.dtype("bfloat16")
    ref = np.asarray(jaxinfer.forward(a, ids))
    err = np.abs(np.asarray(jaxinfer.forward(half, ids)) - ref).max() / np.abs(ref).max()
    assert err < 5e-2


def test_a_tied_config_with_its_own_lm_head_uses_it_as_transformers_does(tmp_path):
    """Some fine-tunes keep `tie_word_embeddings: true` and ship an lm_head unlike the embedding:
    transformers then leaves the two untied, and so does the loader; an equal head stays tied."""
    import transformers
    from safetensors.numpy import load_file, save_file

    build_hf_model("tied", tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.copy()}, file, metadata={"format": "pt"})
    assert jaxinfer.load_model(tmp_path, dtype="float32").config.tie_word_embeddings
    head = np.random.RandomState(0).normal(0, 0.1, embed.shape).astype(embed.dtype)
    save_file({**tensors, "lm_head.weight": head}, file, metadata={"format": "pt"})
    model = jaxinfer.load_model(tmp_path, dtype="float32")
    assert not model.config.tie_word_embeddings
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    np.testing.assert_array_equal(hf_model.lm_head.weight.detach().numpy(), head)
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 9))
    ours = np.asarray(jaxinfer.forward(model, ids))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_orbax_checkpoint_round_trip(tmp_path):
    build_hf_model("qwen2", tmp_path / "hf")
    model = jaxinfer.load_model(tmp_path / "hf", dtype="float32")
    jaxinfer.save_checkpoint(model, tmp_path / "ckpt")
    back = jaxinfer.load_model(tmp_path / "ckpt", dtype="float32")
    assert back.config == model.config
    ids = np.arange(15)[None]
    np.testing.assert_array_equal(jaxinfer.forward(back, ids), jaxinfer.forward(model, ids))
    with pytest.raises(ValueError, match="not empty"):
        jaxinfer.save_checkpoint(model, tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------------
# Bad inputs: each a ValueError that says what is wrong.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_hf_model("llama2", path)
    return path, jaxinfer.load_model(path, dtype="float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[]]), "prompt 0 must be a non-empty"),
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[1, 2], [1, 400]]), "token id 400 is outside"),
        (dict(prompts=[[1] * 250]), "exceeds the model's context of 256"),
        (dict(prompts=[[1]], temperature=-0.5), "temperature must be a finite float32 number >= 0"),
        (dict(prompts=[[1]], top_p=0.0), r"top_p must be a finite float32 number in \(0.0, 1.0\]"),
        (dict(prompts=[[1]], top_p=1.5), r"top_p must be a finite float32 number in \(0.0, 1.0\]"),
        (dict(prompts=[[1]], top_k=-2), "top_k must be"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be"),
    ],
)
def test_generate_rejects_bad_input(tiny, kwargs, message):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxinfer.generate(tiny[1], **kwargs)


def test_forward_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match=r"non-empty \[B, T\]"):
        jaxinfer.forward(tiny[1], np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="exceed the context"):
        jaxinfer.forward(tiny[1], np.zeros((1, 300), np.int32))


def test_load_rejects_bad_paths_and_configs(tmp_path, tiny):
    with pytest.raises(ValueError, match="does not exist"):
        jaxinfer.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a model"):
        jaxinfer.load_model(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        jaxinfer.load_model(corrupt)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        jaxinfer.load_model(tiny[0], dtype="int8")


def _edited_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda c: c.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (
            lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
            "'yarn' is not supported",
        ),
        (
            lambda c: c.update(
                partial_rotary_factor=0.5, rope_parameters={"rope_type": "linear", "factor": 2.0}
            ),
            "partial_rotary_factor 0.5 with rope_type 'linear' is not supported",
        ),
        (lambda c: c.pop("hidden_size"), "missing the required field 'hidden_size'"),
        (lambda c: c.update(hidden_size=128), r"has shape \(320, 64\), expected \(320, 128\)"),
        (lambda c: c.update(num_hidden_layers=3), "num_hidden_layers = 3, but the checkpoint"),
        (lambda c: c.update(num_hidden_layers=1), r"tensors hold 2 \(indices 0-1\)"),
        # counted against the tensors' names before anything is built per layer (it hung)
        (lambda c: c.update(num_hidden_layers=10**9), "num_hidden_layers = 1000000000"),
    ],
)
def test_bad_configs_and_tensors_are_named(tmp_path, tiny, edit, message):
    with pytest.raises(ValueError, match=message):
        jaxinfer.load_model(_edited_copy(tiny[0], tmp_path / "m", edit), dtype="float32")


TINY_LLAMA_CONFIG = dict(
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=64,
)


def test_config_defaults_and_rope_precedence_follow_transformers():
    """What a config.json leaves out takes transformers' default for its model_type, and where
    both RoPE forms are given, transformers' choice: the legacy rope_scaling over
    rope_parameters, a theta inside the parameters over the top-level one."""
    from jaxinfer.config import ModelConfig

    base = dict(TINY_LLAMA_CONFIG, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    mixtral = ModelConfig.from_hf(base)
    assert (mixtral.rms_norm_eps, mixtral.rope_theta) == (1e-5, 1e6)
    llama = ModelConfig.from_hf({**base, "model_type": "llama"})
    assert (llama.rms_norm_eps, llama.rope_theta) == (1e-6, 10000.0)
    both = ModelConfig.from_hf(
        {
            **base,
            "model_type": "llama",
            "rope_theta": 5.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
        }
    )
    assert both.rope_theta == 7.0 and both.rope_scaling is None
    legacy = ModelConfig.from_hf(
        {
            **base,
            "model_type": "llama",
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
        }
    )
    assert legacy.rope_scaling.rope_type == "linear" and legacy.rope_scaling.factor == 2.0


def test_a_mixtral_config_of_a_billion_experts_is_refused_at_once(tmp_path):
    build_hf_model("mixtral", tmp_path / "hf")
    path = _edited_copy(
        tmp_path / "hf", tmp_path / "m", lambda c: c.update(num_local_experts=10**9)
    )
    with pytest.raises(ValueError, match="the expert count = 1000000000, but the checkpoint's"):
        jaxinfer.load_model(path, dtype="float32")


def test_a_tied_config_with_a_misshapen_lm_head_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    build_hf_model("tied", tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    head = np.zeros((330, tensors["model.embed_tokens.weight"].shape[1]), np.float32)
    save_file({**tensors, "lm_head.weight": head}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(330, 64\), expected"):
        jaxinfer.load_model(tmp_path, dtype="float32")


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize(
    "top, rope",
    [
        ({}, LLAMA3_ROPE),  # none given: max_position_embeddings
        ({}, {**LLAMA3_ROPE, "original_max_position_embeddings": 32}),
        # a top-level one is Phi-3's place; transformers' Llama does not read it
        ({"original_max_position_embeddings": 16}, LLAMA3_ROPE),
        (
            {"original_max_position_embeddings": 16},
            {**LLAMA3_ROPE, "original_max_position_embeddings": 32},
        ),
    ],
)
def test_llama3_rope_takes_its_pretraining_length_where_transformers_does(top, rope):
    import transformers

    from jaxinfer.config import ModelConfig

    hf = dict(TINY_LLAMA_CONFIG, rope_scaling=rope, **top)
    theirs = transformers.LlamaConfig(**hf).rope_parameters["original_max_position_embeddings"]
    assert ModelConfig.from_hf(hf).rope_scaling.original_max_position_embeddings == theirs


@pytest.mark.parametrize(
    "rope, missing",
    [
        ({k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}, "low_freq_factor"),
        ({k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}, "factor"),
        ({"rope_type": "linear"}, "factor"),
    ],
)
def test_rope_scaling_without_a_required_key_is_refused(rope, missing):
    """transformers refuses these too; a default would be a guess (linear without a factor was
    no scaling at all)."""
    from jaxinfer.config import ModelConfig

    hf = dict(TINY_LLAMA_CONFIG, rope_scaling=rope)
    with pytest.raises(ValueError, match=f"needs {missing}"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(sliding_window="x"), "config has a value of the wrong type"),
        (dict(eos_token_id=2.0), "config has a value of the wrong type"),
        (
            dict(model_type="mixtral", num_local_experts=2.5, num_experts_per_tok=2),
            "num_experts must be an integer >= 0, got 2.5",
        ),
        (
            dict(rope_scaling={**LLAMA3_ROPE, "low_freq_factor": 0}),  # a division by 0 later
            "high_freq_factor > low_freq_factor > 0",
        ),
        (
            dict(rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": "x"}),
            "original_max_position_embeddings must be a positive integer, got 'x'",
        ),
        (dict(model_type="qwen2_moe", qkv_bias="no"), "qkv_bias must be true or false"),
    ],
)
def test_config_values_of_the_wrong_kind_are_value_errors(extra, message):
    from jaxinfer.config import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**TINY_LLAMA_CONFIG, **extra})


def test_qwen2_moe_without_qkv_bias_matches_transformers(tmp_path):
    hf_model = build_hf_model("qwen2_moe", tmp_path, qkv_bias=False)
    model = jaxinfer.load_model(tmp_path, dtype="float32")
    assert not model.config.qkv_bias
    ids = np.random.RandomState(2).randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jaxinfer.forward(model, ids))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_qwen2_window_that_no_layer_uses_loads(tmp_path):
    """use_sliding_window with max_window_layers >= the layers: transformers slides no layer."""
    hf_model = build_hf_model(
        "qwen2", tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=2
    )
    assert "sliding_attention" not in hf_model.config.layer_types
    model = jaxinfer.load_model(tmp_path, dtype="float32")
    ids = np.random.RandomState(3).randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(jaxinfer.forward(model, ids)) - ref).max() <= 1e-4 * np.abs(ref).max()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]  # saved as transformers worked them out; without, from the count
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_window_layers": 1}))
    with pytest.raises(ValueError, match="sliding_window=16"):
        jaxinfer.load_model(tmp_path)
    layer_types = ["full_attention", "sliding_attention"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    with pytest.raises(ValueError, match="sliding_window=16"):
        jaxinfer.load_model(tmp_path)


def test_mistral_sliding_window_is_refused_not_ignored(tmp_path):
    build_hf_model("mistral", tmp_path, sliding_window=64)
    with pytest.raises(ValueError, match="sliding_window=64"):
        jaxinfer.load_model(tmp_path)


def test_convert_checkpoint_command(tmp_path, tiny, capsys):
    from jaxinfer.checkpoint import convert_main

    assert convert_main([str(tiny[0]), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "2 layers" in capsys.readouterr().out
    converted = jaxinfer.load_model(tmp_path / "out", dtype="float32")
    ids = np.arange(9)[None]
    np.testing.assert_array_equal(jaxinfer.forward(converted, ids), jaxinfer.forward(tiny[1], ids))
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    (tmp_path / "a-file").write_text("")
    for dest in ("a-file", "a-file/x", "out"):  # a file, under a file, not empty
        assert convert_main([str(tiny[0]), str(tmp_path / dest)]) == 2
    assert capsys.readouterr().err.count("convert_checkpoint: error: checkpoint directory") == 3


# qwen2 and tied give the kernels what llama3 gives them (4 heads over 2 kv heads of 16): their
# biases and tied head are outside the kernels.
@pytest.mark.parametrize(
    "hf_family",
    ["llama2", "llama3", "mistral", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe"],
    indirect=True,
)
def test_pallas_kernels_match_hf(loaded):
    """The model through the Pallas kernels (interpret mode on CPU): flash prefill, paged decode."""
    family, hf_model, model = loaded
    ids = np.random.RandomState(4).randint(0, model.config.vocab_size, (2, 21))
    ours = np.asarray(jaxinfer.forward(model, ids, impl="pallas"))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), family
    prompts = [ids[0, :5].tolist(), ids[1].tolist()]
    assert jaxinfer.generate(model, prompts, max_new_tokens=10, impl="pallas") == [
        hf_greedy(hf_model, p, 10) for p in prompts
    ]
