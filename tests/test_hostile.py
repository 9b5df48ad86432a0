"""The engine and the public API under hostile but fair input: re-used request ids, bad values of
every kind, faults inside a step. No request may break the engine; every refusal is a ValueError
that names the field, the value and the allowed range."""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
import pytest
from conftest import build_hf_model
from test_engine import fake_engine, run_all

import jaxinfer
from jaxinfer.engine import LLM, Engine
from jaxinfer.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
FILTERED = dict(temperature=1.0, min_p=1.0, ignore_eos=True)  # sampler mode "filter"; the argmax


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile-llama3")
    build_hf_model("llama3", path)
    return jaxinfer.load_model(path, dtype="float32")


def tiny_engine(model, **options) -> Engine:
    defaults = dict(max_num_seqs=4, max_num_batched_tokens=32, num_pages=24, warmup=False)
    return Engine(model, **{**defaults, **options})


def prompt(model, n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(0, model.config.vocab_size, n).tolist()


def alone(model, ids: list[int], n: int) -> list[int]:
    return jaxinfer.generate(model, [ids], max_new_tokens=n)[0]


def assert_all_pages_back(engine: Engine) -> None:
    allocator = engine.scheduler.allocator
    allocator.check_invariants([])
    assert allocator.num_free_pages == engine.num_pages


# ---- defect 1: a re-used id never takes the results of the step in flight ----------------------


def test_id_reused_after_abort_with_its_step_in_flight(tiny_model):
    engine = tiny_engine(tiny_model)
    first, second = prompt(tiny_model, 9, 0), prompt(tiny_model, 6, 1)
    engine.add_request("Y", first, SamplingParams(max_tokens=10, **GREEDY))
    for _ in range(3):
        engine.step()
    engine.abort("Y")
    engine.add_request("Y", second, SamplingParams(max_tokens=4, **GREEDY))
    finals = [o for o in run_all(engine)["Y"] if o.finished]
    assert [o.finish_reason for o in finals] == ["abort", "length"]
    assert finals[1].token_ids == alone(tiny_model, second, 4)
    assert_all_pages_back(engine)


def test_id_reused_after_a_stop_token_while_others_run(tiny_model):
    engine = tiny_engine(tiny_model)
    other = prompt(tiny_model, 12, 3)
    # A prompt whose greedy tokens bring a new one within 8 (a random model may repeat one
    # token), so that the stop token ends it at token k >= 1, never at its first token.
    for seed in range(2, 40):
        ids = prompt(tiny_model, 7, seed)
        expected = alone(tiny_model, ids, 8)
        k = next((i for i in range(1, 8) if expected[i] not in expected[:i]), None)
        if k is not None:
            break
    assert k is not None, "the random model repeats one token after every prompt tried"
    engine.add_request("long", other, SamplingParams(max_tokens=30, **GREEDY))
    engine.add_request(
        "S", ids, SamplingParams(max_tokens=8, stop_token_ids=[expected[k]], **GREEDY)
    )
    outputs, reused = {}, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
            if out.request_id == "S" and out.finished and not reused:
                # the step dispatched before this one still computes the old "S"
                engine.add_request("S", ids, SamplingParams(max_tokens=8, **GREEDY))
                reused = True
    finals = [o for o in outputs["S"] if o.finished]
    assert [o.finish_reason for o in finals] == ["stop", "length"]
    assert finals[0].token_ids == expected[: k + 1] and finals[1].token_ids == expected
    assert outputs["long"][-1].token_ids == alone(tiny_model, other, 30)
    assert_all_pages_back(engine)


def test_abort_with_a_sample_in_flight_drops_that_token():
    engine = fake_engine()
    engine.add_request("a", "abc", SamplingParams(max_tokens=5, temperature=0))
    engine.step()  # dispatched and committed: its sample is a placeholder until resolved
    engine.abort("a")
    (out,) = engine.step()
    assert out.finish_reason == "abort" and out.token_ids == [] and out.new_token_ids == []


# ---- defect 2: LLM.generate checks everything before it queues anything ------------------------


def test_llm_generate_queues_nothing_when_one_prompt_is_bad(tiny_model):
    llm = LLM(
        model=tiny_model, max_num_seqs=4, max_num_batched_tokens=32, num_pages=24, warmup=False
    )
    good = prompt(tiny_model, 5, 4)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: prompt\[1\]: token id 100000 is outside"):
        llm.generate([good, [3, 100_000], good], SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match=r"^prompts\[2\]: prompt must be a non-empty list"):
        llm.generate([good, good, []], SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match=r"give model_path \(with dtype\) or a loaded model"):
        LLM("/some/path", model=tiny_model)
    with pytest.raises(ValueError, match="got 2 sampling_params for 3 prompts"):
        llm.generate([good] * 3, [SamplingParams()] * 2)
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([good], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert out.token_ids == alone(tiny_model, good, 3)


def test_llm_generate_aborts_its_requests_when_interrupted(tiny_model, monkeypatch):
    llm = LLM(
        model=tiny_model, max_num_seqs=4, max_num_batched_tokens=32, num_pages=24, warmup=False
    )
    good = prompt(tiny_model, 5, 5)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([good, good], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished()
    (out,) = llm.generate(
        np.asarray(good), SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False
    )  # a 1-D array is one prompt; old aborts are not ours
    assert out.token_ids == alone(tiny_model, good, 3)


def test_llm_generate_takes_arrays_of_prompts(tiny_model):
    llm = LLM(
        model=tiny_model, max_num_seqs=4, max_num_batched_tokens=32, num_pages=24, warmup=False
    )
    block = np.asarray([prompt(tiny_model, 4, 6), prompt(tiny_model, 4, 7)])  # [B, T]
    outs = llm.generate(block, SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert [o.token_ids for o in outs] == jaxinfer.generate(tiny_model, block, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([])


# ---- defect 3 and the validation layer ---------------------------------------------------------


def test_top_k_is_bounded_and_a_huge_one_keeps_every_token(tiny_model):
    with pytest.raises(
        ValueError,
        match=r"top_k must be an integer in \[0, 2147483647\], "
        r"got 2147483648",
    ):
        SamplingParams(top_k=2**31)
    engine = tiny_engine(tiny_model)
    ids = prompt(tiny_model, 6, 8)
    for rid, k in (("off", 0), ("huge", 2**31 - 1), ("vocab", tiny_model.config.vocab_size)):
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=6, top_k=k, seed=11, ignore_eos=True)
        )
    final = {rid: outs[-1].token_ids for rid, outs in run_all(engine).items()}
    assert final["huge"] == final["off"] == final["vocab"]


def test_numpy_scalars_are_numbers_and_bools_are_not():
    p = SamplingParams(
        max_tokens=np.int64(4),
        temperature=np.float32(0.5),
        top_k=np.int32(3),
        top_p=np.float64(0.9),
        seed=np.uint32(7),
        logprobs=np.int8(2),
        stop_token_ids=np.asarray([5, 6]),
        ignore_eos=np.bool_(True),
    )
    assert (p.max_tokens, p.top_k, p.seed, p.logprobs, p.stop_token_ids) == (4, 3, 7, 2, (5, 6))
    assert type(p.max_tokens) is int and type(p.temperature) is float and p.ignore_eos is True
    for field in ("max_tokens", "temperature", "top_k", "top_p", "seed", "min_p", "logprobs"):
        with pytest.raises(ValueError, match=rf"^{field} must be .*, got True"):
            SamplingParams(**{field: True})


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "temperature",
            float("nan"),
            r"temperature must be a finite float32 number >= 0.0, got nan",
        ),
        (
            "temperature",
            float("inf"),
            r"temperature must be a finite float32 number >= 0.0, got inf",
        ),
        ("temperature", 1e39, r"temperature must be a finite float32 number"),
        ("top_p", 0, r"top_p must be a finite float32 number in \(0.0, 1.0\], got 0"),
        ("max_tokens", 2.0, r"max_tokens must be an integer >= 1, got 2.0"),
        ("seed", 1.5, r"seed must be an integer >= 0, got 1.5"),
        ("stop_token_ids", [1.5], r"stop_token_ids\[0\] must be an integer >= 0, got 1.5"),
        ("stop_token_ids", [True], r"stop_token_ids\[0\] must be an integer >= 0, got True"),
        ("stop_token_ids", 5, r"stop_token_ids must be a list, got int 5"),
        ("stop", ["ok", "\ud800"], r"stop\[1\] has a lone surrogate"),
        ("stop", [3], r"stop\[0\] must be a non-empty string, got 3"),
        ("ignore_eos", 1, r"ignore_eos must be True or False, got 1"),
        ("temperature", 10**400, r"temperature must be a finite float32 number >= 0.0, got 1000"),
        ("stop", ["x"] * 65, r"stop has 65 strings, more than 64"),
        ("stop", ["x" * 9000] * 2, r"stop's strings hold 18000 characters together"),
        # above 0, but 0 in float32 (or flushed to it): every token was filtered out, id 0 drawn
        ("top_p", 1e-39, r"top_p must be .* got 1e-39 \(below float32's smallest normal"),
        ("repetition_penalty", 1e-300, r"repetition_penalty must be .* got 1e-300 \(below"),
        # counted before they are checked: 4 million ids held a front's thread for seconds
        ("stop_token_ids", (1.5,) * 1025, r"stop_token_ids has 1025 ids, more than 1024"),
        ("stop_token_ids", np.zeros(2000, np.int32), r"stop_token_ids has 2000 ids"),
    ],
)
def test_refusals_name_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_none_is_an_empty_list():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert p.stop == () and p.stop_token_ids == ()
    assert SamplingParams(stop="end").stop == ("end",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(seed=1.5), r"seed must be an integer >= 0, got 1.5"),
        (dict(seed="abc"), r"seed must be an integer >= 0, got 'abc'"),
        (dict(seed=True), r"seed must be an integer >= 0, got True"),
        (dict(top_k=2**31), r"top_k must be an integer in \[0, 2147483647\]"),
        (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 1, got True"),
        (dict(stop_token_ids=[10**6]), r"stop_token_ids\[0\]: token id 1000000 is outside"),
        (dict(prompts=[[1, True]]), r"prompt 0\[1\] must be an integer >= 0, got True"),
        (dict(prompts="abc"), r"prompts must be a list, got str"),
    ],
)
def test_generate_and_stream_check_every_argument(tiny_model, kwargs, message):
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxinfer.generate(tiny_model, args.pop("prompts"), **args)
    if "prompts" not in kwargs:
        with pytest.raises(ValueError, match=message):
            list(jaxinfer.stream(tiny_model, [1, 2, 3], **args))


