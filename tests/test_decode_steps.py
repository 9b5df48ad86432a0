"""Decode steps in one program (`num_decode_steps` k): what users get is what one step a program
gives, token for token: greedy and seeded samples, stop ids and strings, logprobs, length
limits, aborts, preemption, the prefix cache; the streamed deltas join to the same text."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import build_hf_model
from test_engine import fake_engine, run_all

import jaxinfer
from jaxinfer import runner as runner_module
from jaxinfer.engine import Engine
from jaxinfer.runner import Dispatched, cublas_decode_rows, plain_decode_rows, token_buckets
from jaxinfer.sampling import SamplingParams


class ModTokenizer:
    """Token t is the letter 'a' + t % 26: every id has text, so stop strings can match."""

    def __call__(self, text):
        return {"input_ids": [ord(c) - ord("a") for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("decode-steps-llama3")
    build_hf_model("llama3", path)
    model = jaxinfer.load_model(path, dtype="float32")
    return dataclasses.replace(model, tokenizer=ModTokenizer())


# ---- the hand-computable fake model: next token = last + 1, token 25 is EOS --------------------


def test_fake_model_outputs_with_decode_steps():
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("b", "wx", SamplingParams(max_tokens=10, temperature=0))  # y, z=EOS
    engine.add_request("c", "abc", SamplingParams(max_tokens=10, temperature=0, stop=["fg"]))
    outs = run_all(engine)
    a, b, c = outs["a"], outs["b"], outs["c"]
    assert a[-1].text == "defghi" and a[-1].finish_reason == "length"
    assert "".join(o.text_delta for o in a) == "defghi"
    assert [len(o.new_token_ids) for o in a] == [1, 4, 1]  # prefill, then 4 and the 1 left
    assert b[-1].token_ids == [24, 25] and b[-1].finish_reason == "stop" and b[-1].text == "y"
    # The stop string ends "c" inside a program: the tokens after it are dropped.
    assert c[-1].text == "de" and c[-1].token_ids == [3, 4, 5, 6]
    assert c[-1].finish_reason == "stop" and "".join(o.text_delta for o in c) == "de"
    assert engine.scheduler.allocator.num_free_pages == 32


def test_stats_count_the_rows_and_tokens_of_multi_step_programs():
    """The engine counts each multi-step program's row-steps (padded rows x k) and the tokens
    its rows were planned to make: the benchmark's measure of idle rows."""
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(max_tokens=7, temperature=0))
    run_all(engine)
    # The prefill samples the first token; then a program plans 4 (4 steps of one row: a lone
    # sequence has a bucket of its own) and the next the 2 left, 4 steps again.
    assert engine.runner.bucket(1) == (1, 1)
    assert engine.stats["decode_steps"] == 2
    assert engine.stats["decode_planned_tokens"] == 6
    assert engine.stats["decode_row_steps"] == 8


def test_rows_ending_early_run_single_steps_not_a_program():
    """When fewer than half of a program's row-steps would be live (rows reaching max_tokens),
    the scheduler plans single steps, and a plan of single steps runs as one step rather than
    as a k-step program: the same tokens, less work."""
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("b", "abc", SamplingParams(max_tokens=2, temperature=0))
    outs = run_all(engine)
    # After the prefill: a has 5 tokens to go and b 1, 6 of 8 row-steps live: a program of 4.
    # Then a has 1 to go, 1 of 4 row-steps live: a single step.
    assert outs["a"][-1].text == "defghi" and outs["b"][-1].text == "de"
    assert [len(o.new_token_ids) for o in outs["a"]] == [1, 4, 1]
    assert engine.stats["decode_steps"] == 2
    assert engine.stats["decode_planned_tokens"] == 5  # the program's rows only
    rows = engine.runner.bucket(2)[1]  # 2 on a CPU; 4 on a GPU (its smallest token bucket)
    assert engine.stats["decode_row_steps"] == 4 * rows  # one program of 4 steps over 2 rows
    plan = engine.scheduler.schedule(4)  # nothing left to plan
    assert not plan.seqs and not engine.runner.multi_step(plan, [])


