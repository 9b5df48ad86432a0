"""The continuous-batching engine: exact streamed text with a hand-computable fake model, and a
real tiny model whose engine outputs equal one-by-one greedy generation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, xla_compiles

import jaxinfer
from jaxinfer import runner as runner_module
from jaxinfer.config import ModelConfig
from jaxinfer.engine import LLM, Engine
from jaxinfer.model import Model, init_params
from jaxinfer.sampling import BIAS_WIDTHS, SamplingParams

# ------------------------------------------------------------------------------------------------
# A fake model: the next token is always (last token + 1) % 26, and token t is the letter 'a' + t.


class LetterTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) - ord("a") for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


FAKE_CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=26,
    hidden_size=8,
    intermediate_size=8,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    eos_token_ids=(25,),
)


@dataclasses.dataclass(frozen=True)
class NextLetterDecoder:
    vocab: int = 26
    impl: str = "fake"
    cfg: ModelConfig = FAKE_CONFIG

    def apply(self, variables, tokens, positions, cache, logits_at=None, paged=None):
        if logits_at is None:  # every token's: [1, T, V]
            return 50.0 * jax_one_hot((tokens[0] + 1) % self.vocab, self.vocab)[None], cache
        last = tokens[0][logits_at]  # [B]
        return 50.0 * jax_one_hot((last + 1) % self.vocab, self.vocab)[:, None], cache


def jax_one_hot(x, n):
    return (x[:, None] == jnp.arange(n)[None]).astype(jnp.float32)


class FakeModel(Model):
    def decoder(self, impl=None):
        return NextLetterDecoder()


def fake_engine(**options) -> Engine:
    model = FakeModel(FAKE_CONFIG, {}, LetterTokenizer(), jnp.float32, "xla")
    defaults = dict(max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, warmup=False)
    return Engine(model, **{**defaults, **options})


def run_all(engine: Engine) -> dict[str, list]:
    """Steps until done; returns every output per request, in order."""
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def test_fake_model_streams_exact_text():
    engine = fake_engine(num_decode_steps=1)
    engine.add_request("a", "abc", SamplingParams(max_tokens=5, temperature=0))
    engine.add_request("b", "wx", SamplingParams(max_tokens=10, temperature=0))  # y, z=EOS
    outs = run_all(engine)
    assert [o.text_delta for o in outs["a"]] == ["d", "e", "f", "g", "h"]
    assert outs["a"][-1].text == "defgh" and outs["a"][-1].finish_reason == "length"
    assert outs["b"][-1].token_ids == [24, 25]  # the EOS token ends the request and is kept
    assert outs["b"][-1].finish_reason == "stop"
    assert outs["b"][-1].text == "y"  # but adds no text, as in vLLM
    assert all(not o.finished for o in outs["a"][:-1]) and outs["a"][-1].finished


def test_a_stop_token_id_adds_no_text():
    """stop_token_ids and EOS end a request with their id kept and their text left out (vLLM's
    include_stop_str_in_output=False); a stop string still sees the text before them."""
    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(max_tokens=9, temperature=0, stop_token_ids=[6]))
    engine.add_request("b", "abc", SamplingParams(max_tokens=9, temperature=0, stop=["fg"]))
    engine.add_request("c", "abc", SamplingParams(max_tokens=3, temperature=0, stop_token_ids=[6]))
    outs = run_all(engine)
    a, b, c = (outs[r][-1] for r in "abc")
    assert (a.token_ids, a.text, a.finish_reason) == ([3, 4, 5, 6], "def", "stop")
    assert "".join(o.text_delta for o in outs["a"]) == "def"
    assert (b.text, b.finish_reason) == ("de", "stop")
    assert (c.token_ids, c.text, c.finish_reason) == ([3, 4, 5], "def", "length")


class BytesTokenizer(LetterTokenizer):
    """Token "d" is " " and the first two bytes of "€" (e2 82 ac), "e" its last byte: text held
    back."""

    BYTES = {3: b" \xe2\x82", 4: b"\xac"}

    def decode(self, ids, skip_special_tokens=True):
        raw = b"".join(self.BYTES.get(i, bytes([ord("a") + i])) for i in ids)
        return raw.decode("utf-8", errors="replace")


def test_text_held_back_at_the_end_is_let_out():
    """A request that ends on half a character gets the text before it (held back while more
    bytes might come), but not the half character (as vLLM)."""
    model = FakeModel(FAKE_CONFIG, {}, BytesTokenizer(), jnp.float32, "xla")
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, warmup=False)
    engine.add_request("half", "ab", SamplingParams(max_tokens=2, temperature=0))  # c, d
    engine.add_request("whole", "ab", SamplingParams(max_tokens=4, temperature=0))  # c, d, e, f
    engine.add_request("stop", "ab", SamplingParams(max_tokens=2, temperature=0, stop=[" "]))
    outs = run_all(engine)
    half, whole, stop = (outs[r][-1] for r in ("half", "whole", "stop"))
    assert BytesTokenizer().decode(half.token_ids) == "c \ufffd"
    assert half.text == "c " and [o.text_delta for o in outs["half"]] == ["c", " "]
    assert whole.text == "c €f"
    assert (stop.text, stop.finish_reason) == ("c", "stop")  # the flushed text is checked too


def test_detokenizer_lets_out_a_long_unfinished_run():
    """Tokens whose text keeps ending in U+FFFD (bytes that never make a character) are held
    back for at most MAX_HELD tokens, so each push decodes a short window."""
    from jaxinfer.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(BytesTokenizer())
    pieces = [detok.push(3) for _ in range(40)]
    text = "".join(pieces) + detok.flush()
    assert text == BytesTokenizer().decode([3] * 40).rstrip("\ufffd")
    held = IncrementalDetokenizer.MAX_HELD
    assert pieces[held - 2] == "" and pieces[held - 1] == " \ufffd" * held
    assert detok.prefix_offset >= held  # the window moved on


class SpacedLetterTokenizer(LetterTokenizer):
    """As SentencePiece decodes: token t is " " + its letter, and a decode drops one leading space."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" " + chr(ord("a") + i) for i in ids).removeprefix(" ")


