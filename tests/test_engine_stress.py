"""Property-based stress test of the Engine: random interleavings of add_request (valid and
invalid parameters, re-used ids), abort and step on a tiny float32 model. After every step:
step() did not raise, the page allocator's invariants hold; at the end every accepted request
ended exactly once with the right length and reason, every page is back, and every greedy output
equals the same request run alone.

The example budget is fixed (and the examples derandomized) to stay inside CI time; a longer run:
`JAXINFER_STRESS_EXAMPLES=500 pytest tests/test_engine_stress.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import pytest
from conftest import build_hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxinfer
from jaxinfer.engine import Engine
from jaxinfer.sampling import BIAS_WIDTHS, SAMPLE_MODES, SamplingParams

EXAMPLES = int(os.environ.get("JAXINFER_STRESS_EXAMPLES", "30"))
VOCAB = 320  # conftest.TINY
MAX_MODEL_LEN = 64
MAX_TOKENS = 10  # most output tokens a valid request asks for
IDS = "abcde"  # few ids: they are re-used often, also while the old request's step is in flight


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine for every example, its buckets compiled once; 12 pages of 16 slots hold fewer
    than four long requests, so preemption happens. Single steps (decode steps are the GPU's),
    no program routed to cuBLAS."""
    path = tmp_path_factory.mktemp("stress-llama3")
    build_hf_model("llama3", path)
    model = jaxinfer.load_model(path, dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXINFER_DECODE_CUBLAS", "0")
        return Engine(
            model,
            max_num_seqs=4,
            max_num_batched_tokens=32,
            page_size=16,
            num_pages=12,
            max_model_len=MAX_MODEL_LEN,
            warmup=True,
            num_decode_steps=1,
        )


def test_warmup_compiles_each_program_once(engine):
    """The warm-up's programs: each token bucket's forward, plus its decode-only form where
    T <= seats and the forward of prompt-logprobs steps, and the sampler of each row bucket in
    each mode, and per row bucket the programs that add logit bias (one per width), make the
    penalty state (one per history width) and apply the penalties; no second decode jit. (The
    examples below check that no step compiles more; test_engine checks the same with decode
    steps.)"""
    runner = engine.runner
    buckets = runner.buckets
    rows = len({min(t, 4) for t in buckets})
    forwards = len(buckets) + sum(t <= 4 for t in buckets) + 1
    adjusts = (len(BIAS_WIDTHS) + len(runner._histories.widths) + 1) * rows
    assert runner.num_compiles == forwards + len(runner.sampler_modes()) * rows + adjusts
    assert runner.sampler_modes() == (*SAMPLE_MODES, "filter_top_k")
    assert runner.cublas_rows is None and runner._decode_cublas is None


_alone_cache: dict[tuple[int, ...], list[int]] = {}


def alone(model, prompt: list[int]) -> list[int]:
    """The first MAX_TOKENS greedy tokens of `prompt` run by itself (jaxinfer.generate)."""
    key = tuple(prompt)
    if key not in _alone_cache:
        _alone_cache[key] = jaxinfer.generate(model, [prompt], max_new_tokens=MAX_TOKENS)[0]
    return _alone_cache[key]


# ---- strategies ----

# Shared prefixes (whole pages of 16) make the prefix cache hit.
PREFIX = list(range(7, 39))
prompts = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    st.builds(
        lambda n, tail: PREFIX[:n] + tail,
        st.sampled_from([16, 32]),
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
    ),
)
valid_params = st.fixed_dictionaries(
    {
        "max_tokens": st.integers(1, MAX_TOKENS),
        "temperature": st.sampled_from([0.0, 0.0, 0.8]),
        "top_k": st.sampled_from([0, 5, 2**31 - 1]),
        "seed": st.sampled_from([None, 3]),
        "stop_token_ids": st.sampled_from([None, [], [5, 77]]),
        "logprobs": st.sampled_from([None, 2]),
        "ignore_eos": st.just(True),
    }
)
# Each makes SamplingParams or add_request refuse the request.
invalid_changes = st.sampled_from(
    [
        {"max_tokens": 0},
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"top_k": 2**31},
        {"top_p": 0.0},
        {"seed": -1},
        {"max_tokens": True},
        {"stop_token_ids": [VOCAB]},
        {"stop_token_ids": [1.5]},
        {"max_tokens": MAX_MODEL_LEN},
    ]
)
add = st.tuples(
    st.just("add"),
    st.sampled_from(IDS),
    prompts,
    valid_params,
    st.one_of(st.none(), st.none(), st.none(), invalid_changes),
)
abort = st.tuples(st.just("abort"), st.sampled_from(IDS))
step = st.tuples(st.just("step"), st.integers(1, 3))
bad_prompt = st.tuples(
    st.just("add_bad_prompt"),
    st.sampled_from(IDS),
    st.sampled_from([[], [VOCAB], [-1], [1, True], "text", [1] * 60]),
)
operations = st.lists(st.one_of(add, add, abort, step, step, bad_prompt), min_size=1, max_size=30)


