"""The engine loop with the hand-computable fake engine (next letter): exact streams from threads
and asyncio, aborts, bad input, engine faults, the queue limit, shutdown; and the gRPC status
codes those become, through an in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import grpc
import pytest
from test_engine import LetterTokenizer, fake_engine

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving.client import Client, generate_request
from jaxinfer.serving.grpc_server import ServedModel, start_server
from jaxinfer.serving.loop import Closed, EngineError, EngineLoop, QueueFull

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
LONG = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)


@contextlib.contextmanager
def running(engine=None, **options):
    records = []
    loop = EngineLoop(engine or fake_engine(max_model_len=64), observer=records.append, **options)
    loop.records = records
    loop.start()
    try:
        yield loop
    finally:
        loop.stop()
        assert not loop._thread.is_alive()


def slow_steps(engine, seconds=0.01):
    """Makes each step take a little while, so a test can act between steps."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    return engine


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_streams_from_threads_are_exact():
    with running() as loop:
        streams = [loop.submit("abc", GREEDY), loop.submit("wx", GREEDY, request_id="mine")]
        outs = [list(s) for s in streams]
    assert [o.text_delta for o in outs[0]] == ["d", "e", "f", "g", "h"]
    assert outs[0][-1].finish_reason == "length" and outs[0][-1].finished
    assert outs[1][-1].text == "y" and outs[1][-1].finish_reason == "stop"  # z is EOS: no text
    assert streams[1].request_id == "mine" and streams[0].request_id != streams[1].request_id
    assert sorted(r.outcome for r in loop.records) == ["length", "stop"]
    rec = next(r for r in loop.records if r.request_id == "mine")
    assert (rec.prompt_tokens, rec.output_tokens) == (2, 2) and 0 < rec.ttft_s <= rec.total_s


def test_streams_from_asyncio_are_exact_and_batched():
    async def read(loop):
        streams = [loop.submit("abc", GREEDY) for _ in range(8)]
        batches = [[b async for b in s.batches()] for s in streams]
        singles = [o async for o in loop.submit("abc", GREEDY)]
        return batches, singles

    with running(slow_steps(fake_engine(max_model_len=64))) as loop:
        batches, singles = asyncio.run(read(loop))
    for b in batches:  # read after the others: several outputs come in one batch
        assert "".join(o.text_delta for batch in b for o in batch) == "defgh"
    assert any(len(batch) > 1 for b in batches for batch in b)
    assert "".join(o.text_delta for o in singles) == "defgh"


def test_bad_input_raises_the_engines_message_and_others_run():
    with running() as loop:
        good = loop.submit("abc", LONG)
        for prompt, params, message in [
            ("", GREEDY, "must be a non-empty string"),
            ([3, 99], GREEDY, "token id 99 is outside"),
            ("abc", SamplingParams(max_tokens=100), "exceeds max_model_len"),
        ]:
            with pytest.raises(ValueError, match=message):
                list(loop.submit(prompt, params))
        with pytest.raises(ValueError, match=r"^request 'mine': prompt \(3 tokens\)"):
            list(loop.submit("abc", SamplingParams(max_tokens=100), "mine"))  # the caller's name
        assert len(list(good)[-1].token_ids) == 60
    assert [r.outcome for r in loop.records].count("invalid") == 4


def test_abort_frees_pages_at_once():
    with running(slow_steps(fake_engine(max_model_len=64))) as loop:
        stream = loop.submit("abc", LONG)
        next(iter(stream))
        assert loop.stats().kv_pages_free < loop.stats().kv_pages_total
        loop.abort(stream)
        wait_for(lambda: loop.stats().kv_pages_free == loop.stats().kv_pages_total)
        assert loop.stats().running == 0 and loop.num_unfinished() == 0
    assert [r.outcome for r in loop.records] == ["abort"]


def test_a_request_ended_before_its_first_output_keeps_its_prompt_length():
    with running(slow_steps(fake_engine(max_model_len=64), 0.2)) as loop:
        busy = loop.submit("abc", LONG)  # holds the loop in slow steps
        next(iter(busy))
        stream = loop.submit([3, 4, 5, 6], LONG, request_id="early")
        loop.abort(stream)
        wait_for(lambda: any(r.request_id == "early" for r in loop.records))
        loop.abort(busy)
    rec = next(r for r in loop.records if r.request_id == "early")
    assert (rec.outcome, rec.prompt_tokens, rec.output_tokens) == ("abort", 4, 0)


