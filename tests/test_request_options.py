"""Request options beyond the sampler's settings, as vLLM has them: min_tokens, logit_bias,
include_stop_str_in_output, skip_special_tokens. Hand-computed on the fake next-letter model
(token t is 'a' + t, the next token is always the last + 1, 25 is EOS), one step a program and
several alike; then a real tiny model against its own logprobs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, xla_compiles
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
            # the min_tokens-th token's text cannot end it either (vLLM)
            ("str-last", "abc", dict(max_tokens=6, min_tokens=3, stop=["f"])),
            # EOS is banned even with ignore_eos (vLLM), then sampled like any token
            ("ign", "wx", dict(max_tokens=4, min_tokens=2, ignore_eos=True)),
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
    assert (got["str-last"].text, got["str-last"].finish_reason) == ("defghi", "length")
    assert got["ign"].token_ids == [24, 0, 1, 2]


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


# 17 logit_bias entries: one more than a multi-step program takes (runner.DECODE_BIAS_WIDTH)
WIDE = {7: 100, **{t: -1.0 for t in range(10, 26)}}


def test_rows_with_bias_entries_run_in_programs_unless_they_have_too_many():
    """Rows with up to 16 bias entries run in multi-step programs, min_tokens' bans ending
    inside one; a row with more makes single steps until it has none left (min_tokens'
    bans over 17 stop ids: until it has its tokens)."""
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(**GREEDY, max_tokens=12, min_tokens=6))
    engine.add_request("b", "wx", SamplingParams(**GREEDY, max_tokens=9, logit_bias={7: 100}))
    outs = run_all(engine)
    assert [len(o.new_token_ids) for o in outs["a"]] == [1, 4, 4, 3]
    assert [len(o.new_token_ids) for o in outs["b"]] == [1, 4, 4]
    assert outs["a"][-1].text == "defghijklmno" and outs["b"][-1].token_ids == [7] * 9
    stops = list(range(8, 25))  # i to y: reached only once the ban is over
    engine.add_request("c", "abc", SamplingParams(**GREEDY, max_tokens=12, min_tokens=6))
    engine.add_request(
        "d", "abc", SamplingParams(**GREEDY, max_tokens=12, min_tokens=5, stop_token_ids=stops)
    )
    outs = run_all(engine)
    # single steps until d has its 5 tokens; then programs, d stopping in its first at i (8),
    # banned until then
    assert [len(o.new_token_ids) for o in outs["c"]] == [1] * 5 + [4, 3]
    assert [len(o.new_token_ids) for o in outs["d"]] == [1] * 6
    assert outs["c"][-1].text == "defghijklmno" and outs["d"][-1].text == "defgh"
    assert outs["d"][-1].token_ids == [3, 4, 5, 6, 7, 8] and outs["d"][-1].finish_reason == "stop"
    engine.add_request("e", "abc", SamplingParams(**GREEDY, max_tokens=6, logit_bias=WIDE))
    assert [len(o.new_token_ids) for o in run_all(engine)["e"]] == [1] * 6
    # 1 logit_bias entry and 16 bans: single steps until the bans are over, then programs
    bans = dict(min_tokens=3, stop_token_ids=list(range(9, 24)))  # + EOS
    engine.add_request(
        "f", "abc", SamplingParams(**GREEDY, max_tokens=9, logit_bias={7: 100}, **bans)
    )
    f = run_all(engine)["f"]
    assert [len(o.new_token_ids) for o in f] == [1, 1, 1, 4, 2] and f[-1].token_ids == [7] * 9


def test_a_waiting_request_with_options_leaves_the_running_ones_their_programs():
    """Only running requests with more bias entries than a program takes make programs take
    one step: one queued behind a full engine does not."""
    engine = fake_engine(num_decode_steps=4, max_num_seqs=1)
    engine.add_request("a", "abc", SamplingParams(**GREEDY, max_tokens=13))
    engine.add_request("b", "abc", SamplingParams(**GREEDY, max_tokens=3, logit_bias=WIDE))
    outs = run_all(engine)
    assert [len(o.new_token_ids) for o in outs["a"]] == [1, 4, 4, 4]
    assert outs["b"][-1].token_ids == [7, 7, 7]
    assert [len(o.new_token_ids) for o in outs["b"]] == [1, 1, 1]


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


@pytest.mark.devices(2)
@pytest.mark.parametrize("steps", [1, 4])
def test_request_options_over_a_tensor_parallel_mesh(tiny_model, steps):
    """Over 2 devices the logits are split by vocabulary: each device adds the bias entries in
    its half (a multi-step decode: compares them with its half's ids), and the prompt logprobs'
    top-k merges the halves' candidates. The outputs are the one-device engine's."""
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
        prompt_logprobs=2,
    )
    options = dict(max_num_seqs=4, num_pages=32, max_model_len=64, num_decode_steps=steps)
    want = LLM(model=tiny_model, **options).generate(prompts, params, use_tqdm=False)
    got = LLM(model=tiny_model, tensor_parallel_size=2, **options).generate(
        prompts, params, use_tqdm=False
    )
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):  # prompt logprobs: top-k over the devices' vocabulary parts
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) and a.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys()
            np.testing.assert_allclose(list(x.values()), list(y.values()), atol=1e-5)
    for o in got:  # the +30 ids win; 1 (a stop id) only once 4 tokens are out
        assert set(o.token_ids) <= {1, vocab - 1} and 1 not in o.token_ids[:4]


# ---- prompt logprobs ----------------------------------------------------------------------------


def test_prompt_logprobs_of_the_fake_model_across_chunks():
    """Each prompt token after the first: {its id: logprob, top ids}; a prompt cut into chunks
    of 4 tokens gets every entry once; it comes whole with the first token; a request without
    them has None."""
    engine = fake_engine(num_decode_steps=4, max_num_batched_tokens=4)
    engine.add_request("a", "abxcd", SamplingParams(**GREEDY, max_tokens=3, prompt_logprobs=1))
    engine.add_request("b", "abc", SamplingParams(**GREEDY, max_tokens=2))
    outs = run_all(engine)
    a = outs["a"]
    assert all(o.prompt_logprobs is not None for o in a) and a[0].new_token_ids == [4]
    lps = a[-1].prompt_logprobs
    assert lps[0] is None and len(lps) == 5
    assert lps[1] == {1: pytest.approx(0.0)}  # b after a: the model's only choice
    assert lps[2].keys() == {23, 2} and lps[2][23] == pytest.approx(-50.0)  # x, not c
    assert lps[3].keys() == {2, 24} and lps[3][2] == pytest.approx(-50.0)  # c after x, not y
    assert lps[4] == {3: pytest.approx(0.0)}
    assert all(o.prompt_logprobs is None for o in outs["b"])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_prompt_logprobs_are_log_softmax_of_the_model(tiny_model, impl):
    """Against the model's forward over the whole prompt: every position, over chunks of 16
    tokens, with a prefix of the prompt in the prefix cache (skipped: each token computed)."""
    prompt = np.random.RandomState(7).randint(0, tiny_model.config.vocab_size, 41).tolist()
    engine = Engine(
        tiny_model,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        num_pages=32,
        warmup=False,
        attention_impl=impl,
    )
    engine.add_request("warm", prompt[:33], SamplingParams(max_tokens=1, ignore_eos=True))
    run_all(engine)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, ignore_eos=True)
    engine.add_request("a", prompt, params)
    out = run_all(engine)["a"][-1]
    assert out.num_cached_tokens == 0
    check_top3_prompt_logprobs(tiny_model, prompt, out.prompt_logprobs)


def check_top3_prompt_logprobs(model, prompt, lps):
    """`lps` (prompt_logprobs=3) against the log_softmax of the model's forward over `prompt`."""
    logits = np.asarray(jaxinfer.forward(model, [prompt]))[0]  # [T, V]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    assert lps[0] is None and len(lps) == len(prompt)
    # within 5e-3: on a GPU float32 matmuls run in TF32, and the engine's batches differ from
    # forward()'s (1.2e-3 apart was seen on an H200); near-tied top tokens may then swap places
    tol = 5e-3 if jax.default_backend() == "gpu" else 1e-4
    for p in range(1, len(prompt)):
        row, entry = logp[p - 1], lps[p]
        third, fourth = np.sort(row)[-3], np.sort(row)[-4]
        assert prompt[p] in entry and len(entry) <= 4
        assert all(t in entry for t in np.argsort(-row)[:3] if row[t] > fourth + tol)
        for t, value in entry.items():
            assert value == pytest.approx(row[t], abs=tol)
            assert t == prompt[p] or row[t] >= third - tol  # one of the top 3


def test_prompt_logprobs_steps_run_one_program_compiled_at_start_up(tiny_model, monkeypatch):
    """Where start-up compiles the programs, every step with prompt logprobs runs in the bucket
    of ALL_LOGITS_TOKENS (here 32 of a 64-token budget), whose forward start-up compiles and
    counts in the pool's sizing: after start-up, prompts of 41 and 4 tokens (a step of 32
    tokens, then one of 13) compile nothing, and their logprobs are the model's. Without a
    start-up compile (a CPU's default; here on any device) each such step keeps its own bucket."""
    from jaxinfer import scheduler
    from jaxinfer.runner import working_bytes

    monkeypatch.setattr(scheduler, "ALL_LOGITS_TOKENS", 32)
    engine = Engine(
        tiny_model, max_num_seqs=4, max_num_batched_tokens=64, num_pages=32, warmup=True
    )
    runner = engine.runner
    assert runner.all_logits_bucket() == (32, 4) and runner.one_all_logits_bucket
    lazy = Engine(tiny_model, max_num_seqs=4, max_num_batched_tokens=64, num_pages=32, warmup=False)
    assert not lazy.runner.one_all_logits_bucket
    lazy.close()
    (lp_program,) = [
        args
        for fn, args in runner.warmup_programs()
        if fn is runner._forward and args[3].lp_targets is not None
    ]
    assert lp_program[3].tokens.shape == (32,)
    compiled = runner._forward.lower(*lp_program).compile()
    assert 0 < working_bytes(compiled) <= runner.compile_programs(progress=False)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, tiny_model.config.vocab_size, n).tolist() for n in (41, 4)]
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3, ignore_eos=True)
    with xla_compiles() as later:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        outs = run_all(engine)
    assert not later  # no program, not even a small op, compiles after start-up
    for i, p in enumerate(prompts):
        check_top3_prompt_logprobs(tiny_model, p, outs[str(i)][-1].prompt_logprobs)
    engine.close()


