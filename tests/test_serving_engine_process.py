"""The engine in its own process (jaxinfer/serving/engine_process.py): a RemoteEngine of the fake
engine behind EngineLoop, in this process; then a real server with --engine-process on, against
`LLM.generate`: answers, refusals, aborts freeing pages, a killed engine failing requests."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import build_hf_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_utils import ServerProcess
from test_engine import fake_engine

import jaxinfer
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving.client import generate_request
from jaxinfer.serving.engine_process import RemoteEngine
from jaxinfer.serving.loop import EngineError, EngineLoop
from jaxinfer.serving.proto import inference_pb2 as pb
from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, num_pages=48, max_model_len=128)
ENGINE_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()] + ["--dtype=float32"]


def build_fake():
    """The child's engine: the fake (next letter) engine."""
    return fake_engine(max_model_len=64), "fake"


def test_remote_fake_engine_behind_the_loop():
    engine = RemoteEngine(build_fake, ())
    loop = EngineLoop(engine)
    loop.start()
    try:
        assert engine.model.tokenizer is not None and engine.max_model_len == 64
        streams = [loop.submit("abc", GREEDY), loop.submit("wx", GREEDY)]
        bad = loop.submit("abc", SamplingParams(max_tokens=500), "mine")  # past max_model_len
        outs = [list(s) for s in streams]
        assert [o.text_delta for o in outs[0]] == ["d", "e", "f", "g", "h"]
        assert outs[1][-1].text == "y" and outs[1][-1].prompt_token_ids == [22, 23]
        with pytest.raises(ValueError, match="max_model_len|exceeds") as refusal:
            list(bad)
        assert "'mine'" in str(refusal.value) and "#" not in str(refusal.value)  # caller's name
        stats = loop.stats()
        assert stats.kv_pages_free == stats.kv_pages_total == engine.num_pages
        assert stats.steps > 0 and loop.num_unfinished() == 0
        os.kill(engine.pid, signal.SIGTERM)  # a group's signal: the parent drains, not the child
        time.sleep(0.2)
        assert list(loop.submit("abc", GREEDY))[-1].text == "defgh"
        long = loop.submit("abc", SamplingParams(max_tokens=50, ignore_eos=True))
        next(iter(long))
        os.kill(engine.pid, signal.SIGKILL)  # the engine dies mid-request
        with pytest.raises(EngineError):
            list(long)
        with pytest.raises(EngineError):  # the loop still answers
            list(loop.submit("abc", GREEDY))
    finally:
        loop.stop()
        engine.close()


def build_slowly():
    time.sleep(120)  # a model that takes minutes to load


