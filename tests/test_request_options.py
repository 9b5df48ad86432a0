"""Request options beyond the sampler's settings, as vLLM has them: min_tokens, logit_bias,
include_stop_str_in_output, skip_special_tokens. Hand-computed on the fake next-letter model
(token t is 'a' + t, the next token is always the last + 1, 25 is EOS), one step a program and
several alike; then a real tiny model against its own logprobs."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model
from test_engine import FAKE_CONFIG, FakeModel, LetterTokenizer, fake_engine, run_all

import jaxinfer
from jaxinfer.engine import Engine
from jaxinfer.sampling import SamplingParams

GREEDY = dict(temperature=0)


def finals(engine, requests):
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, SamplingParams(**GREEDY, **params))
    outs = run_all(engine)
    for rid, out in outs.items():  # the streamed deltas always join to the final text
        assert "".join(o.text_delta for o in out) == out[-1].text, rid
    return {rid: out[-1] for rid, out in outs.items()}


@pytest.mark.parametrize("steps", [1, 4])
def test_logit_bias_steers_greedy_tokens(steps):
    got = finals(
        fake_engine(num_decode_steps=steps),
        [
            ("up", "abc", dict(max_tokens=4, logit_bias={7: 100})),  # 100 beats the model's 50
            ("ban", "abc", dict(max_tokens=7, logit_bias={"4": -100})),  # e: 50 - 100 < 0
            ("small", "abc", dict(max_tokens=3, logit_bias={7: 49})),  # 49 does not beat 50
        ],
    )
    assert got["up"].token_ids == [7, 7, 7, 7]
    # after d, e is out of reach: every other logit is 0 and the argmax takes the first, a
    assert got["ban"].text == "dabcdab"
    assert got["small"].text == "def"


@pytest.mark.parametrize("steps", [1, 4])
def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings(steps):
    got = finals(
        fake_engine(num_decode_steps=steps),
        [
            # y, then EOS (z) is banned for two more tokens: a, b; then c, d
            ("eos", "wx", dict(max_tokens=5, min_tokens=3)),
            ("eos-late", "wx", dict(max_tokens=5, min_tokens=1)),  # y, z: the ban is over
            # stop id e banned at the 2nd token (a instead); allowed once 3 are out
            ("id", "abc", dict(max_tokens=9, min_tokens=3, stop_token_ids=[4])),
            # "e" (2nd token) is inside min_tokens' text and cannot stop it; "fg" can
            ("str", "abc", dict(max_tokens=9, min_tokens=3, stop=["e", "fg"])),
            ("str-none", "abc", dict(max_tokens=6, min_tokens=3, stop=["e"])),
        ],
    )
    assert (got["eos"].token_ids, got["eos"].finish_reason) == ([24, 0, 1, 2, 3], "length")
    assert (got["eos-late"].token_ids, got["eos-late"].text) == ([24, 25], "y")
    assert got["id"].token_ids == [3, 0, 1, 2, 3, 4] and got["id"].text == "dabcd"
    assert got["id"].finish_reason == "stop"
    assert (got["str"].text, got["str"].token_ids, got["str"].finish_reason) == (
        "de",
        [3, 4, 5, 6],
        "stop",
    )
    assert (got["str-none"].text, got["str-none"].finish_reason) == ("defghi", "length")


@pytest.mark.parametrize("steps", [1, 4])
def test_include_stop_str_in_output_keeps_what_ended_the_request(steps):
    got = finals(
        fake_engine(num_decode_steps=steps),
        [
            ("str", "abc", dict(max_tokens=9, stop=["fg"], include_stop_str_in_output=True)),
            ("str-off", "abc", dict(max_tokens=9, stop=["fg"])),
            ("id", "abc", dict(max_tokens=9, stop_token_ids=[6], include_stop_str_in_output=True)),
            ("eos", "wx", dict(max_tokens=9, include_stop_str_in_output=True)),
            # the first of two matching stop strings ends it, with its own text
            ("two", "abc", dict(max_tokens=9, stop=["gh", "ef"], include_stop_str_in_output=True)),
        ],
    )
    assert (got["str"].text, got["str"].token_ids) == ("defg", [3, 4, 5, 6])
    assert (got["str-off"].text, got["str-off"].token_ids) == ("de", [3, 4, 5, 6])
    assert (got["id"].text, got["id"].finish_reason) == ("defg", "stop")
    assert (got["eos"].text, got["eos"].token_ids) == ("yz", [24, 25])
    assert got["two"].text == "def"


def test_include_stop_str_streams_without_holding_text_back():
    """Text that may begin a stop string is held back only where the stop string would be cut."""
    engine = fake_engine(num_decode_steps=1)
    engine.add_request(
        "a",
        "abc",
        SamplingParams(**GREEDY, max_tokens=9, stop=["efx"], include_stop_str_in_output=True),
    )
    engine.add_request("b", "abc", SamplingParams(**GREEDY, max_tokens=9, stop=["efx"]))
    outs = run_all(engine)
    assert [o.text_delta for o in outs["a"]][:3] == ["d", "e", "f"]
    assert [o.text_delta for o in outs["b"]][:3] == ["d", "", ""]  # "e", "ef" may begin efx
    assert outs["a"][-1].text == outs["b"][-1].text == "defghijkl"


class SpecialZTokenizer(LetterTokenizer):
    """z (25, EOS) is a special token: left out of the text unless asked for."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode([i for i in ids if not (skip_special_tokens and i == 25)])