def test_first_output_token_keeps_its_leading_space():
    """Decoded alone, a SentencePiece first token ("▁d") would lose its space: the text starts
    from the prompt's last tokens, as vLLM's does."""
    model = FakeModel(FAKE_CONFIG, {}, SpacedLetterTokenizer(), jnp.float32, "xla")
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, warmup=False)
    engine.add_request("a", "abc", SamplingParams(max_tokens=5, temperature=0, stop=[" e"]))
    engine.add_request("b", "abc", SamplingParams(max_tokens=3, temperature=0))
    outs = run_all(engine)
    assert [o.text_delta for o in outs["b"]] == [" d", " e", " f"]
    assert outs["b"][-1].text == " d e f"
    assert outs["a"][-1].text == " d" and outs["a"][-1].finish_reason == "stop"


def test_stop_strings_need_a_tokenizer():
    model = FakeModel(FAKE_CONFIG, {}, None, jnp.float32, "xla")
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=16, num_pages=32, warmup=False)
    with pytest.raises(ValueError, match="stop strings need the model's tokenizer"):
        engine.add_request("a", [0, 1], SamplingParams(max_tokens=3, stop=["x"]))
    engine.add_request("a", [0, 1], SamplingParams(max_tokens=3, stop_token_ids=[3]))
    assert run_all(engine)["a"][-1].token_ids == [2, 3]


def test_stop_string_split_across_tokens_never_appears():
    engine = fake_engine(num_decode_steps=1)
    engine.add_request("a", "abc", SamplingParams(max_tokens=10, temperature=0, stop=["fg", "xyz"]))
    outs = run_all(engine)["a"]
    assert [o.text_delta for o in outs] == ["d", "e", "", ""]  # 'f' held back, then cut
    assert outs[-1].text == "de" and outs[-1].finish_reason == "stop"
    assert outs[-1].token_ids == [3, 4, 5, 6]


def _longest_held_end(text: str, stops) -> int:  # the definition, by brute force
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def test_the_held_back_end_streams_as_its_definition():
    """`_stop_prefix_len` skips the text let out already: over random streams it still holds
    back exactly the longest end that begins a stop string."""
    from jaxinfer.engine import _stop_prefix_len

    rng = np.random.RandomState(0)
    for _ in range(300):
        stops = ["".join(rng.choice(list("abc"), rng.randint(1, 7))) for _ in range(3)]
        text, emitted = "", 0
        while len(text) < 60 and not any(s in text for s in stops):
            hold = _stop_prefix_len(text, stops, emitted)
            assert hold == _longest_held_end(text, stops), (text, stops, emitted)
            emitted = max(emitted, len(text) - hold)
            text += "".join(rng.choice(list("abc"), rng.randint(1, 4)))