def test_a_start_cut_short_stops_the_loading_child():
    """A start-up timeout or a Ctrl-C while the child loads: the child is killed at once (it
    ignores SIGINT, and would read no "stop" before its load ends)."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready within 3s"):
        RemoteEngine(build_slowly, (), start_timeout=3)
    assert time.monotonic() - start < 20
    assert not [p for p in multiprocessing.active_children() if p.name == "jaxinfer-engine"]


def test_a_hung_engine_process_is_killed_and_fails_its_requests():
    """A child that sends nothing for step_timeout seconds while a request is in flight (here
    stopped by SIGSTOP) is killed: the request fails, and so does every later one, with the
    cause named. Idle for longer than that is not hung."""
    engine = RemoteEngine(build_fake, (), step_timeout=2.0)
    loop = EngineLoop(engine)
    loop.start()
    try:
        assert list(loop.submit("abc", GREEDY))[-1].text == "defgh"
        time.sleep(2.5)
        assert engine.dead is None and list(loop.submit("wx", GREEDY))[-1].text == "y"
        os.kill(engine.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineError, match=r"sent nothing for 2 s with 1 request\(s\)"):
            list(loop.submit("abc", GREEDY))
        assert 2 <= time.monotonic() - start < 15
        engine._proc.join(10)
        assert engine._proc.exitcode == -signal.SIGKILL
        assert "(hung); it was killed" in loop.failure  # the cause, not the EOF that followed
        with pytest.raises(EngineError, match="hung"):
            list(loop.submit("abc", GREEDY))
    finally:
        loop.stop()
        engine.close()
    with pytest.raises(ValueError, match="step_timeout must be"):
        RemoteEngine(build_fake, (), step_timeout=0)


# -- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-engine-process")
    build_hf_model("llama3", path)
    return path


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    srv = ServerProcess(
        ["--model", str(tiny_path), *ENGINE_ARGS, "--engine-process", "on", "--no-warmup"]
        + ["--http-port", "0"],
        tmp_path_factory.mktemp("log") / "server.log",
    )
    try:
        srv.wait_healthy(240)
        srv.http = f"http://127.0.0.1:{srv.http_port}/v1/completions"
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()  # the engine was killed: the server still stops well


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.InferenceStub(channel)


def test_server_answers_equal_generate(server, stub, tiny_path):
    prompts = [[1, 5, 9, 13], [2, 7, 3]]
    greedy = dict(max_tokens=8, temperature=0.0)
    llm = jaxinfer.LLM(
        model=jaxinfer.load_model(tiny_path, dtype="float32"), **ENGINE, warmup=False
    )
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(**greedy))]
    got = stub.Generate(generate_request(prompts[0], **greedy), timeout=60)
    assert list(got.token_ids) == want[0]
    chunks = stub.GenerateStream(generate_request(prompts[1], **greedy), timeout=60)
    assert [t for c in chunks for t in c.token_ids] == want[1]
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.kv_pages_total == ENGINE["num_pages"] and info.dtype == "float32"
    body = dict(prompt=prompts[0], max_tokens=8, temperature=0.0)
    assert _post(server.http, body)["choices"][0]["text"] == got.text
    # prompt logprobs cross from the engine's process: gRPC's, and HTTP's echo
    (ref,) = llm.generate([prompts[0]], SamplingParams(**greedy, logprobs=1, prompt_logprobs=1))
    want = [lp[t] for lp, t in zip(ref.prompt_logprobs[1:], prompts[0][1:])]
    got = stub.Generate(generate_request(prompts[0], **greedy, prompt_logprobs=1), timeout=60)
    assert [e.token_id for e in got.prompt_logprobs] == prompts[0][1:]
    assert [e.logprob for e in got.prompt_logprobs] == pytest.approx(want, abs=1e-5)
    chunks = list(
        stub.GenerateStream(generate_request(prompts[0], **greedy, prompt_logprobs=1), timeout=60)
    )
    assert [len(c.prompt_logprobs) for c in chunks] == [3] + [0] * (len(chunks) - 1)
    echoed = _post(server.http, {**body, "echo": True, "logprobs": 1})["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None
    assert echoed["token_logprobs"][1:4] == pytest.approx(want, abs=1e-5)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def test_bad_requests_are_invalid_argument(server, stub):
    for prompt in ([10**7], []):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(generate_request(prompt, max_tokens=4), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(server.http, dict(prompt=[10**7], max_tokens=4))
    assert e.value.code == 400
    assert len(stub.Generate(generate_request([1, 2], max_tokens=4), timeout=30).token_ids) == 4


def test_cancel_frees_pages(stub):
    call = stub.GenerateStream(
        generate_request([1, 2, 3], max_tokens=100, temperature=0.0, ignore_eos=True), timeout=60
    )
    next(call)
    call.cancel()
    deadline = time.monotonic() + 20
    while True:
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        if info.kv_pages_free == info.kv_pages_total and info.requests_running == 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


def test_killed_engine_fails_requests_in_flight(server, stub):
    """Last: it kills the server's engine process."""
    import psutil

    call = stub.GenerateStream(
        generate_request([1, 2, 3], max_tokens=100, temperature=0.0, ignore_eos=True), timeout=60
    )
    next(call)
    children = psutil.Process(server.proc.pid).children()
    assert children, "no engine process"
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.INTERNAL, e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(generate_request([1, 2], max_tokens=4), timeout=30)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    # health says so, for a supervisor to restart the server
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.http.replace("/v1/completions", "/health"), timeout=10)
    assert (
        e.value.code == 503 and "engine process" in json.loads(e.value.read())["error"]["message"]
    )