def test_token_buckets_give_a_lone_sequence_its_own():
    assert token_buckets(4096, 16) == (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert token_buckets(24, 16) == (1, 16, 24)
    assert token_buckets(8, 16) == (1, 8)
    assert token_buckets(8, 1) == (1, 2, 4, 8)
    assert token_buckets(1, 16) == (1,)


def test_a_stop_id_ends_the_row_on_the_device():
    """A row that sampled a stop id is stopped on the device: the next program knows it."""
    engine = fake_engine(num_decode_steps=8)
    runner = engine.runner
    engine.add_request("b", "uv", SamplingParams(max_tokens=20, temperature=0))  # w x y z=EOS
    engine.step()  # the prefill (samples w)
    plan = engine.scheduler.schedule(8)
    (item,) = plan.seqs
    assert item.num_steps == 8
    rows = [engine.requests["b"].row()]
    queue = runner.prepare(plan, rows)
    assert not np.asarray(runner.prev_stopped).any()
    out = runner.collect(Dispatched(1, queue(), True))
    assert out.tokens[:3, 0].tolist() == [23, 24, 25]  # x y z
    assert np.asarray(runner.prev_stopped).tolist() == [True, False, False, False]


def test_abort_with_a_program_in_flight():
    engine = fake_engine(num_decode_steps=8, num_pages=8)
    engine.add_request("a", "abc", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()  # a multi-step decode in flight
    engine.abort("a")
    (out,) = run_all(engine)["a"]
    assert out.finish_reason == "abort" and -1 not in out.token_ids
    assert engine.scheduler.allocator.num_free_pages == 8


# ---- a real tiny model: the same outputs with and without decode steps ------------------------


def mixed_requests(model):
    rng = np.random.RandomState(7)
    lengths = (5, 33, 12, 3, 21, 9, 14)
    prompts = [rng.randint(0, model.config.vocab_size, n).tolist() for n in lengths]
    eos = int(rng.randint(model.config.vocab_size))
    params = [
        # logit_bias: the greedy tokens of the model's flat logits (top two ~0.1 apart) move
        SamplingParams(
            max_tokens=13, temperature=0, ignore_eos=True, logit_bias={199: -100, 95: 0.2, 7: 0.3}
        ),
        SamplingParams(max_tokens=17, temperature=0.8, top_k=20, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=1.0, stop=["kq", "zz"], ignore_eos=True),
        # min_tokens: its stop ids (frequent ones of its first steps) banned for 8 tokens, the
        # ban ending inside a program
        SamplingParams(
            max_tokens=25,
            temperature=1.2,
            stop_token_ids=[eos, 13, 193, 59],
            seed=5,
            min_tokens=8,
        ),
        SamplingParams(
            max_tokens=12,
            temperature=0.7,
            repetition_penalty=1.3,
            presence_penalty=2.0,
            logprobs=2,
            ignore_eos=True,
        ),
        # greedy, whose penalties must push the repeats away step after step inside a program,
        # after its logit_bias; admitted last and the longest, it ends alone (one-row programs,
        # whatever the others sample)
        SamplingParams(
            max_tokens=30,
            temperature=0,
            frequency_penalty=1.5,
            presence_penalty=0.5,
            repetition_penalty=2.0,
            logit_bias={262: 0.5, 53: -0.2},
            ignore_eos=True,
        ),
    ]
    return prompts, params


def unadjusted(params: SamplingParams) -> SamplingParams:
    """`params` without penalties, logit_bias and min_tokens."""
    neutral = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    return dataclasses.replace(params, logit_bias=(), min_tokens=0, **neutral)


def staggered(model, decode_steps: int, plain: bool = False, **options):
    """One request a step; returns each request's outputs. `plain`: the requests without
    penalties, logit_bias and min_tokens."""
    engine = Engine(
        model,
        **{
            "max_num_seqs": 4,
            "max_num_batched_tokens": 32,
            "page_size": 16,
            "num_pages": 12,
            "warmup": False,
            "attention_impl": "xla",
            "num_decode_steps": decode_steps,
            "seed": 3,
            **options,
        },
    )
    prompts, params = mixed_requests(model)
    params = [unadjusted(p) for p in params] if plain else params
    seen, step = {}, 0
    while step < len(prompts) or engine.has_unfinished_requests():
        if step < len(prompts):
            engine.add_request(str(step), prompts[step], params[step])
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        step += 1
    assert engine.scheduler.allocator.num_free_pages == engine.num_pages
    return seen, engine


# Logprobs of k steps a program against single steps': on a GPU their float32 matmuls run in
# TF32, by cuBLAS in one and XLA's Triton GEMMs in the other.
RTOL = 2e-3 if jax.default_backend() == "gpu" else 1e-5


def assert_same_outputs(single: dict, multi: dict) -> None:
    """`staggered`'s outputs of k steps a program are those of single steps: every request's
    tokens, text, finish reason and logprobs, and deltas that join to them."""
    assert sorted(single) == sorted(multi) == [str(i) for i in range(7)]
    for rid in single:
        one, many = single[rid][-1], multi[rid][-1]
        assert many.token_ids == one.token_ids, rid
        assert (many.text, many.finish_reason) == (one.text, one.finish_reason), rid
        assert "".join(o.text_delta for o in multi[rid]) == many.text
        assert [t for o in multi[rid] for t in o.new_token_ids] == many.token_ids
        if one.logprobs is not None:
            assert len(many.logprobs) == len(one.logprobs) == len(one.token_ids)
            for a, b in zip(many.logprobs, one.logprobs):
                assert a.keys() == b.keys()
                np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=RTOL)


@pytest.mark.parametrize(
    "options, cublas",
    [({}, True), ({"num_pages": 5}, False), ({"async_scheduling": False}, False)],
    ids=["cublas", "preemption", "sync"],
)
def test_decode_steps_give_the_outputs_of_single_steps(tiny_model, monkeypatch, options, cublas):
    """5 pages force preemption. Requests with penalties, logit_bias and min_tokens run in
    multi-step programs as well, the penalized ones' histories holding the samples of the
    program in flight. `cublas`: the 4-row decode
    programs go to their own jit (cuBLAS's matmuls on a GPU), those of fewer rows to the plain
    one (where the other cases run every decode program)."""
    single, _ = staggered(tiny_model, 1, **options)
    monkeypatch.setenv("JAXINFER_DECODE_CUBLAS", "1" if cublas else "0")
    monkeypatch.setattr(runner_module, "CUBLAS_DECODE_ROWS", 4)
    penalized, biased, plain = [], [], []  # of each multi-step decode
    decode = runner_module.Runner.decode

    def record(self, batch, *args):
        penalized.append(batch.history is not None)
        biased.append(batch.bias is not None and bool((np.asarray(batch.bias.ids) >= 0).any()))
        plain.append(batch.bias is None)  # the program that adjusts no logits
        return decode(self, batch, *args)

    monkeypatch.setattr(runner_module.Runner, "decode", record)
    multi, engine = staggered(tiny_model, 4, **options)
    assert sum(penalized) >= 3 and sum(biased) >= 3, (penalized, biased)
    assert not any(plain), plain  # a penalized or biased row was in every program
    if cublas:  # programs ran in both jits
        assert engine.runner._decode_cublas._cache_size() > 0
        assert engine.runner._decode._cache_size() > 0
    else:
        assert engine.runner._decode_cublas is None
    assert engine.stats["steps"] < sum(len(o[-1].token_ids) for o in multi.values())
    assert_same_outputs(single, multi)
    assert multi["3"][-1].finish_reason == "stop" or len(multi["3"][-1].token_ids) == 30


@pytest.mark.parametrize("plain_rows", ["1", "0", "4"])
def test_decodes_that_adjust_no_logits_give_the_outputs_of_single_steps(
    tiny_model, monkeypatch, plain_rows
):
    """Requests without penalties, logit_bias and min_tokens: their multi-step decodes of at
    least $JAXINFER_PLAIN_DECODE_ROWS rows run the program that adjusts no logits (smaller
    ones, or all with 0, the one that adjusts them, by nothing), and every token and logprob
    is a single step's either way."""
    single, _ = staggered(tiny_model, 1, plain=True)
    monkeypatch.setenv("JAXINFER_PLAIN_DECODE_ROWS", plain_rows)
    plain = []  # of each multi-step decode: its rows and whether it adjusts no logits
    decode = runner_module.Runner.decode

    def record(self, batch, *args):
        plain.append((batch.token_src.shape[0], batch.bias is None))
        return decode(self, batch, *args)

    monkeypatch.setattr(runner_module.Runner, "decode", record)
    multi, engine = staggered(tiny_model, 4, plain=True)
    threshold = int(plain_rows)
    assert engine.runner.plain_rows == (threshold or None)
    assert len(plain) >= 5
    assert all(adjusts_none == (0 < threshold <= rows) for rows, adjusts_none in plain), plain
    if plain_rows == "4":  # both programs ran: the 4-row one plain, smaller ones adjusting
        assert {a for _, a in plain} == {True, False}, plain
    assert_same_outputs(single, multi)


def test_plain_decode_rows_by_variable(monkeypatch):
    monkeypatch.delenv("JAXINFER_PLAIN_DECODE_ROWS", raising=False)
    assert plain_decode_rows() == runner_module.PLAIN_DECODE_ROWS == 128
    monkeypatch.setenv("JAXINFER_PLAIN_DECODE_ROWS", "64")
    assert plain_decode_rows() == 64
    monkeypatch.setenv("JAXINFER_PLAIN_DECODE_ROWS", "0")
    assert plain_decode_rows() is None
    for bad in ("-1", "all", "1.5", "\u00b2"):  # a superscript is a digit, not a decimal
        monkeypatch.setenv("JAXINFER_PLAIN_DECODE_ROWS", bad)
        with pytest.raises(ValueError, match="JAXINFER_PLAIN_DECODE_ROWS must be an integer"):
            plain_decode_rows()


def test_cublas_decode_rows_by_backend_and_variable(monkeypatch):
    monkeypatch.delenv("JAXINFER_DECODE_CUBLAS", raising=False)
    on_gpu = jax.default_backend() == "gpu"  # elsewhere XLA's choice everywhere
    assert cublas_decode_rows() == (runner_module.CUBLAS_DECODE_ROWS if on_gpu else None)
    monkeypatch.setenv("JAXINFER_DECODE_CUBLAS", "1")
    assert cublas_decode_rows() == runner_module.CUBLAS_DECODE_ROWS == 128
    monkeypatch.setenv("JAXINFER_DECODE_CUBLAS", "0")
    assert cublas_decode_rows() is None


def test_pages_cached_after_a_multi_step_decode_hold_their_tokens(tiny_model):
    """Full pages are keyed by their tokens once those are known: a prompt made of an earlier
    prompt and its output reuses them, with the tokens it would compute anyway."""
    prompt = mixed_requests(tiny_model)[0][1]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = Engine(
        tiny_model, max_num_seqs=2, num_pages=16, warmup=False, num_decode_steps=8, seed=0
    )
    engine.add_request("a", prompt, params)
    first = run_all(engine)["a"][-1]
    longer = prompt + first.token_ids
    engine.add_request("b", longer, SamplingParams(max_tokens=6, temperature=0))
    second = run_all(engine)["b"][-1]
    assert second.num_cached_tokens == (len(longer) - 1) // 16 * 16 == 64
    assert second.token_ids == jaxinfer.generate(tiny_model, [longer], max_new_tokens=6)[0]


def test_decode_steps_of_padding_rows_write_nothing(tiny_model):
    """A program whose rows all have 0 steps leaves the pools as they were."""
    engine = Engine(tiny_model, max_num_seqs=4, num_pages=8, warmup=False, num_decode_steps=4)
    runner = engine.runner
    before = [np.asarray(x) for x in runner.pages[0]]
    batch = runner._padding_batch(4, True)
    out = runner.collect(
        Dispatched(4, runner.decode(batch, runner._decode_steps(None, (), 4), "sample"), True)
    )
    assert out.tokens.shape == (4, 4) and not out.tokens.any()
    for a, b in zip(before, runner.pages[0]):
        np.testing.assert_array_equal(a, np.asarray(b))