def test_a_long_stop_string_costs_little_a_token():
    """16,384 characters of stop string against text that keeps nearly matching it: each
    token's check used to copy the tail at every candidate start (~10 ms a call)."""
    import time

    from jaxinfer.engine import _stop_prefix_len

    for stop, piece in (("ab" * 8192, "a"), ("a" * 16383 + "b", "a"), (" x" * 8192, "the ")):
        text, emitted, start = "", 0, time.perf_counter()
        for _ in range(2000):
            text += piece
            emitted = max(emitted, len(text) - _stop_prefix_len(text, [stop], emitted))
        assert len(text) - emitted == _longest_held_end(text[-20000:], [stop])
        assert time.perf_counter() - start < 2.0, stop[:4]


def test_abort_frees_pages_and_reports_abort():
    engine = fake_engine(num_pages=8, page_size=16)
    engine.add_request("a", "abc", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.add_request("b", "abc", SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    engine.step()
    engine.abort("a")
    outs = run_all(engine)
    assert outs["a"][-1].finish_reason == "abort" and outs["a"][-1].finished
    assert outs["b"][-1].text == "def"
    assert engine.scheduler.allocator.num_free_pages == 8


@pytest.mark.parametrize("overlap", [True, False])
def test_async_scheduling_queues_the_next_step_before_waiting(overlap):
    """With async scheduling, step N+1 is dispatched before step N's samples are collected (the
    host never leaves the device idle waiting for a plan); without it, never. Same outputs."""
    engine = fake_engine(async_scheduling=overlap, num_decode_steps=1)
    events = []
    dispatch, collect = engine.runner.dispatch, engine.runner.collect
    engine.runner.dispatch = lambda *a: events.append("d") or dispatch(*a)
    engine.runner.collect = lambda h: events.append("c") or collect(h)
    engine.add_request("a", "abc", SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("b", "hij", SamplingParams(max_tokens=4, temperature=0))
    outs = run_all(engine)
    assert outs["a"][-1].text == "defghi" and outs["b"][-1].text == "klmn"
    pending = [
        events[:i].count("d") - events[:i].count("c") for i, e in enumerate(events) if e == "c"
    ]  # dispatched, not yet collected, when each collect starts
    assert events.count("d") == events.count("c") == 6
    if overlap:
        assert pending == [2] * 5 + [1]  # only the last collect has no next step queued
    else:
        assert pending == [1] * 6


def test_impossible_requests_are_refused_at_add():
    engine = fake_engine(num_pages=2, page_size=16)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", "abc", SamplingParams(max_tokens=62))
    with pytest.raises(ValueError, match="pages"):
        engine.add_request("b", "abc", SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("c", "", SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("d", [3, 99], SamplingParams())
    engine.add_request("e", "ab", SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("e", "ab", SamplingParams())


def test_llm_outputs_in_input_order_with_per_prompt_params():
    llm = LLM(
        model=FakeModel(FAKE_CONFIG, {}, LetterTokenizer(), jnp.float32, "xla"),
        max_num_seqs=2,
        max_num_batched_tokens=16,
        num_pages=32,
        warmup=False,
    )
    outs = llm.generate(
        ["abc", "k", "pq"],
        [SamplingParams(max_tokens=n, temperature=0) for n in (3, 1, 2)],
        use_tqdm=False,
    )
    assert [o.text for o in outs] == ["def", "l", "rs"]
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams()] * 2)


# ------------------------------------------------------------------------------------------------
# A real tiny model through the paged engine (reference attention on the CPU).


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-llama3")
    build_hf_model("llama3", path)
    return jaxinfer.load_model(path, dtype="float32")


def prompts_of(model, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, model.config.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize(
    "impl, seats, overlap",
    [("xla", 4, False), ("xla", 4, True), ("pallas", 4, True), ("pallas", 16, True)],
)
def test_staggered_requests_with_preemption_equal_greedy_alone(tiny_model, impl, seats, overlap):
    """16 seats make decode-only steps (T == B == 16) take the split-K decode kernel; `overlap`
    is asynchronous scheduling (step N+1 planned and queued before N's samples reach the host)."""
    prompts = prompts_of(tiny_model, (5, 40, 17, 3, 33, 9))
    news = (12, 6, 20, 15, 9, 14)
    expected = [
        jaxinfer.generate(tiny_model, [p], max_new_tokens=n)[0] for p, n in zip(prompts, news)
    ]
    # 6 pages of 16 slots cannot hold four of these at once: preemption must happen.
    engine = Engine(
        tiny_model,
        max_num_seqs=seats,
        max_num_batched_tokens=24,
        page_size=16,
        num_pages=6,
        warmup=False,
        attention_impl=impl,
        async_scheduling=overlap,
    )
    results, step = {}, 0
    while len(results) < len(prompts):
        if step < len(prompts):  # one new request per step
            engine.add_request(
                str(step),
                prompts[step],
                SamplingParams(max_tokens=news[step], temperature=0, ignore_eos=True),
            )
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.token_ids
        step += 1
    assert [results[i] for i in range(len(prompts))] == expected
    assert engine.stats["preemptions"] > 0
    assert engine.stats["decode_steps"] > 0 or seats < 16
    assert engine.scheduler.allocator.num_free_pages == 6


def test_async_scheduling_equals_sync(tiny_model):
    """Stop ids that end requests early, seeded sampling and a penalty give the same tokens and finish reasons with and without asynchronous scheduling."""
    prompts = prompts_of(tiny_model, (7, 30, 12, 3, 21), seed=3)
    greedy = jaxinfer.generate(tiny_model, [prompts[0]], max_new_tokens=12)[0]
    # the first token not seen before it (the weights are random: the output may repeat one token)
    k = next((i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i]), 0)
    params = [
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[greedy[k]]),  # stops early
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=1.0, seed=9, ignore_eos=True),
    ]

    def run(overlap: bool):
        engine = Engine(
            tiny_model,
            max_num_seqs=3,
            max_num_batched_tokens=32,
            page_size=16,
            num_pages=8,
            warmup=False,
            attention_impl="xla",
            async_scheduling=overlap,
        )
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), p, sp)
        final = {rid: outs[-1] for rid, outs in run_all(engine).items()}
        assert engine.scheduler.allocator.num_free_pages == 8
        return {rid: (o.token_ids, o.finish_reason) for rid, o in final.items()}

    sync, overlapped = run(False), run(True)
    assert overlapped == sync
    assert sync["0"] == (greedy[: k + 1], "stop")
    assert sync["3"][0] and len(sync["3"][0]) == 1