def test_generate_takes_numpy_scalars(tiny_model):
    ids = prompt(tiny_model, 5, 9)
    out = jaxinfer.generate(
        tiny_model,
        [np.asarray(ids)],
        max_new_tokens=np.int64(3),
        temperature=np.float32(0.0),
        seed=np.int64(3),
    )
    assert out == [alone(tiny_model, ids, 3)]


def test_add_request_refusals():
    engine = fake_engine()
    with pytest.raises(ValueError, match="prompt has a lone surrogate '\\\\ud800' at character 2"):
        engine.add_request("a", "ab\ud800", SamplingParams())
    with pytest.raises(ValueError, match="request_id must be a string, got 5"):
        engine.add_request(5, "abc")
    with pytest.raises(ValueError, match=r"prompt\[0\] must be an integer >= 0, got 1.0"):
        engine.add_request("a", [1.0, 2.0])
    with pytest.raises(ValueError, match=r"stop_token_ids\[0\]: token id 26 is outside"):
        engine.add_request("a", "abc", SamplingParams(stop_token_ids=[26]))
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, got dict"):
        engine.add_request("a", "abc", {"max_tokens": 2})
    with pytest.raises(ValueError, match=r"tokenizes to id 26, outside the model's vocabulary"):
        engine.add_request("a", "ab{", SamplingParams())  # "{" is 26 to this tokenizer
    assert not engine.has_unfinished_requests()
    engine.add_request("a", np.asarray([0, 1, 2]), SamplingParams(max_tokens=2, temperature=0))
    assert run_all(engine)["a"][-1].text == "de"