def test_outputs_cross_the_pipe_as_deltas_and_are_rebuilt_equal():
    """What the child sends is what each output adds; the parent rebuilds every field."""
    import pickle

    from jaxinfer.serving.engine_process import _deltas, _Progress

    engine = fake_engine(num_decode_steps=4)
    engine.add_request("a", "abc", SamplingParams(max_tokens=9, temperature=0, logprobs=2))
    engine.add_request("b", "abc", SamplingParams(max_tokens=20, temperature=0, stop=["gh"]))
    engine.add_request("c", "wx", SamplingParams(max_tokens=8, temperature=0.5, seed=3))
    engine.add_request("d", "abxc", SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=1))
    sent, sent_prompt_lps, progress, pairs, prompt_lps = set(), set(), {}, [], []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        deltas = pickle.loads(pickle.dumps(_deltas(outputs, sent, sent_prompt_lps)))
        for d, out in zip(deltas, outputs):
            if d.prompt_token_ids is not None:
                progress[d.request_id] = _Progress(d.prompt_token_ids)
            if d.prompt_logprobs is not None:
                prompt_lps.append(d.request_id)
            pairs.append((progress[d.request_id].apply(d), out))
    assert {out.request_id for _, out in pairs} == {"a", "b", "c", "d"}
    assert not sent and not sent_prompt_lps
    for rebuilt, out in pairs:
        assert rebuilt == out
    last = {out.request_id: out for _, out in pairs}
    assert last["a"].text == "defghijkl" and len(last["a"].logprobs) == 9
    assert last["b"].text == "def" and last["b"].finish_reason == "stop"
    # the prompt's logprobs cross once, and every rebuilt output of "d" has them
    assert prompt_lps == ["d"] and last["a"].prompt_logprobs is None
    d = last["d"].prompt_logprobs
    assert d[0] is None and [next(iter(x)) for x in d[1:]] == [1, 23, 2]  # b, x, c: own first
    assert d[2][23] == pytest.approx(-50.0)  # x after b: the fake model says c


def test_outputs_ahead_of_a_failed_step_are_not_lost():
    """A request that ended in a message before a failed step's keeps its end; the failure
    comes on the next step(), and the messages after it on the ones after."""
    from jaxinfer.serving.engine_process import _Delta

    engine = RemoteEngine.__new__(RemoteEngine)  # the parent's bookkeeping, no child
    engine._init_inbox()
    engine.step_timeout = None
    engine._unfinished |= {"a", "b"}

    def delta(rid, tokens, finished):
        return _Delta(rid, [1, 2], tokens, "x" * len(tokens), None, finished,
                      "length" if finished else None, 0.0, 0.0, None, 0, None)  # fmt: skip

    stats = {}
    engine._messages.put(("step", [delta("a", [5], True), delta("b", [6], False)], stats, None))
    engine._messages.put(("step", [], stats, "RuntimeError: boom"))
    engine._messages.put(("step", [delta("c", [7], True)], stats, None))
    outs = engine.step()
    assert [(o.request_id, o.finished, o.token_ids) for o in outs] == [
        ("a", True, [5]),
        ("b", False, [6]),
    ]
    with pytest.raises(RuntimeError, match="boom"):  # "b" is still in flight
        engine.step()
    assert [o.request_id for o in engine.step()] == ["c"]  # after the failure, in order
    engine._messages.put(("step", [], stats, "RuntimeError: again"))
    with pytest.raises(RuntimeError, match="again"):  # nothing ahead of it: at once
        engine.step()