def penalized_greedy(model, prompt, n: int, bias: dict, rep: float, freq: float, pres: float):
    """n greedy tokens of `prompt` under a logit_bias and vLLM's penalties, one full forward a
    token (numpy)."""
    out = []
    for _ in range(n):
        logits = np.asarray(jaxinfer.forward(model, [prompt + out]))[0, -1].astype(np.float64)
        for t, b in bias.items():
            logits[t] += b
        seen = np.zeros(logits.shape, bool)
        seen[prompt + out] = True
        counts = np.bincount(out, minlength=logits.shape[0])
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0)
        out.append(int(np.argmax(logits)))
    return out


BIAS = 3.0  # on a favourite token: over the tiny model's logits, less than its penalties


def test_penalized_steps_overlap_and_penalize_the_sample_in_flight(tiny_model):
    """A step with penalties is queued while the step before runs: each row's last token (that
    step's sample, still on the device) is in its history all the same, whichever row it had.
    A logit_bias makes one token each request's favourite, so that only its penalties keep it
    from coming again at once. Three such requests beside a plain one, rows reordered as the
    plain one ends. The third grows past 128 tokens, so its steps' history widens. Single steps
    (a GPU's default is multi-step decodes, which take penalties and bias as well)."""
    prompts = prompts_of(tiny_model, (9, 4, 124, 6), seed=8)
    favourite = [t for t in range(tiny_model.config.vocab_size) if t not in sum(prompts, [])][:3]
    # (repetition, frequency, presence)
    settings = [(4.0, 0.0, 0.0), (1.0, 2.0, 0.0), (1.0, 1.0, 1.5)]
    engine = Engine(
        tiny_model,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        page_size=16,
        num_pages=16,
        warmup=False,
        attention_impl="xla",
        num_decode_steps=1,
    )
    widths = []  # of each step's history
    arrays = engine.runner._histories.arrays

    def record_width(*args):
        out = arrays(*args)
        widths.extend([] if out is None else [out[0].shape[1]])
        return out

    engine.runner._histories.arrays = record_width
    greedy = dict(temperature=0, ignore_eos=True)
    engine.add_request("plain", prompts[3], SamplingParams(max_tokens=3, **greedy))
    for i, (rep, freq, pres) in enumerate(settings):
        params = SamplingParams(
            max_tokens=10,
            logit_bias={favourite[i]: BIAS},
            repetition_penalty=rep,
            frequency_penalty=freq,
            presence_penalty=pres,
            **greedy,
        )
        engine.add_request(str(i), prompts[i], params)
    overlapped = 0
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        overlapped += engine._in_flight is not None and bool(outs)
        for out in outs:
            seen.setdefault(out.request_id, []).append(out)
    assert overlapped >= 8  # steps that returned outputs with the next one queued
    assert widths[0] == 128 and widths[-1] == 256 and sorted(widths) == widths
    for i, (rep, freq, pres) in enumerate(settings):
        bias = {favourite[i]: BIAS}
        want = penalized_greedy(tiny_model, prompts[i], 10, bias, rep, freq, pres)
        # it comes before the last token: the step after it finds it in flight, and without
        # its penalties would pick it again (its logit_bias)
        assert favourite[i] in want[:-1], want
        assert seen[str(i)][-1].token_ids == want, i