def test_a_failing_abort_ends_the_stream_and_the_loop_goes_on():
    """engine.abort may raise (an engine process that died): the stream still ends, the loop
    thread lives on, and `failure` says what the engine reports."""
    engine = slow_steps(fake_engine(max_model_len=64))

    def broken_abort(request_id):
        raise RuntimeError("pipe broken")

    engine.abort = broken_abort
    with running(engine) as loop:
        assert loop.failure is None
        stream = loop.submit("abc", LONG)
        next(iter(stream))
        loop.abort(stream)
        wait_for(lambda: loop.num_unfinished() == 0)
        assert loop._thread.is_alive()
        assert list(loop.submit("wx", GREEDY))[-1].token_ids == [24, 25]
        engine.dead = "the engine process exited (exit code -9)"
        assert loop.failure == engine.dead


def test_a_failing_step_fails_the_requests_in_flight_and_the_loop_goes_on():
    engine = fake_engine(max_model_len=64)
    step, calls = engine.step, []

    def fail_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return step()

    engine.step = fail_once
    with running(engine) as loop:
        streams = [loop.submit("abc", LONG), loop.submit("xyz", LONG)]
        for s in streams:
            with pytest.raises(EngineError, match="device lost"):
                list(s)
        assert loop._thread.is_alive()
        assert list(loop.submit("abc", GREEDY))[-1].text == "defgh"
        n = len(calls)
        time.sleep(0.1)
        assert len(calls) == n  # idle: no step runs, nothing spins
    assert sorted(r.outcome for r in loop.records) == ["error", "error", "length"]


def test_error_outputs_fail_only_their_request():
    engine = fake_engine(max_model_len=64)
    step = engine.step

    def one_bad_request():
        outs = step()
        for i, out in enumerate(outs):
            if out.request_id.startswith("bad") and len(out.token_ids) == 2:
                outs[i] = dataclasses.replace(out, finished=True, finish_reason="error")
                outs[i].error = "NaN in the logits"  # the engine's `error` field
        return outs

    engine.step = one_bad_request
    with running(engine) as loop:
        bad, good = loop.submit("abc", LONG, request_id="bad"), loop.submit("abc", GREEDY)
        with pytest.raises(EngineError, match="NaN in the logits"):
            list(bad)
        assert list(good)[-1].text == "defgh"


def test_outputs_ahead_of_an_error_reach_the_consumer_first():
    """Tokens made before a request failed (the grace period ran out, the engine died) are the
    caller's: a stream hands them out, then raises; from a thread and from asyncio alike."""
    from jaxinfer.engine import RequestOutput
    from jaxinfer.serving.loop import RequestStream

    def filled() -> RequestStream:
        stream = RequestStream("r", "r#0")
        for k in range(3):
            stream._put(
                RequestOutput(
                    "r#0", [1], [5] * (k + 1), "x" * (k + 1), False, *[None] * 2, 0.0, *[None] * 2
                )
            )
        stream._put(Closed("the server stopped"))
        return stream

    got = []
    with pytest.raises(Closed, match="the server stopped"):
        for out in filled():
            got.append(out.token_ids)
    assert got == [[5], [5, 5], [5, 5, 5]]

    async def consume():
        seen = []
        with pytest.raises(Closed):
            async for out in filled():
                seen.append(out.text)
        return seen

    assert asyncio.run(consume()) == ["x", "xx", "xxx"]


def test_queue_limit_close_and_stop():
    loop = EngineLoop(fake_engine(), max_queue=2, observer=(records := []).append)
    first = [loop.submit("abc", GREEDY), loop.submit("abc", GREEDY)]  # not started: both wait
    with pytest.raises(QueueFull):
        loop.submit("abc", GREEDY)
    assert records[-1].outcome == "rejected"
    loop.start()
    assert all(list(s)[-1].text == "defgh" for s in first)
    assert loop.drain(5.0)
    with pytest.raises(Closed):
        loop.submit("abc", GREEDY)
    loop.stop()

    loop = EngineLoop(slow_steps(fake_engine(max_model_len=64)))
    loop.start()
    stream = loop.submit("abc", LONG)
    next(iter(stream))
    assert not loop.drain(0.05)  # still running
    loop.stop()
    with pytest.raises(Closed):
        list(stream)