# ---- the reference: what each accepted request must end with ----


@dataclasses.dataclass
class Expected:
    prompt: list[int]
    params: SamplingParams
    greedy_tokens: list[int] | None  # the alone run cut at its stop token; None when sampled
    aborted: bool = False

    def check(self, out) -> None:
        tokens, p = out.token_ids, self.params
        assert len(tokens) <= p.max_tokens
        if self.greedy_tokens is not None:  # a prefix of the alone run; all of it at the end
            assert tokens == self.greedy_tokens[: len(tokens)], (tokens, self.greedy_tokens)
        if not out.finished:
            return
        assert out.error is None
        if self.aborted:
            assert out.finish_reason == "abort"
        elif out.finish_reason == "stop":
            assert tokens[-1] in p.stop_token_ids
        else:
            assert out.finish_reason == "length" and len(tokens) == p.max_tokens
        if self.greedy_tokens is not None and not self.aborted:
            assert tokens == self.greedy_tokens
        assert all(t not in p.stop_token_ids for t in tokens[:-1])


def expected_of(model, prompt, params: SamplingParams) -> Expected:
    if params.temperature > 0:
        return Expected(prompt, params, None)
    tokens = alone(model, prompt)[: params.max_tokens]
    stops = [i for i, t in enumerate(tokens) if t in params.stop_token_ids]
    return Expected(prompt, params, tokens[: stops[0] + 1] if stops else tokens)


class Reference:
    """The requests each id has had, oldest first; outputs of an id belong to its oldest."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.instances: dict[str, collections.deque[Expected]] = collections.defaultdict(
            collections.deque
        )
        self.live: set[str] = set()  # ids of accepted requests that have not ended

    def add(self, rid, prompt, params, invalid) -> None:
        try:
            sp = SamplingParams(**{**params, **(invalid or {})})
            self.engine.add_request(rid, prompt, sp)
        except ValueError:
            assert invalid is not None or rid in self.live
            return
        assert invalid is None and rid not in self.live
        self.instances[rid].append(expected_of(self.engine.model, prompt, sp))
        self.live.add(rid)

    def add_bad_prompt(self, rid, prompt) -> None:
        with pytest.raises(ValueError):
            self.engine.add_request(rid, prompt, SamplingParams(max_tokens=8))

    def abort(self, rid) -> None:
        self.engine.abort(rid)
        if rid in self.live:
            self.instances[rid][-1].aborted = True
            self.live.discard(rid)

    def step(self) -> None:
        for out in self.engine.step():  # must not raise
            assert self.instances[out.request_id], f"output for no request: {out}"
            self.instances[out.request_id][0].check(out)
            if out.finished:
                self.instances[out.request_id].popleft()
                if not self.instances[out.request_id]:
                    self.live.discard(out.request_id)
        scheduler = self.engine.scheduler
        scheduler.allocator.check_invariants(scheduler.running + list(scheduler.waiting))

    def drain(self) -> None:
        for _ in range(500):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
        assert not self.engine.has_unfinished_requests(), "requests never finished"
        assert not any(self.instances.values()), "an accepted request never ended"
        assert self.engine.scheduler.allocator.num_free_pages == self.engine.num_pages


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 30,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(ops=operations)
def test_random_interleavings_keep_the_engine_sound(engine, ops):
    for rid in list(engine.requests):  # a failed example (while shrinking) may leave some
        engine.abort(rid)
    while engine.has_unfinished_requests():
        engine.step()
    ref = Reference(engine)
    compiles = engine.runner.num_compiles
    for op, *args in ops:
        if op == "step":
            for _ in range(args[0]):
                ref.step()
        else:
            getattr(ref, op)(*args)
    ref.drain()
    assert engine.runner.num_compiles == compiles  # warmed up once: nothing compiles again