def test_token_histories_copy_what_is_new_and_match_the_lists():
    """`TokenHistories` keeps each penalized sequence's ids from step to step: its arrays equal
    the whole lists' (a sample in flight as -2 - its row before; the j-th of a multi-step
    decode's as -2 - R (1 + j) - its row) as tokens resolve and arrive, and a request id reused
    by a new sequence (another arrival) starts afresh."""
    import types

    from jaxinfer.runner import RowInfo, TokenHistories
    from jaxinfer.scheduler import PLACEHOLDER

    seats = 4
    histories, pen = TokenHistories(16, seats), SamplingParams(repetition_penalty=1.2)
    lists = {"a": [5, 6, 7], "b": [9, PLACEHOLDER]}

    def step(arrivals: dict, prev_rows: dict, multi: bool = False):
        plan = types.SimpleNamespace(
            seqs=[types.SimpleNamespace(request_id=r, arrival=arrivals[r]) for r in lists]
        )
        rows = [RowInfo(pen, 0, 1, t, 2, (), False, None) for t in lists.values()]
        return histories.arrays(plan, rows, 3, prev_rows, multi)

    def expected(prev_rows: dict, multi: bool = False):
        ids = np.full((3, 16), -1, np.int32)
        for i, (r, t) in enumerate(lists.items()):
            ids[i, : len(t)] = t
            pending = [j for j, x in enumerate(t) if x == PLACEHOLDER]
            for j, at in enumerate(pending):
                row = prev_rows[r]
                ids[i, at] = -2 - seats * (1 + j) - row if multi else -2 - row
        return ids

    ids, is_output = step({"a": 0, "b": 1}, {"b": 0})
    np.testing.assert_array_equal(ids, expected({"b": 0}))
    assert ids[1, :2].tolist() == [9, -2]
    assert is_output[0].tolist() == [False] * 2 + [True] + [False] * 13
    lists["b"][-1] = 4  # resolved
    lists["b"].append(PLACEHOLDER)
    lists["a"].append(PLACEHOLDER)
    np.testing.assert_array_equal(
        step({"a": 0, "b": 1}, {"a": 1, "b": 0})[0], expected({"a": 1, "b": 0})
    )
    lists["a"][-1], lists["b"][-1] = 8, 3
    lists["b"].extend([PLACEHOLDER] * 3)  # a multi-step decode's three samples
    lists["a"].extend([PLACEHOLDER] * 2)
    ids = step({"a": 0, "b": 1}, {"a": 0, "b": 1}, multi=True)[0]
    np.testing.assert_array_equal(ids, expected({"a": 0, "b": 1}, multi=True))
    assert ids[1, :7].tolist() == [9, 4, 3, -7, -11, -15, -1]  # R = 4, row 1
    lists["b"][-3:] = [10, 11, 12]
    lists["a"][-2:] = [13, 14]
    lists["a"].append(PLACEHOLDER)
    ids = step({"a": 0, "b": 1}, {"a": 0})[0]
    np.testing.assert_array_equal(ids, expected({"a": 0}))
    assert ids[0, :7].tolist() == [5, 6, 7, 8, 13, 14, -2]
    lists["a"] = [1, 2]  # "a" again, a new sequence
    np.testing.assert_array_equal(step({"a": 2, "b": 1}, {})[0], expected({}))
    assert step({"a": 2, "b": 1}, {})[0][1, :7].tolist() == [9, 4, 3, 10, 11, 12, -1]