# ------------------------------------------------------------------------------------------------
# The same, as gRPC status codes


@contextlib.contextmanager
def grpc_front(loop):
    aloop = asyncio.new_event_loop()
    thread = threading.Thread(target=aloop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_server(loop, ServedModel("fake")), aloop
    ).result(30)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            yield client
    finally:
        asyncio.run_coroutine_threadsafe(server.grpc_server.stop(0), aloop).result(30)
        aloop.call_soon_threadsafe(aloop.stop)
        thread.join(10)
        aloop.close()


def test_grpc_text_stream_and_status_codes():
    engine = fake_engine(max_model_len=64)
    step = engine.step

    def maybe_fail():
        if any(r.startswith("doomed") for r in engine.requests):
            raise RuntimeError("kernel fault")
        return step()

    engine.step = maybe_fail
    threads = []

    class Recording(LetterTokenizer):  # which thread tokenizes: never the engine's
        def __call__(self, text):
            threads.append(threading.current_thread().name)
            return super().__call__(text)

    engine.model.tokenizer.__class__ = Recording
    with running(engine) as loop, grpc_front(loop) as client:
        pieces = list(client.stream("abc", max_tokens=5, temperature=0.0))
        assert threads and "engine-loop" not in threads
        # Outputs pending together come in one message: each piece's text is its tokens' text.
        assert "".join(p.text for p in pieces) == "defgh"
        assert all(p.text == "".join(chr(97 + t) for t in p.token_ids) for p in pieces)
        # (how many pieces depends on how fast the client reads: only the last one finishes)
        assert [p.finish_reason for p in pieces] == [""] * (len(pieces) - 1) + ["length"]
        assert client.generate("wx", max_tokens=9, temperature=0.0).text == "y"
        with pytest.raises(grpc.RpcError) as e:
            client.generate("abc", request_id="doomed", max_tokens=5)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "kernel fault" in e.value.details()
        assert client.generate("abc", max_tokens=2, temperature=0.0).text == "de"
        loop.close()
        with pytest.raises(grpc.RpcError) as e:
            client.generate("abc", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_full_queue_is_resource_exhausted():
    loop = EngineLoop(fake_engine(), max_queue=1)  # not started: the first request waits
    with grpc_front(loop) as client:
        waiting = client.stub.Generate.future(generate_request("abc"))
        wait_for(lambda: loop._queued == 1)
        with pytest.raises(grpc.RpcError) as e:
            client.generate("abc", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        waiting.cancel()


def test_server_sizes_and_dtype_default_to_the_device():
    """scripts/serve.py leaves its sizes, dtype and warm-up to the device, as `LLM` does."""
    import argparse

    from jaxinfer.serving import options

    parser = argparse.ArgumentParser()
    options.add_server_args(parser, default_port=1)
    args = parser.parse_args([])
    config = options.engine_config(args)
    assert args.dtype is None and config.warmup is None
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (None, None)
    cpu = config.for_device("cpu", 4096)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens, cpu.warmup) == (8, 256, False)
    from jaxinfer.platform import device_memory_bytes

    assert device_memory_bytes() is None  # a CPU: the engine passes no memory, takes CPU sizes
    gpu = config.for_device("gpu", 4096)  # memory unknown
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens, gpu.warmup) == (64, 2048, True)
    from jaxinfer.engine import LARGE_DEVICE_BYTES

    small = config.for_device("gpu", 4096, LARGE_DEVICE_BYTES - 1)
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (64, 2048)
    large = config.for_device("gpu", 4096, LARGE_DEVICE_BYTES)
    assert (large.max_num_seqs, large.max_num_batched_tokens, large.warmup) == (512, 8192, True)
    assert large.num_decode_steps == 8 and large.max_model_len == 4096
    chosen = options.engine_config(parser.parse_args(["--max-num-seqs", "100"]))
    assert chosen.for_device("gpu", 4096, LARGE_DEVICE_BYTES).max_num_seqs == 100
    assert options.engine_config(parser.parse_args(["--no-warmup"])).warmup is False


def test_request_names_in_the_log_cannot_forge_lines():
    from jaxinfer.serving.metrics import _printable

    assert _printable("cmpl-1") == "cmpl-1"
    forged = _printable("alice\njaxinfer: request cmpl-FORGED-0: stop")
    assert "\n" not in forged and forged.startswith("alice\\n")
    assert len(_printable("x\t" * 500)) == 203