def test_skip_special_tokens_false_writes_them():
    model = FakeModel(FAKE_CONFIG, {}, SpecialZTokenizer(), jnp.float32, "xla")
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, warmup=False)
    got = finals(
        engine,
        [
            ("skip", "wx", dict(max_tokens=4, ignore_eos=True)),
            ("keep", "wx", dict(max_tokens=4, ignore_eos=True, skip_special_tokens=False)),
            # EOS that ends a request adds no text, special or not (vLLM), unless included
            ("end", "wx", dict(max_tokens=4, skip_special_tokens=False)),
            (
                "end-in",
                "wx",
                dict(max_tokens=4, skip_special_tokens=False, include_stop_str_in_output=True),
            ),
        ],
    )
    assert got["skip"].text == "yab" and got["keep"].text == "yzab"
    assert (got["end"].text, got["end-in"].text) == ("y", "yz")


def test_logit_bias_ids_must_be_in_the_vocabulary():
    engine = fake_engine()
    with pytest.raises(
        ValueError, match=r"logit_bias: token id 26 is outside the vocabulary \[0, 26\)"
    ):
        engine.add_request("a", "abc", SamplingParams(logit_bias={26: 1}))


def test_min_tokens_rows_run_single_steps_until_they_have_them():
    """A multi-step program runs no row that has bias entries this step; min_tokens' rows
    join them once they have their tokens."""
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(**GREEDY, max_tokens=12, min_tokens=6))
    outs = run_all(engine)["a"]
    sizes = [len(o.new_token_ids) for o in outs]
    assert sizes[:6] == [1] * 6 and max(sizes[6:]) == 4 and sum(sizes) == 12


# ---- a real tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("options-llama3")
    build_hf_model("llama3", path)
    return jaxinfer.load_model(path, dtype="float32")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_a_banned_argmax_gives_the_runner_up(tiny_model, impl):
    """Greedy with -100 on the model's top token samples its second (read from the raw
    logprobs, which the bias does not change); +100 on any token makes every token that one."""
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, tiny_model.config.vocab_size, n).tolist() for n in (7, 19, 12)]
    engine = Engine(tiny_model, max_num_seqs=4, num_pages=32, warmup=False, attention_impl=impl)
    plain = SamplingParams(temperature=0, max_tokens=1, logprobs=2, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"plain{i}", p, plain)
    firsts = {rid: out[-1] for rid, out in run_all(engine).items()}
    for i, p in enumerate(prompts):
        top = sorted(firsts[f"plain{i}"].logprobs[0].items(), key=lambda kv: -kv[1])
        (best, lp_best), (second, _) = top[0], top[1]
        ban = dataclasses.replace(plain, logit_bias=((best, -100.0),))
        engine.add_request(f"ban{i}", p, ban)
        engine.add_request(
            f"up{i}",
            p,
            SamplingParams(
                temperature=0.7, seed=i, max_tokens=5, ignore_eos=True, logit_bias={i + 3: 100}
            ),
        )
        outs = {rid: out[-1] for rid, out in run_all(engine).items()}
        assert outs[f"ban{i}"].token_ids == [second]
        # the same raw logprob (the bias moves it by 100); other batches round differently
        # (on a GPU 2e-4 apart: float32 matmuls in TF32)
        assert outs[f"ban{i}"].logprobs[0][best] == pytest.approx(lp_best, abs=1e-3)
        assert outs[f"up{i}"].token_ids == [i + 3] * 5


def test_logit_bias_and_min_tokens_over_a_tensor_parallel_mesh(tiny_model):
    """Over 2 devices the logits are split by vocabulary: each device adds the entries in its
    half. The outputs are the one-device engine's."""
    from jaxinfer.engine import LLM

    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, tiny_model.config.vocab_size, n).tolist() for n in (9, 14)]
    vocab = tiny_model.config.vocab_size
    params = SamplingParams(
        temperature=0.9,
        seed=3,
        max_tokens=6,
        min_tokens=4,
        logit_bias={1: 30, vocab - 1: 30, vocab // 2: -100},
        stop_token_ids=[1],
        logprobs=2,
    )
    options = dict(max_num_seqs=4, num_pages=32, max_model_len=64, num_decode_steps=1)
    want = LLM(model=tiny_model, **options).generate(prompts, params, use_tqdm=False)
    got = LLM(model=tiny_model, tensor_parallel_size=2, **options).generate(
        prompts, params, use_tqdm=False
    )
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for o in got:  # the +30 ids win; 1 (a stop id) only once 4 tokens are out
        assert set(o.token_ids) <= {1, vocab - 1} and 1 not in o.token_ids[:4]