def test_history_widths_double_up_to_the_context():
    from jaxinfer.runner import history_widths

    assert history_widths(8192) == (128, 256, 512, 1024, 2048, 4096, 8192)
    assert history_widths(1000) == (128, 256, 512, 1000)
    assert history_widths(128) == (128,) and history_widths(64) == (64,)


def test_prefix_cache_hits_skip_compute_and_match(tiny_model):
    shared = prompts_of(tiny_model, (40,), seed=1)[0]
    a, b = shared + [1, 2, 3], shared + [4, 5]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [jaxinfer.generate(tiny_model, [p], max_new_tokens=8)[0] for p in (a, b)]
    engine = Engine(
        tiny_model,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        page_size=16,
        num_pages=16,
        warmup=False,
        attention_impl="xla",
    )
    engine.add_request("a", a, params)
    first = run_all(engine)["a"][-1]
    computed = engine.stats["computed_tokens"]
    engine.add_request("b", b, params)
    second = run_all(engine)["b"][-1]
    assert [first.token_ids, second.token_ids] == expected
    assert second.num_cached_tokens == 32  # two full pages of the shared 40 tokens
    assert engine.stats["computed_tokens"] - computed == len(b) - 32 + 7


def test_seeded_sampling_is_batch_independent(tiny_model):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = prompts_of(tiny_model, (7,), seed=3)[0]

    def run(others: int):
        engine = Engine(
            tiny_model,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            page_size=16,
            num_pages=32,
            warmup=False,
            attention_impl="xla",
        )
        for i, p in enumerate(prompts_of(tiny_model, (5,) * others, seed=4)):
            engine.add_request(f"o{i}", p, SamplingParams(max_tokens=12, temperature=0.8, seed=i))
        engine.add_request("x", prompt, params)
        return run_all(engine)["x"][-1].token_ids

    alone, crowded = run(0), run(5)
    assert alone == crowded and len(alone) == 10
    # generate()'s first row draws from the seed itself, as a request with that seed does
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    (first, _) = jaxinfer.generate(tiny_model, [prompt, prompt], **kwargs)
    assert list(first) == alone


@pytest.mark.parametrize("plain_rows", ["0", "4"])
def test_no_recompiles_after_warmup(tiny_model, monkeypatch, plain_rows):
    """With 4 decode steps a program, the decode programs of 4 rows in their own jit (compiled for
    cuBLAS on a GPU) and those of fewer rows in the plain one: one engine checks both jits.
    With $JAXINFER_PLAIN_DECODE_ROWS=4 the 4-row decode programs have a twin that adjusts no
    logits. (test_engine_stress checks the same of an engine of single steps.)"""
    monkeypatch.setenv("JAXINFER_PLAIN_DECODE_ROWS", plain_rows)
    twins = 2 if plain_rows == "4" else 1  # of the 4-row programs
    monkeypatch.setenv("JAXINFER_DECODE_CUBLAS", "1")
    monkeypatch.setattr(runner_module, "CUBLAS_DECODE_ROWS", 4)
    with xla_compiles() as at_start:
        engine = Engine(
            tiny_model,
            max_num_seqs=4,
            max_num_batched_tokens=32,
            page_size=16,
            num_pages=24,
            warmup=True,
            attention_impl="xla",
            num_decode_steps=4,
        )
    compiled = engine.runner.num_compiles
    buckets = engine.runner.buckets
    rows = len({min(t, 4) for t in buckets})
    # each bucket's forward, the prompt-logprobs steps' forward, and a multi-step decode
    # program per row bucket and sampler mode (and a twin of the 4-row ones)
    modes = len(engine.runner.sampler_modes())  # SAMPLE_MODES and TOP_K_ONLY
    forwards, decodes = len(buckets) + 1, modes * (rows - 1 + twins)
    samplers = modes * rows  # per row bucket and mode
    # per row bucket, and bias width or history width (the penalty state); the penalties; the
    # decodes' penalty state where no row has penalties
    biases = len(BIAS_WIDTHS) * rows
    states, penalties = len(engine.runner._histories.widths) * rows, rows
    assert engine.runner._histories.widths == (128, engine.max_model_len) == (128, 256)
    adjusts = biases + states + penalties + rows
    assert compiled == forwards + decodes + samplers + adjusts
    # Each traced once and compiled once: none again for the pools its first calls hand back.
    names = ("_forward_fn", "_decode_fn", "_sample_fn", "_add_bias_fn", "_penalty_state_fn")
    names = (*names, "_penalize_fn", "_no_penalty_state_fn")
    compiled_at_start = [at_start[f"jit({f})"] for f in names]
    assert compiled_at_start == [forwards, decodes, samplers, biases, states, penalties, rows]
    rng = np.random.RandomState(5)
    with xla_compiles() as later:
        serve_random_requests(engine, rng)
    assert engine.stats["steps"] >= 120 // 4
    assert engine.runner.num_compiles == compiled
    assert not later  # no program, not even a small op, compiles after start-up
    runner = engine.runner  # one program (and its twin) per sampler mode: the 4-row bucket's
    assert runner._decode_program(4) is runner._decode_cublas
    assert runner._decode_program(1) is runner._decode
    assert runner._decode_cublas._cache_size() == twins * modes


