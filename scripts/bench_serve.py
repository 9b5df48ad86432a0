"""The server under load on loopback (gRPC, the OpenAI HTTP front, or both on the same requests),
beside offline `Engine` throughput on the same requests.

    # H200, one call: server of Llama-3-8B's shape (random weights), then offline on the same requests
    python scripts/bench_serve.py --shape llama3-8b --workload 128x128 --rates 16:200,64:400,inf:1000 \
        --max-num-seqs 256 --max-num-batched-tokens 8192 --out bench/results/serve-llama3-8b-nvidia-h200.json
    # H200: the HTTP front against the gRPC front at saturation, one server, the same requests
    python scripts/bench_serve.py --shape llama3-8b --workload 128x128 --rates inf:1000 --front both \
        --max-num-seqs 256 --max-num-batched-tokens 8192 --no-offline \
        --out bench/results/serve-fronts-llama3-8b-nvidia-h200.json
    # CPU smoke
    python scripts/bench_serve.py --shape tiny --workload 16x16 --rates 20:20,inf:30 --num-pages 64 \
        --max-num-seqs 16 --max-num-batched-tokens 128

It starts `scripts/serve.py`'s server in a subprocess (random weights of a named shape, the given
engine options), waits for its health check, and for each `RATE:COUNT` sends COUNT streaming
requests with Poisson arrivals at RATE per second (`inf`: all at once, the saturation run) from
several client processes (`--front both`: each rate on the gRPC front, then the same requests on
the HTTP front's /v1/completions, streamed, usage at the end). Per rate and front: output tokens/s, requests/s, TTFT / TPOT / end-to-end p50 and
p99, errors by status code. Then it stops the server (SIGTERM) and runs the saturation run's
requests through an in-process `Engine` with the same options (bench_throughput.run_engine):
`server_vs_offline` is the server's saturation throughput over the offline one (the gRPC front's
with both; `http_vs_offline` the HTTP front's). Every request is
greedy with ignore_eos, so it makes exactly its output length on both sides. With both fronts,
`http_vs_grpc` is the HTTP front's saturation throughput over the gRPC front's.
`server_cpu_ms_per_request` is the server process's CPU time over a rate's requests (Linux): the
fronts' own cost where the engine runs in a process of its own (`--engine-process on`, the
default on a GPU), the engine's too where it runs on the server's thread.

    # CPU: what each front costs per request, the engine in its own process
    python scripts/bench_serve.py --shape tiny --workload 128x1 --rates inf:1000 --front both \
        --no-offline --client-procs 4 --server-log-level WARNING --server-extra "--engine-process on"
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_throughput import percentiles, run_engine, workload  # noqa: E402

from jaxinfer.benchmark import SHAPES, default_device, random_model, write_json  # noqa: E402

ENGINE_OPTIONS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "page_size",
    "num_pages",
    "attention_impl",
)


# ---------------------------------------------------------------------------------------------
# Clients: each process runs its share of the requests on one asyncio channel.


async def _one(stub, request, start_at: float, timeout: float) -> dict:
    import grpc

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    sent, first, tokens, code = time.monotonic(), None, 0, "OK"
    try:
        async for piece in stub.GenerateStream(request, timeout=timeout):
            if piece.token_ids and first is None:
                first = time.monotonic()
            tokens += len(piece.token_ids)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    return {"sent": sent, "first": first, "end": time.monotonic(), "tokens": tokens, "code": code}


async def _client(target: str, items: list, timeout: float) -> list[dict]:
    import grpc

    from jaxinfer.serving.client import generate_request
    from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        return await asyncio.gather(
            *(
                _one(
                    stub,
                    generate_request(prompt, max_tokens=out, temperature=0.0, ignore_eos=True),
                    start_at,
                    timeout,
                )
                for start_at, prompt, out in items
            )
        )


async def _one_http(
    target: str, request: tuple[list[int], int], start_at: float, timeout: float
) -> dict:
    """One streamed /v1/completions call on its own connection, read with asyncio streams (a
    small client, so that the client processes stay far from saturation)."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    prompt, out = request
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": out,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    host, port = target.rsplit(":", 1)
    sent, first, tokens, code = time.monotonic(), None, 0, "OK"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (host.encode(), len(body), body)
            )
            status = (await reader.readline()).split()[1].decode()
            while (await reader.readline()).strip():
                pass  # headers: the body is chunked server-sent events
            if status != "200":
                code = f"HTTP_{status}"
            async for event in _sse_events(reader):
                if event.get("choices") and first is None:
                    first = time.monotonic()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if "error" in event:
                    code = "STREAM_ERROR"
            writer.close()
    except TimeoutError:
        code = "DEADLINE_EXCEEDED"
    except OSError:
        code = "CONNECTION_ERROR"
    return {"sent": sent, "first": first, "end": time.monotonic(), "tokens": tokens, "code": code}


async def _sse_events(reader: asyncio.StreamReader):
    """The JSON objects of a chunked text/event-stream body, to `data: [DONE]`."""
    buffer = b""
    while size := int((await reader.readline()).strip() or b"0", 16):
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                return
            yield json.loads(data)


