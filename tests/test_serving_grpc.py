"""The gRPC server as a real process on loopback (TLS, an API key), against `LLM.generate`.

One server of a tiny random model serves the module's tests; the last one stops it by SIGTERM
mid-work. The default model answers an end-to-end text test in test_serving_default_model.py.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import build_hf_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_utils import ROOT, ServerProcess, self_signed_cert

import jaxinfer
from jaxinfer.serving.client import auth_metadata, generate_request
from jaxinfer.serving.proto import inference_pb2 as pb
from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc

KEY = "test-key-123"
ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=128, num_pages=96, max_model_len=256)
ENGINE_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()] + ["--dtype=float32"]
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-serve")
    build_hf_model("llama3", path)
    return path


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    """TLS, an API key (from $JAXINFER_API_KEY), metrics: started once for the module."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_cert(d)
    srv = ServerProcess(
        [
            "--model",
            str(tiny_path),
            *ENGINE_ARGS,
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--metrics-port",
            "0",
            "--grace-period",
            "60",
        ],
        d / "server.log",
        env={"JAXINFER_API_KEY": KEY},
        root_cert=cert.read_bytes(),
    )
    try:
        srv.wait_healthy(240)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def llm(tiny_path):
    """The offline engine of the same model and limits: the reference answers."""
    model = jaxinfer.load_model(tiny_path, dtype="float32")
    return jaxinfer.LLM(model=model, **ENGINE, warmup=False)


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.InferenceStub(channel)


AUTH = auth_metadata(KEY)


def reference(llm, prompts, **sampling):
    params = jaxinfer.SamplingParams(**sampling)
    return llm.generate(prompts, params, use_tqdm=False)


def prompts(n, seed=0, length=(3, 20)):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(2, 320, rng.integers(*length)).tolist() for _ in range(n)]


def stream_all(stub, prompt, **sampling):
    return list(
        stub.GenerateStream(generate_request(prompt, **sampling), metadata=AUTH, timeout=120)
    )


def test_unary_and_stream_equal_llm_generate(stub, llm):
    ps = prompts(4)
    sampling = dict(max_tokens=12, ignore_eos=True, **GREEDY)
    refs = reference(llm, ps, **sampling)
    for prompt, ref in zip(ps, refs):
        whole = stub.Generate(
            generate_request(prompt, request_id="u1", **sampling), metadata=AUTH, timeout=120
        )
        assert list(whole.token_ids) == ref.token_ids and whole.request_id == "u1"
        assert whole.finish_reason == "length" == ref.finish_reason
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), 12)
        pieces = stream_all(stub, prompt, **sampling)
        assert [t for p in pieces for t in p.token_ids] == ref.token_ids
        assert [p.finish_reason for p in pieces] == [""] * (len(pieces) - 1) + ["length"]


def test_sampled_with_seed_and_logprobs_equal_llm_generate(stub, llm):
    (prompt,) = prompts(1, seed=1)
    sampling = dict(max_tokens=8, temperature=0.8, top_k=40, seed=7, logprobs=3, ignore_eos=True)
    (ref,) = reference(llm, [prompt], **sampling)
    whole = stub.Generate(generate_request(prompt, **sampling), metadata=AUTH, timeout=120)
    assert list(whole.token_ids) == ref.token_ids
    assert len(whole.logprobs) == 8
    for lp, ref_lp, token in zip(whole.logprobs, ref.logprobs, ref.token_ids):
        assert lp.token_id == token and lp.logprob == pytest.approx(ref_lp[token], abs=1e-5)
        top = sorted(ref_lp.items(), key=lambda kv: -kv[1])[:3]
        assert [t.token_id for t in lp.top] == [t for t, _ in top]