# Request options whose steps adjust the logits in programs of their own: logit bias of each
# width (16 entries, and 17 + EOS: 512), min_tokens' bans, penalties.
ADJUSTMENTS = (
    {},
    {"logit_bias": {5: 3.0, 7: -100.0}},
    {"min_tokens": 1},
    {"repetition_penalty": 1.3, "frequency_penalty": 0.5},
    {"logit_bias": {t: 1.0 for t in range(17)}, "min_tokens": 1, "presence_penalty": 0.5},
    {},
)


def serve_random_requests(engine, rng):
    """200 steps, a request of random length and sampling every 7th of the first 160, some with
    `ADJUSTMENTS`."""
    for step in range(200):
        if step % 7 == 0 and step < 160:
            n = int(rng.randint(1, 40))
            engine.add_request(
                f"r{step}",
                rng.randint(0, 300, n).tolist(),
                SamplingParams(
                    max_tokens=int(rng.randint(1, 20)),
                    temperature=float(rng.choice([0, 0, 0.7, 0.7, 1])),
                    top_k=int(rng.choice([0, 5])),
                    logprobs=[None, 2][step % 2],
                    **ADJUSTMENTS[step // 7 % len(ADJUSTMENTS)],
                ),
            )
        engine.step()


# Float32 logprobs of an engine step against forward()'s: on a GPU float32 matmuls run in TF32.
LOGPROB_TOL = 5e-3 if jax.default_backend() == "gpu" else 1e-4


def test_logprobs_are_log_softmax_of_the_model(tiny_model):
    prompt = prompts_of(tiny_model, (6,), seed=6)[0]
    engine = Engine(
        tiny_model,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        num_pages=8,
        warmup=False,
        attention_impl="xla",
    )
    engine.add_request(
        "a", prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    )
    out = run_all(engine)["a"][-1]
    logits = np.asarray(jaxinfer.forward(tiny_model, [prompt + out.token_ids]))[0]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert token in entry and abs(entry[token] - row[token]) < LOGPROB_TOL
        top = np.argsort(-row)[:4]
        assert set(top.tolist()) <= set(entry)


def test_compiled_steps_go_to_the_persistent_cache(tiny_model, tmp_path):
    import jax

    old = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    from jax._src import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()  # the suite's own cache, in use already, is let go
    try:
        Engine(  # one seat, one token a step: the fewest programs a warm-up compiles
            tiny_model,
            max_num_seqs=1,
            max_num_batched_tokens=1,
            num_pages=8,
            warmup=True,
            attention_impl="xla",
            compilation_cache_dir=str(tmp_path / "xla"),
        )
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert any((tmp_path / "xla").iterdir())  # the warm-up's step was written there
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        compilation_cache.reset_cache()  # JAX memoises the cache in use: later tests get theirs


def test_the_pool_leaves_room_for_the_programs_working_memory(tiny_model, monkeypatch):
    """A pool sized from free memory leaves the largest compiled program's temporaries and
    outputs free (XLA's memory analysis), so a large step can't run out of memory after start-up:
    with little free memory it shrinks, its programs are compiled for the smaller pool, and the
    engine serves with no compile after; a given num_pages that can't fit beside them is refused
    by name. (On an H200, Mixtral-8x7B's 8,192-token step needs 5.3 GiB of temporaries.)"""
    from jaxinfer import engine as engine_module

    options = dict(
        max_num_seqs=4,
        max_num_batched_tokens=32,
        page_size=16,
        attention_impl="xla",
        enable_prefix_caching=False,
        max_model_len=256,  # a CPU pool holds at most every seat's whole context: 64 pages
    )
    probe = Engine(tiny_model, num_pages=8, warmup=False, **options)
    need, page = probe.runner.compile_programs(progress=False), probe._page_bytes()
    probe.close()
    assert need > 64 * page  # the tiny model's 32-token forward: ~1.2 MB of temporaries
    margin = 2 * page
    free = need + margin + 40 * page + 100
    monkeypatch.setattr(engine_module, "WORKING_MEMORY_MARGIN", margin)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda devices=None: free)
    # free memory in pieces: the pool and the temporaries count on the largest alone
    monkeypatch.setattr(engine_module, "largest_free_block_bytes", lambda d=None: free - 5 * page)

    engine = Engine(tiny_model, warmup=True, **options)
    assert engine.num_pages == 35  # the largest free block less the programs' need and margin
    assert int(free * 0.9) // page > 64  # the fraction alone would have taken all 64
    prompts = prompts_of(tiny_model, (5, 30, 12), seed=2)
    greedy = [jaxinfer.generate(tiny_model, [p], max_new_tokens=9)[0] for p in prompts]
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    with xla_compiles() as later:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        seen = run_all(engine)
    assert [seen[str(i)][-1].token_ids for i in range(3)] == greedy
    assert not later  # the programs were compiled for the pool that was made
    engine.close()

    with pytest.raises(ValueError, match=r"num_pages=48 .* the programs need"):
        Engine(tiny_model, warmup=True, num_pages=48, **options)