async def _client_http(target: str, items: list, timeout: float) -> list[dict]:
    return await asyncio.gather(
        *(_one_http(target, (prompt, out), start_at, timeout) for start_at, prompt, out in items)
    )


def client_process(front: str, target: str, items: list, timeout: float) -> list[dict]:
    """Runs `items` (monotonic start time, prompt ids, output length); one result per item."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # jaxinfer is imported for the stubs: keep off the GPU
    client = _client_http if front == "http" else _client
    return asyncio.run(client(target, items, timeout))


def run_rate(
    pool,
    procs: int,
    front: str,
    target: str,
    requests: list,
    rate: float,
    timeout: float,
    seed: int,
) -> dict:
    """Sends `requests` to `front` with Poisson arrivals at `rate`/s (inf: at once); returns the
    figures."""
    gaps = (
        np.zeros(len(requests))
        if math.isinf(rate)
        else np.random.default_rng(seed).exponential(1 / rate, len(requests))
    )
    t0 = time.monotonic() + 0.5  # every client process is up and waiting by then
    items = [(t0 + t, p, n) for t, (p, n) in zip(np.cumsum(gaps), requests)]
    futures = [
        pool.submit(client_process, front, target, items[i::procs], timeout) for i in range(procs)
    ]
    results = [r for f in futures for r in f.result()]
    ok = [r for r in results if r["code"] == "OK"]
    wall = max(r["end"] for r in results) - t0
    n_out = sum(r["tokens"] for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if r["code"] != "OK":
            errors[r["code"]] = errors.get(r["code"], 0) + 1
    short = sum(r["tokens"] != n for r, (_, n) in zip(results, requests) if r["code"] == "OK")
    return {
        "front": front,
        "rate": rate,
        "requests": len(requests),
        "completed": len(ok),
        "errors": errors,
        "short_answers": short,
        "wall_s": wall,
        "out_tok_per_s": n_out / wall,
        "req_per_s": len(ok) / wall,
        "ttft_s": percentiles([r["first"] - r["sent"] for r in ok if r["first"]]),
        "tpot_s": percentiles(
            [
                (r["end"] - r["first"]) / (r["tokens"] - 1)
                for r in ok
                if r["first"] and r["tokens"] > 1
            ]
        ),
        "e2e_s": percentiles([r["end"] - r["sent"] for r in ok]),
    }


# ---------------------------------------------------------------------------------------------
# The server subprocess and the offline engine.


def server_args(args, port: int, http_port: int | None) -> list[str]:
    """scripts/serve.py options of the benchmark's engine options."""
    out = [
        "--port",
        str(port),
        *(["--http-port", str(http_port)] if http_port else []),
        "--dtype",
        args.dtype,
        "--max-queue",
        "1000000",
        "--no-prefix-caching",
        "--log-level",
        args.server_log_level,
    ]
    for name in ENGINE_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + args.server_extra.split()