# ---- a fault inside a step ---------------------------------------------------------------------


def inject_fault(monkeypatch, engine: Engine, where: str) -> None:
    """Makes the runner raise once: on dispatch (of one step or of a multi-step decode), on
    dispatch after its pools were donated (deleted), or when the samples are collected."""
    runner = engine.runner
    names = ("step", "decode") if where != "collect" else ("collect",)
    originals = {name: getattr(runner, name) for name in names}

    def failing(*args):
        for name, original in originals.items():
            monkeypatch.setattr(runner, name, original)
        if where == "donated":
            for x in jax.tree.leaves(runner.pages):
                x.delete()
        raise RuntimeError("injected fault")

    for name in names:
        monkeypatch.setattr(runner, name, failing)


@pytest.mark.parametrize("decode_steps", [1, 4])
@pytest.mark.parametrize("where", ["dispatch", "donated", "collect"])
@pytest.mark.parametrize("sampling", [GREEDY, FILTERED], ids=["greedy", "filtered"])
def test_a_fault_in_a_step_ends_its_requests_with_error(
    tiny_model, monkeypatch, caplog, where, decode_steps, sampling
):
    """Also in the programs of sampler mode "filter", which the runner's worker thread queues:
    a fault while it queues one shows at the next step."""
    engine = tiny_engine(tiny_model, max_num_seqs=2, num_decode_steps=decode_steps)
    prompts = [prompt(tiny_model, n, 10 + n) for n in (5, 7, 9)]
    for i, ids in enumerate(prompts):  # "2" waits for a seat while the fault happens
        engine.add_request(str(i), ids, SamplingParams(max_tokens=6, **sampling))
    engine.step()
    if decode_steps == 1:
        engine.step()  # else the next step is the multi-step decode that faults
    engine.runner.settle()  # the worker thread has queued the step before: the fault is the next
    inject_fault(monkeypatch, engine, where)
    with caplog.at_level(logging.ERROR, logger="jaxinfer.engine"):
        outputs = engine.step()  # does not raise
        if sampling is FILTERED and where != "collect":
            assert not any(o.finish_reason == "error" for o in outputs), [o.error for o in outputs]
            outputs += engine.step()
    errors = {o.request_id: o for o in outputs if o.finish_reason == "error"}
    assert set(errors) == {"0", "1"}
    assert all(o.finished and o.error == "RuntimeError: injected fault" for o in errors.values())
    assert "engine step failed" in caplog.text
    engine.add_request("new", prompts[1], SamplingParams(max_tokens=6, **GREEDY))
    final = {rid: outs[-1] for rid, outs in run_all(engine).items()}
    assert final["2"].token_ids == alone(tiny_model, prompts[2], 6)
    assert final["new"].token_ids == alone(tiny_model, prompts[1], 6)
    assert final["new"].error is None and final["new"].finish_reason == "length"
    assert_all_pages_back(engine)