def test_32_concurrent_streams_all_complete_and_correct(stub, llm):
    ps = prompts(32, seed=2)
    sampling = dict(max_tokens=16, ignore_eos=True, **GREEDY)
    refs = reference(llm, ps, **sampling)
    results: dict[int, list] = {}

    def run(i):
        results[i] = stream_all(stub, ps[i], request_id=f"c{i}", **sampling)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(32))
    for i, ref in enumerate(refs):
        assert [t for p in results[i] for t in p.token_ids] == ref.token_ids, i
        assert results[i][-1].finish_reason == "length"
        assert {p.request_id for p in results[i]} == {f"c{i}"}


def wait_all_pages_free(stub, timeout=10.0) -> pb.ModelInfoResponse:
    deadline = time.monotonic() + timeout
    while True:
        info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=AUTH, timeout=5)
        if info.kv_pages_free == info.kv_pages_total and info.requests_running == 0:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def long_request(**extra):
    (prompt,) = prompts(1, seed=3, length=(8, 9))
    return generate_request(prompt, max_tokens=240, ignore_eos=True, **GREEDY, **extra)


def test_cancel_mid_stream_frees_pages(stub, server):
    call = stub.GenerateStream(long_request(request_id="to-cancel"), metadata=AUTH, timeout=120)
    first = [next(call), next(call)]
    assert all(not p.finish_reason for p in first)
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=AUTH, timeout=5)
    assert info.kv_pages_free < info.kv_pages_total  # the request holds pages now
    call.cancel()
    wait_all_pages_free(stub)
    deadline = time.monotonic() + 10
    while "request to-cancel: abort" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_deadline_and_disconnect_free_pages(stub, server):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(long_request(request_id="late"), metadata=AUTH, timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_pages_free(stub)
    channel = server.channel()  # a client that goes away mid-stream
    call = pb_grpc.InferenceStub(channel).GenerateStream(
        long_request(request_id="gone"), metadata=AUTH
    )
    next(call)
    channel.close()
    wait_all_pages_free(stub)


BAD_INPUTS = {
    "empty text": (dict(prompt=""), "the prompt is empty"),
    "empty token ids": (dict(prompt=[]), "prompt must be a non-empty"),
    "token outside the vocab": (dict(prompt=[5, 320]), "token id 320 is outside the vocabulary"),
    "temperature": (dict(prompt=[5], temperature=-1.0), "temperature must be"),
    "top_p": (dict(prompt=[5], top_p=0.0), "top_p must be"),
    "max_tokens": (dict(prompt=[5], max_tokens=0), "max_tokens must be"),
    "logprobs": (dict(prompt=[5], logprobs=99), "logprobs must be"),
    "stop token outside the vocab": (dict(prompt=[5], stop_token_ids=[1000]), "token id 1000"),
    "prompt longer than the context": (dict(prompt=[5] * 300), "exceeds max_model_len (256)"),
    "text without a tokenizer": (dict(prompt="hello"), "has no tokenizer"),
    "too many stop ids": (dict(prompt=[5], stop_token_ids=[1] * 1025), "1025 ids, more than"),
    "a long request id": (dict(prompt=[5], request_id="x" * 257), "257 characters, more than"),
    "logit_bias bias": (dict(prompt=[5], logit_bias={5: 101}), "logit_bias[5] must be a finite"),
    "logit_bias NaN": (dict(prompt=[5], logit_bias={5: float("nan")}), "logit_bias[5] must be"),
    "logit_bias negative id": (
        dict(prompt=[5], logit_bias={-1: 1}),
        "logit_bias token id must be an integer in [0, 2147483647], got -1",
    ),
    "logit_bias entries": (
        dict(prompt=[5], logit_bias={i: 1.0 for i in range(301)}),
        "logit_bias has 301 entries, more than 300",
    ),
    "logit_bias id outside the vocab": (
        dict(prompt=[5], logit_bias={320: 1}),
        "logit_bias: token id 320 is outside the vocabulary [0, 320)",
    ),
    "min_tokens above max_tokens": (
        dict(prompt=[5], max_tokens=2, min_tokens=3),
        "min_tokens (3) must be at most max_tokens (2)",
    ),
    "min_tokens above the default max_tokens": (
        dict(prompt=[5], min_tokens=17),
        "min_tokens (17) must be at most max_tokens (16)",
    ),
    "min_tokens negative": (dict(prompt=[5], min_tokens=-1), "min_tokens must be an integer >= 0"),
}


def test_bad_inputs_are_invalid_argument_and_others_unaffected(stub, llm):
    (prompt,) = prompts(1, seed=4)
    sampling = dict(max_tokens=40, ignore_eos=True, **GREEDY)
    (ref,) = reference(llm, [prompt], **sampling)
    good: list = []
    runner = threading.Thread(target=lambda: good.extend(stream_all(stub, prompt, **sampling)))
    runner.start()
    for name, (kw, message) in BAD_INPUTS.items():
        kw = dict(kw)
        request = generate_request(kw.pop("prompt"), **kw)
        for call in (stub.Generate, lambda r, **k: list(stub.GenerateStream(r, **k))):
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=AUTH, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in e.value.details(), (name, e.value.details())
    runner.join(120)
    assert [t for p in good for t in p.token_ids] == ref.token_ids
    wait_all_pages_free(stub)


def test_request_options_map_to_sampling_params():
    """min_tokens, logit_bias (a map), include_stop_str_in_output, skip_special_tokens reach the
    engine's SamplingParams through the wire format; unset means SamplingParams' default."""
    from jaxinfer.serving.client import generate_request as request
    from jaxinfer.serving.grpc_server import sampling_params

    def fields(msg):
        p = sampling_params(pb.SamplingParams.FromString(msg.SerializeToString()))
        return p.min_tokens, p.logit_bias, p.include_stop_str_in_output, p.skip_special_tokens

    options = dict(
        min_tokens=3,
        logit_bias={"17": 100, 5: -2.5, 300: 0},  # ids as ints or decimal strings, as JSON's
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    )
    msg = request([5], max_tokens=8, **options).sampling
    assert fields(msg) == (3, ((5, -2.5), (17, 100.0)), True, False)
    assert fields(request([5], logit_bias=[(9, 1.5)]).sampling)[1] == ((9, 1.5),)
    defaults = (0, (), False, True)
    assert fields(pb.SamplingParams()) == defaults
    assert fields(request([5], logit_bias={}).sampling) == defaults
    # set to the default values explicitly: the same
    explicit = dict(min_tokens=0, include_stop_str_in_output=False, skip_special_tokens=True)
    assert fields(request([5], **explicit).sampling) == defaults
    # the client refuses what the map cannot say, naming the field
    for bad, message in (
        ({"abc": 1}, "logit_bias token id must be an integer, got 'abc'"),
        ([(5, 1), ("5", 2)], "logit_bias gives token id 5 twice"),
        (5, "logit_bias must be a dict"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            request([5], logit_bias=bad)


def test_prompt_logprobs_maps_to_sampling_params():
    """SamplingParams.prompt_logprobs (field 18): unset is None (none taken), 0 is 0 (each
    prompt token's own logprob); out of range is the engine's message, naming the field."""
    from jaxinfer.serving.client import generate_request as request
    from jaxinfer.serving.grpc_server import sampling_params

    def prompt_logprobs(msg):
        return sampling_params(
            pb.SamplingParams.FromString(msg.SerializeToString())
        ).prompt_logprobs

    assert prompt_logprobs(pb.SamplingParams()) is None
    assert prompt_logprobs(request([5], max_tokens=2).sampling) is None
    assert prompt_logprobs(request([5], prompt_logprobs=0).sampling) == 0
    assert prompt_logprobs(request([5], prompt_logprobs=3, logprobs=1).sampling) == 3
    with pytest.raises(
        ValueError, match=re.escape("prompt_logprobs must be an integer in [0, 20]")
    ):
        prompt_logprobs(request([5], prompt_logprobs=21).sampling)


def check_prompt_logprobs(entries, prompt: list[int], ref, n: int) -> None:
    """GenerateResponse.prompt_logprobs against LLM.generate's: one per prompt token after the
    first, its id, logprob and top n (most likely first)."""
    assert [e.token_id for e in entries] == prompt[1:]
    for e, lp in zip(entries, ref.prompt_logprobs[1:], strict=True):
        assert e.logprob == pytest.approx(lp[e.token_id], abs=1e-5)
        top = sorted(lp.items(), key=lambda kv: -kv[1])[:n]
        assert [t.token_id for t in e.top] == [t for t, _ in top]
        assert [t.logprob for t in e.top] == pytest.approx([v for _, v in top], abs=1e-5)


def test_prompt_logprobs_equal_llm_generate(stub, llm):
    ps = prompts(2, seed=9, length=(6, 40))
    sampling = dict(max_tokens=5, prompt_logprobs=2, logprobs=1, ignore_eos=True, **GREEDY)
    refs = reference(llm, ps, **sampling)
    for prompt, ref in zip(ps, refs):
        assert ref.prompt_logprobs[0] is None and len(ref.prompt_logprobs) == len(prompt)
        whole = stub.Generate(generate_request(prompt, **sampling), metadata=AUTH, timeout=120)
        assert list(whole.token_ids) == ref.token_ids
        check_prompt_logprobs(whole.prompt_logprobs, prompt, ref, 2)
        # a stream sends them once, in its first response
        pieces = stream_all(stub, prompt, **sampling)
        assert [t for p in pieces for t in p.token_ids] == ref.token_ids
        assert len(pieces[0].token_ids) > 0 and all(not p.prompt_logprobs for p in pieces[1:])
        check_prompt_logprobs(pieces[0].prompt_logprobs, prompt, ref, 2)
    # 0: each token's own logprob alone; unset: none
    own = stub.Generate(
        generate_request(ps[0], max_tokens=1, prompt_logprobs=0, **GREEDY),
        metadata=AUTH,
        timeout=120,
    )
    check_prompt_logprobs(own.prompt_logprobs, ps[0], refs[0], 0)
    plain = stub.Generate(
        generate_request(ps[0], max_tokens=1, **GREEDY), metadata=AUTH, timeout=120
    )
    assert len(plain.prompt_logprobs) == 0
    # one prompt token: nothing before it, so no entry
    one = stub.Generate(
        generate_request([7], max_tokens=1, prompt_logprobs=2), metadata=AUTH, timeout=120
    )
    assert len(one.prompt_logprobs) == 0 and len(one.token_ids) == 1


def test_logit_bias_and_min_tokens_are_honoured(stub, llm):
    (prompt,) = prompts(1, seed=6)

    def generate(**sampling):
        request = generate_request(prompt, **GREEDY, **sampling)
        return stub.Generate(request, metadata=AUTH, timeout=120)

    plain = list(generate(max_tokens=8, ignore_eos=True).token_ids)
    target = next(i for i in range(5, 320) if i not in plain)
    biased = generate(max_tokens=6, ignore_eos=True, logit_bias={target: 100.0})
    assert list(biased.token_ids) == [target] * 6
    pieces = stream_all(stub, prompt, max_tokens=6, logit_bias={target: 100.0}, **GREEDY)
    assert [t for p in pieces for t in p.token_ids] == [target] * 6
    banned = generate(max_tokens=4, ignore_eos=True, logit_bias={plain[0]: -100.0})
    assert banned.token_ids[0] != plain[0]
    # The tiny model has no EOS: its first greedy token, made a stop id, ends it at once...
    stopped = generate(max_tokens=8, stop_token_ids=[plain[0]])
    assert (list(stopped.token_ids), stopped.finish_reason) == (plain[:1], "stop")
    # ... unless min_tokens keeps it from being sampled for the first 4 tokens
    sampling = dict(max_tokens=8, stop_token_ids=[plain[0]], min_tokens=4)
    held = generate(**sampling)
    ids = list(held.token_ids)
    assert len(ids) >= 4 and plain[0] not in ids[:4], ids
    if len(ids) < 8:  # ended by the stop id, once it was allowed
        assert (ids[-1], held.finish_reason) == (plain[0], "stop")
    (ref,) = reference(llm, [prompt], **sampling, **GREEDY)
    assert ids == ref.token_ids


def test_missing_or_wrong_key_is_refused_health_stays_open(server):
    with server.channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        for metadata in ((), auth_metadata("wrong"), (("authorization", KEY),)):
            calls = (
                lambda m: stub.Generate(generate_request([5], max_tokens=2), metadata=m),
                lambda m: list(stub.GenerateStream(generate_request([5]), metadata=m)),
                lambda m: stub.ModelInfo(pb.ModelInfoRequest(), metadata=m),
            )
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="jaxinfer.v1.Inference"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:  # TLS is required
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.InferenceStub(plain).ModelInfo(pb.ModelInfoRequest(), metadata=AUTH, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_services_and_describes_them(server):
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="jaxinfer.v1.Inference"),
        ]
        replies = list(stub.ServerReflectionInfo(iter(requests), metadata=AUTH, timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"jaxinfer.v1.Inference", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(
        replies[1].file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "jaxinfer.v1"
    assert [m.name for m in proto.service[0].method] == ["Generate", "GenerateStream", "ModelInfo"]


def test_model_info(stub, tiny_path):
    info = wait_all_pages_free(stub)
    assert (info.model_path, info.model_family, info.vocab_size, info.dtype) == (
        str(tiny_path),
        "llama",
        320,
        "float32",
    )
    assert (info.context_length, info.kv_pages_total, info.max_num_seqs) == (256, 96, 16)
    assert (info.tensor_parallel_size, info.kv_page_size, info.requests_waiting) == (1, 16, 0)


def test_metrics_and_one_log_line_per_request(stub, server):
    stub.Generate(
        generate_request([7, 8, 9], request_id="counted", max_tokens=5, ignore_eos=True, **GREEDY),
        metadata=AUTH,
        timeout=60,
    )
    for bad in (generate_request([5], temperature=-1.0), generate_request([999])):  # front, engine
        with pytest.raises(grpc.RpcError):
            stub.Generate(bad, metadata=AUTH, timeout=60)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    values = dict(re.findall(r"^(jaxinfer_\S+) (\S+)$", text, re.M))
    assert float(values['jaxinfer_requests_total{outcome="length"}']) >= 1
    assert float(values['jaxinfer_requests_total{outcome="invalid"}']) >= 2
    assert float(values["jaxinfer_generation_tokens_total"]) >= 5
    assert float(values["jaxinfer_time_to_first_token_seconds_count"]) >= 1
    assert float(values["jaxinfer_time_per_output_token_seconds_count"]) >= 1
    assert float(values["jaxinfer_e2e_request_latency_seconds_count"]) >= 1
    assert values["jaxinfer_kv_pages_total"] == "96.0"
    for name in (
        "jaxinfer_requests_running",
        "jaxinfer_requests_waiting",
        "jaxinfer_kv_pages_used",
        "jaxinfer_preemptions_total",
    ):
        assert name in values
    lines = [l for l in server.log().splitlines() if "request counted:" in l]
    assert len(lines) == 1 and re.search(
        r"length, 3 tokens in \(0 cached\), 5 out, "
        r"ttft \d+\.\d+s, total \d+\.\d+s",
        lines[0],
    ), lines


def serve_refusal(*args: str, env: dict | None = None) -> str:
    """The last stderr line of a serve.py that must refuse to start (exit code 2)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin", "JAX_PLATFORMS": "cpu", **(env or {})},
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_tensor_parallel_beyond_the_devices_is_refused_with_one_line():
    line = serve_refusal("--tensor-parallel-size", "2")
    assert "--tensor-parallel-size 2 needs that many devices but 1 exist" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
        (["--metrics-port", "-1"], "--metrics-port must be in [0, 65535], got -1"),
        (["--grace-period", "-5"], "--grace-period must be a number of seconds >= 0"),
        (["--switch-interval-ms", "0"], "--switch-interval-ms must be > 0, got 0.0"),
        (["--engine-step-timeout", "nan"], "--engine-step-timeout must be a number of seconds > 0"),
        (["--log-level", "loud"], "--log-level must be DEBUG, INFO, WARNING or ERROR"),
        (["--tls-cert", __file__, "--tls-key", __file__], "do not load as a PEM certificate"),
        (["--page-size", "0"], "page_size must be"),
        (["--max-num-seqs", "-3"], "--max-num-seqs must be >= 1, got -3"),
        (["--num-pages", "-1"], "--num-pages must be >= 1, got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        # `--api-key "$KEY"` with KEY unset would have served without a key
        (["--api-key", ""], "--api-key is empty"),
        (["--api-key", " "], "--api-key is empty"),
    ],
)
def test_bad_server_options_are_one_line(args, message):
    assert message in serve_refusal(*args)


def test_a_bad_process_count_variable_is_one_line():
    line = serve_refusal(env={"JAXINFER_NUM_PROCESSES": "two"})
    assert "num_processes ($JAXINFER_NUM_PROCESSES) must be an integer, got 'two'" in line


def test_an_empty_api_key_variable_is_refused():
    assert "$JAXINFER_API_KEY is set but empty" in serve_refusal(env={"JAXINFER_API_KEY": ""})


def test_a_port_in_use_is_one_line(tiny_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve_refusal("--model", str(tiny_path), "--no-warmup", "--port", str(port))
    assert line.startswith(f"serve.py: error: gRPC cannot listen on 127.0.0.1:{port}"), line


def test_several_processes_are_refused_with_one_line():
    env = {"JAXINFER_NUM_PROCESSES": "2", "JAXINFER_PROCESS_ID": "0"}
    line = serve_refusal(env={**env, "JAXINFER_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    assert "2 processes asked for" in line and "offline batches (LLM) only" in line


def test_tensor_parallel_server_equals_llm_generate(tiny_path, llm, tmp_path):
    """The model split over 2 devices: ModelInfo says so, and greedy tokens are the same."""
    srv = ServerProcess(
        # (no warm-up: the module's server warms up; test_tensor_parallel compiles a split
        # engine's programs at start-up and checks that its steps compile nothing more)
        ["--model", str(tiny_path), *ENGINE_ARGS, "--tensor-parallel-size", "2", "--no-warmup"],
        tmp_path / "server.log",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    try:
        srv.wait_healthy(240)
        with srv.channel() as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).tensor_parallel_size == 2
            ps = prompts(2, seed=3)
            sampling = dict(max_tokens=8, ignore_eos=True, **GREEDY)
            for prompt, ref in zip(ps, reference(llm, ps, **sampling)):
                out = stub.Generate(generate_request(prompt, **sampling), timeout=120)
                assert list(out.token_ids) == ref.token_ids
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_drains_requests_in_flight_and_exits_0(server, stub, llm):
    """Last in the module: it stops the module's server (the fixture then checks exit code 0)."""
    ps = prompts(4, seed=5)
    sampling = dict(max_tokens=200, ignore_eos=True, **GREEDY)
    calls = [
        stub.GenerateStream(generate_request(p, **sampling), metadata=AUTH, timeout=120) for p in ps
    ]
    firsts = [next(c) for c in calls]  # all running
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the signal is handled
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(generate_request([5], max_tokens=2), metadata=AUTH, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    answers = [[f, *c] for f, c in zip(firsts, calls)]
    for answer, ref in zip(answers, reference(llm, ps, **sampling)):
        assert [t for p in answer for t in p.token_ids] == ref.token_ids
        assert answer[-1].finish_reason == "length"
    assert server.proc.wait(60) == 0, server.log()
    assert "stopped" in server.log()