def test_a_step_with_a_prompt_logprobs_chunk_holds_at_most_all_logits_tokens(monkeypatch):
    """A prompt chunk of a request that wants its prompt's logprobs joins a step of at most
    ALL_LOGITS_TOKENS tokens (its forward keeps [T, V] logits); the step's other chunks are cut
    to fit it. Steps before it joins, and after its prompt, take the engine's whole budget."""
    from jaxinfer import scheduler

    monkeypatch.setattr(scheduler, "ALL_LOGITS_TOKENS", 6)
    engine = fake_engine(num_decode_steps=1, max_num_batched_tokens=16, max_num_seqs=1)
    engine.add_request("a", "abcdefghij", SamplingParams(**GREEDY, max_tokens=2))
    engine.add_request(
        "b", "abcdefghijkl", SamplingParams(**GREEDY, max_tokens=2, prompt_logprobs=0)
    )
    sizes = []
    while engine.has_unfinished_requests():
        engine.step()
        plan = engine._in_flight[0] if engine._in_flight else None
        if plan is not None:
            sizes.append([(s.request_id, len(s.token_ids)) for s in plan.seqs])
    # a: its whole prompt while b waits (a seat each: b is only queued); b: chunks of 6
    assert sizes[0] == [("a", 10)]
    b_chunks = [n for step in sizes for rid, n in step if rid == "b"]
    assert b_chunks[:2] == [6, 6] and all(sum(n for _, n in step) <= 16 for step in sizes)
    assert all(sum(n for _, n in step) <= 6 for step in sizes if ("b", 6) in step)