def test_block_tables_as_wide_as_the_step_needs_on_the_xla_path(tiny_model):
    """Programs compiled on first use read tables of a power-of-two width that holds the step's
    longest sequence, not the whole context (the XLA attention gathers every listed page); the
    tokens are those of full-width tables."""
    prompts = prompts_of(tiny_model, (5, 70, 20), seed=4)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    options = dict(
        max_num_seqs=4, num_pages=64, max_model_len=256, attention_impl="xla", warmup=False
    )
    llm = LLM(model=tiny_model, **options)
    widths = []
    build = llm.engine.runner.build
    llm.engine.runner.build = lambda plan, rows, **kw: (
        widths.append(build(plan, rows, **kw).meta.block_tables.shape[1]) or build(plan, rows, **kw)
    )
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.runner.max_pages_per_seq == 16
    assert set(widths) <= {1, 2, 4, 8} and 8 in widths  # 70 + 10 tokens: 5 pages -> 8
    full = LLM(model=tiny_model, **options)
    full.engine.runner.bucket_tables = False
    assert got == [o.token_ids for o in full.generate(prompts, params, use_tqdm=False)]


def test_close_frees_the_kv_pages_and_ends_the_engine():
    """A dropped engine keeps its pools (it froze itself out of the cyclic GC); `close` frees
    them, and the engine refuses work after it."""
    import gc

    import jax

    def live_bytes():
        return sum(x.nbytes for x in jax.live_arrays())

    before = live_bytes()
    with fake_engine(num_decode_steps=1) as engine:
        engine.add_request("a", "abc", SamplingParams(max_tokens=3, temperature=0))
        assert run_all(engine)["a"][-1].text == "def"
        pools = sum(x.nbytes for x in jax.tree.leaves(engine.runner.pages))
        assert pools > 0 and live_bytes() >= before + pools
    gc.collect()
    assert live_bytes() - before < pools / 100  # a few step-state scalars may stay
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.step()
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.add_request("b", "abc")


def test_logprobs_of_a_vocabulary_smaller_than_asked_are_real_tokens():
    """logprobs=12 of an 8-token vocabulary: the 8 tokens, no padding id -1."""
    cfg = dataclasses.replace(FAKE_CONFIG, vocab_size=8, eos_token_ids=(7,))
    model = Model(cfg, init_params(cfg, "float32", seed=0), None, jnp.float32, "xla")
    engine = Engine(model, max_num_seqs=2, max_num_batched_tokens=16, num_pages=8, warmup=False)
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=12, ignore_eos=True)
    engine.add_request("a", [1, 2], params)
    logprobs = run_all(engine)["a"][-1].logprobs
    assert len(logprobs) == 3 and all(sorted(lp) == list(range(8)) for lp in logprobs)


def test_the_compile_bar_is_quiet_where_the_log_is():
    """JAXINFER_LOG_LEVEL=WARNING quiets the compile progress bar too (README)."""
    from jaxinfer.platform import logger
    from jaxinfer.runner import _progress_bar

    level = logger.level
    try:
        assert not _progress_bar(3, "test").disable
        logger.setLevel("WARNING")
        assert _progress_bar(3, "test").disable
    finally:
        logger.setLevel(level)