def test_rebuilt_pools_forget_the_prefix_cache(tiny_model, monkeypatch):
    """After the pools are rebuilt, no request may take a cached prefix whose K/V were lost."""
    engine = tiny_engine(tiny_model)
    shared = prompt(tiny_model, 40, 20)
    engine.add_request("a", shared, SamplingParams(max_tokens=3, **GREEDY))
    run_all(engine)
    assert engine.scheduler.allocator.num_cached_pages > 0
    engine.add_request("b", prompt(tiny_model, 6, 21), SamplingParams(max_tokens=5, **GREEDY))
    engine.step()
    inject_fault(monkeypatch, engine, "donated")
    assert [o.finish_reason for o in engine.step()] == ["error"]
    assert engine.scheduler.allocator.num_cached_pages == 0
    engine.add_request("c", shared, SamplingParams(max_tokens=3, **GREEDY))
    final = run_all(engine)["c"][-1]
    assert final.num_cached_tokens == 0 and final.token_ids == alone(tiny_model, shared, 3)
    assert_all_pages_back(engine)


def test_drop_all_pages_sends_running_sequences_back_to_recompute():
    from jaxinfer.scheduler import PLACEHOLDER, Scheduler, SchedulerConfig, Sequence

    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=16, num_pages=8
        )
    )
    for rid in "ab":
        sched.add(Sequence(rid, list(range(20)), max_tokens=4))
    plan = sched.schedule()
    sched.commit(plan)  # both now end in a PLACEHOLDER: their sample is in flight
    sched.drop_all_pages()
    assert not sched.running and [s.request_id for s in sched.waiting] == ["a", "b"]
    for seq in sched.waiting:
        assert seq.token_ids == list(range(20)) and seq.num_computed_tokens == 0
        assert PLACEHOLDER not in seq.token_ids
    sched.allocator.check_invariants([])
    assert sched.allocator.num_free_pages == 8 and sched.allocator.num_cached_pages == 0
    assert len(sched.schedule().seqs) == 2  # they run again


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_num_seqs=-3), r"max_num_seqs must be an integer >= 1, got -3"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens must be an integer >= 1"),
        (dict(max_model_len=1.5), r"max_model_len must be an integer >= 1, got 1.5"),
        (dict(num_pages=-1), r"num_pages must be an integer >= 1, got -1"),
        (dict(tensor_parallel_size=0), r"tensor_parallel_size must be an integer >= 1"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(page_size=0), r"page_size must be 16, 32, 64 or 128, got 0"),
        (dict(num_decode_steps=65), r"num_decode_steps must be an integer in \[1, 64\]"),
        (dict(async_scheduling="false"), r"async_scheduling must be True or False, got 'false'"),
        (dict(warmup=0), r"warmup must be True or False, got 0"),
    ],
)
def test_engine_config_refuses_bad_sizes_at_once(kwargs, message):
    """Before a model is loaded (a negative size used to fail inside jax, as a TypeError)."""
    with pytest.raises(ValueError, match=message):
        jaxinfer.EngineConfig(**kwargs)