def start_server(args, port: int, http_port: int | None, log_path: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        "--shape",
        args.shape,
        "--layers",
        str(args.layers),
        "--dtype",
        args.dtype,
        "--",
        *server_args(args, port, http_port),
    ]
    env = dict(
        os.environ,
        XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"),
    )
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(target: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until the server's health check says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"the server was not healthy within {timeout:.0f}s")


def offline(args, requests) -> dict:
    """The same requests through an in-process Engine with the server's options."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    from jaxinfer.engine import Engine

    model = random_model(args.shape, args.dtype, args.layers)
    options = {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k) is not None}
    engine = Engine(model, enable_prefix_caching=False, **options)
    row = run_engine(engine, requests)
    row["device"], row["jax"] = default_device().device_kind, jax.__version__
    return row


def serve_main(argv: list[str]) -> int:
    """`--serve`: the server process, serving random weights of --shape."""
    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    args, rest = p.parse_known_args(argv)
    from jaxinfer.serving.grpc_server import main

    rest = [a for a in rest if a != "--"]
    return main(
        rest + ["--model", f"random:{args.shape}"],
        model_spec=(random_model, (args.shape, args.dtype, args.layers)),  # made by the engine
    )


def parse_rates(text: str) -> list[tuple[float, int]]:
    """ "16:200,64:400,inf:1000" -> [(16.0, 200), (64.0, 400), (inf, 1000)]."""
    out = []
    for part in text.split(","):
        rate, count = part.split(":")
        out.append((float(rate), int(count)))
    return out


def main() -> int:
    if "--serve" in sys.argv[1:]:
        return serve_main([a for a in sys.argv[1:] if a != "--serve"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workload", default="128x128", help="INxOUT token lengths, or mix")
    p.add_argument(
        "--rates",
        default="16:200,64:400,inf:1000",
        help="RATE:COUNT,... requests per second (inf: all at once) and how many",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--attention-impl", default=None)
    p.add_argument(
        "--front",
        default="grpc",
        choices=["grpc", "http", "both"],
        help="the front the clients call; both: each rate on gRPC, then on HTTP",
    )
    p.add_argument("--client-procs", type=int, default=4, help="client processes sending requests")
    p.add_argument("--request-timeout", type=float, default=300.0, help="deadline of each request")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--server-log-level", default="INFO", help="INFO logs one line per request")
    p.add_argument("--server-extra", default="", help="more scripts/serve.py options, quoted")
    p.add_argument("--no-offline", action="store_true", help="skip the offline comparison")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rates = parse_rates(args.rates)
    vocab = SHAPES[args.shape]["vocab_size"]
    runs = [
        (rate, workload(f"{args.workload}:{count}", vocab, seed=i))
        for i, (rate, count) in enumerate(rates)
    ]
    port = free_port()
    target = f"127.0.0.1:{port}"
    fronts = ["grpc", "http"] if args.front == "both" else [args.front]
    http_port = free_port() if "http" in fronts else None
    targets = {"grpc": target, "http": f"127.0.0.1:{http_port}"}
    log_path = (
        args.out[: -len(".json")]
        if args.out and args.out.endswith(".json")
        else tempfile.mkdtemp(prefix="bench_serve-") + "/server"
    ) + ".server.log"
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    report = {"shape": args.shape, "args": vars(args), "server_log": log_path, "rates": []}
    proc = start_server(args, port, http_port, log_path)
    try:
        report["server_startup_s"] = wait_healthy(target, proc, args.startup_timeout)
        print(
            f"server healthy after {report['server_startup_s']:.0f}s (log: {log_path})", flush=True
        )
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=spawn) as pool:
            warm = runs[0][1][
                : 2 * args.client_procs
            ]  # starts the client processes, warms the server
            for front in fronts:
                run_rate(
                    pool,
                    args.client_procs,
                    front,
                    targets[front],
                    warm,
                    math.inf,
                    args.request_timeout,
                    0,
                )
            for i, (rate, requests) in enumerate(runs):
                for front in fronts:
                    cpu = server_cpu_s(proc.pid)
                    row = run_rate(
                        pool,
                        args.client_procs,
                        front,
                        targets[front],
                        requests,
                        rate,
                        args.request_timeout,
                        seed=i,
                    )
                    if cpu is not None:
                        row["server_cpu_s"] = server_cpu_s(proc.pid) - cpu
                        row["server_cpu_ms_per_request"] = 1e3 * row["server_cpu_s"] / len(requests)
                    report["rates"].append(row)
                    print(json.dumps(row), flush=True)
                    write(report, args.out)
    finally:
        report["server_exit_code"] = stop_server(proc)
    saturation = next((r for r in runs if math.isinf(r[0])), runs[-1])
    at_saturation = {r["front"]: r for r in report["rates"] if r["rate"] == saturation[0]}
    if len(at_saturation) == 2:
        report["http_vs_grpc"] = (
            at_saturation["http"]["out_tok_per_s"] / at_saturation["grpc"]["out_tok_per_s"]
        )
    if not args.no_offline:
        report["offline"] = offline(args, saturation[1])
        print(json.dumps({"offline": report["offline"]}), flush=True)
        offline_tok_s = report["offline"]["out_tok_per_s"]
        report["server_vs_offline"] = at_saturation[fronts[0]]["out_tok_per_s"] / offline_tok_s
        if len(fronts) == 2:
            report["http_vs_offline"] = at_saturation["http"]["out_tok_per_s"] / offline_tok_s
    write(report, args.out)
    print_table(report)
    return 0


def server_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (the server drains and exits 0), SIGKILL after two minutes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def write(report: dict, path: str | None) -> None:
    if path:
        write_json(path, report)


def print_table(report: dict) -> None:
    off = report.get("offline")
    print(
        f"\n{off['device'] if off else ''}  {report['shape']}  {report['args']['workload']}  "
        f"server startup {report['server_startup_s']:.0f}s  exit {report['server_exit_code']}"
    )
    for r in report["rates"]:
        print(
            f"{r.get('front', 'grpc'):4s} rate {r['rate']:>6}/s  {r['completed']:5d}/{r['requests']:<5d} ok  "
            f"{r['out_tok_per_s']:9.0f} out tok/s  {r['req_per_s']:7.1f} req/s  "
            f"TTFT min {r['ttft_s'].get('min', float('nan')):.3f}s "
            f"p50 {r['ttft_s'].get('p50', float('nan')):.3f}s p99 "
            f"{r['ttft_s'].get('p99', float('nan')):.3f}s  TPOT p50 "
            f"{1e3 * r['tpot_s'].get('p50', float('nan')):.1f}ms p99 "
            f"{1e3 * r['tpot_s'].get('p99', float('nan')):.1f}ms  errors {r['errors'] or 0}"
            + (
                f"  server CPU {r['server_cpu_ms_per_request']:.2f} ms/req"
                if "server_cpu_ms_per_request" in r
                else ""
            )
        )
    if off:
        http = (
            f", HTTP / offline = {report['http_vs_offline']:.3f}"
            if "http_vs_offline" in report
            else ""
        )
        print(
            f"offline Engine on the saturation requests: {off['out_tok_per_s']:.0f} out tok/s; "
            f"server / offline = {report['server_vs_offline']:.3f}{http}"
        )
    if "http_vs_grpc" in report:
        print(f"HTTP / gRPC at saturation: {report['http_vs_grpc']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