def test_llm_refuses_a_bool_replica_count(tiny_model):
    with pytest.raises(ValueError, match="data_parallel_size must be an integer >= 1, got True"):
        jaxinfer.LLM(model=tiny_model, data_parallel_size=True)


def test_the_cli_leaves_quietly_when_its_reader_does():
    """`python -m jaxinfer generate ... | head -c 3`: no "Broken pipe" error, exit code 0."""
    import subprocess
    import sys

    code = "\n".join(
        [
            "import sys",
            "import jaxinfer.__main__ as cli",
            "def endless(args):",
            "    while True:",
            "        print('x' * 1000, flush=True)",
            "cli.generate_command = endless",
            "sys.exit(cli.main(['generate', 'hi']))",
        ]
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin", "JAX_PLATFORMS": "cpu"}
    cli = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    cli.stdout.read(3)
    cli.stdout.close()
    assert cli.wait(timeout=120) == 0
    assert cli.stderr.read() == b""


@pytest.mark.parametrize(
    "impl, message",
    [
        ("Pallas", r"attention impl 'Pallas' is not one of"),
        ("", r"attention impl '' is not one of"),  # not the default: None is
        ("cudnn", r"'cudnn' serves forward\(\) and generate\(\) only"),  # no paged steps
    ],
)
def test_engine_config_checks_its_attention_impl_before_a_load(impl, message):
    with pytest.raises(ValueError, match=message):
        jaxinfer.EngineConfig(attention_impl=impl)


def test_forward_refuses_an_empty_impl(tiny_model):
    with pytest.raises(ValueError, match="attention impl '' is not one of"):
        jaxinfer.forward(tiny_model, [[1, 2, 3]], impl="")


def test_the_engine_runs_the_models_own_impl(tiny_model):
    """A model pinned to an impl keeps it in the engine (it used to get the platform's);
    one the engine cannot page (cudnn) gives way to the platform's."""
    import dataclasses

    pinned = dataclasses.replace(tiny_model, impl="reference")
    assert Engine(pinned).runner.decoder.impl == "reference"
    dense = dataclasses.replace(tiny_model, impl="cudnn")
    assert Engine(dense).runner.decoder.impl == jaxinfer.attention.default_impl()
