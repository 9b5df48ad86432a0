"""The gRPC front: `jaxinfer.v1.Inference` (proto/inference.proto) over one shared engine loop.

    python scripts/serve.py --model PATH --port 50051

A request goes: GenerateRequest -> prompt (text, chat-templated text, or token ids) and
SamplingParams (unset fields: the engine's defaults) -> `EngineLoop.submit` -> the stream's
outputs, every output pending at a wake-up merged into one response -> the client. A client that
cancels, passes its deadline or disconnects cancels its handler, whose `finally` aborts the
request in the engine, freeing its KV pages.

Status codes: INVALID_ARGUMENT (the engine's ValueError message), RESOURCE_EXHAUSTED (--max-queue
full), UNAVAILABLE (shutting down), INTERNAL (the engine failed), UNAUTHENTICATED (--api-key set
and the call lacks `authorization: Bearer KEY`; health checks stay open). The server also serves
`grpc.health.v1.Health` and server reflection. SIGTERM or SIGINT: health goes NOT_SERVING, new
requests get UNAVAILABLE, those in flight run to their end within --grace-period, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import logging
import signal
import sys

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.engine import Engine, RequestOutput
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import options
from jaxinfer.serving.engine_process import RemoteEngine
from jaxinfer.serving.loop import MAX_REQUEST_ID_CHARS as MAX_ID
from jaxinfer.serving.loop import (
    Closed,
    EngineError,
    EngineLoop,
    QueueFull,
    RequestStream,
    check_prompt_logprobs,
)
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.proto import inference_pb2 as pb
from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc
from jaxinfer.tokenizer import encode_prompt

log = logging.getLogger("jaxinfer.serving")

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "jaxinfer.v1.Inference"
_OPTIONAL = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "logprobs",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "prompt_logprobs",
)


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """The engine's SamplingParams of a request's message; unset fields keep their defaults.

    Raises:
      ValueError: a value out of range (the message names the field).
    """
    fields = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    if msg.stop:
        fields["stop"] = tuple(msg.stop)
    if msg.stop_token_ids:
        fields["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.logit_bias:  # a map: no id twice; SamplingParams checks the ids and biases
        fields["logit_bias"] = dict(msg.logit_bias)
    return SamplingParams(**fields)


def prompt_of(request: pb.GenerateRequest, tokenizer) -> list[int]:
    """The prompt's token ids: a text prompt (chat-templated if asked) is tokenized here, off
    the engine's thread, which then only checks the ids."""
    kind = request.WhichOneof("input")
    if kind == "token_ids":
        if request.chat:
            raise ValueError("chat applies to text prompts, not token ids")
        return list(request.token_ids.ids)
    if kind is None or not request.text:
        raise ValueError("the prompt is empty: set text or token_ids")
    return encode_prompt(tokenizer, request.text, chat=request.chat)


def response_of(
    stream: RequestStream,
    outputs: list[RequestOutput],
    whole: bool,
    params: SamplingParams,
    with_prompt: bool = True,
) -> pb.GenerateResponse:
    """One response for `outputs` (consecutive, in order): all text and tokens so far if `whole`,
    else only what they added; the prompt's logprobs if `with_prompt` and the outputs have them
    (a stream sends them once)."""
    last = outputs[-1]
    if whole:
        text, ids = last.text, last.token_ids
    else:
        text = "".join(o.text_delta for o in outputs)
        ids = [t for o in outputs for t in o.new_token_ids]
    response = pb.GenerateResponse(
        request_id=stream.request_id,
        text=text,
        token_ids=ids,
        finish_reason=(last.finish_reason or "") if last.finished else "",
        usage=pb.Usage(
            prompt_tokens=len(last.prompt_token_ids),
            completion_tokens=len(last.token_ids),
            cached_prompt_tokens=last.num_cached_tokens,
        ),
    )
    if last.logprobs is not None:
        per_token = last.logprobs[len(last.logprobs) - len(ids) :]
        response.logprobs.extend(
            _logprobs(t, lp, params.logprobs or 0) for t, lp in zip(ids, per_token)
        )
    if with_prompt and last.prompt_logprobs is not None:  # [None, then a dict per token]
        n, prompt = params.prompt_logprobs or 0, last.prompt_token_ids
        response.prompt_logprobs.extend(
            _logprobs(t, lp, n) for t, lp in zip(prompt[1:], last.prompt_logprobs[1:])
        )
    return response


def _logprobs(token: int, logprobs: dict[int, float], n: int) -> pb.TokenLogprobs:
    # The engine's dict holds the chosen token and the top n (n + 1 entries when the chosen one
    # is not among them): the n largest are the top n.
    top = sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]
    return pb.TokenLogprobs(
        token_id=token,
        logprob=logprobs[token],
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top],
    )


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What ModelInfo says of the model beside the engine's live state."""

    path: str


class InferenceService(pb_grpc.InferenceServicer):
    """The `jaxinfer.v1.Inference` handlers (grpc.aio), all sharing one EngineLoop."""

    def __init__(self, loop: EngineLoop, served: ServedModel):
        self.loop, self.served = loop, served
        self.tokenizer = loop.engine.model.tokenizer

    async def Generate(self, request, context):
        stream, params = await self._submit(request, context)
        outputs: list[RequestOutput] = []
        async for batch in self._outputs(stream, context):
            outputs = batch
        return response_of(stream, outputs, whole=True, params=params)

    async def GenerateStream(self, request, context):
        stream, params = await self._submit(request, context)
        prompt_sent = False  # the prompt's logprobs go in the first response that has them
        async for batch in self._outputs(stream, context):
            yield response_of(stream, batch, False, params, with_prompt=not prompt_sent)
            prompt_sent = prompt_sent or batch[-1].prompt_logprobs is not None

    async def ModelInfo(self, request, context):
        engine, stats = self.loop.engine, self.loop.stats()
        cfg = engine.model.config
        return pb.ModelInfoResponse(
            model_path=self.served.path,
            model_family=cfg.model_type,
            context_length=engine.max_model_len,
            vocab_size=cfg.vocab_size,
            dtype=np.dtype(engine.model.dtype).name,
            tensor_parallel_size=engine.model.tensor_parallel_size,
            kv_pages_total=stats.kv_pages_total,
            kv_pages_free=stats.kv_pages_free,
            kv_page_size=engine.config.page_size,
            max_num_seqs=engine.config.max_num_seqs,
            requests_running=stats.running,
            requests_waiting=stats.waiting,
        )

    async def _submit(self, request, context) -> tuple[RequestStream, SamplingParams]:
        try:
            if len(request.request_id) > MAX_ID:  # echoed in every response
                raise ValueError(
                    f"request_id has {len(request.request_id)} characters, more than {MAX_ID}"
                )
            params = sampling_params(request.sampling)
            prompt = await asyncio.to_thread(prompt_of, request, self.tokenizer)
            check_prompt_logprobs(len(prompt), params.prompt_logprobs)
        except ValueError as e:
            self.loop.refused(request.request_id[:MAX_ID], "invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return self.loop.submit(prompt, params, request.request_id or None), params
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Closed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def _outputs(self, stream: RequestStream, context):
        """The stream's output batches; errors become status codes; leaving early aborts."""
        try:
            async for batch in stream.batches():
                yield batch
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except Closed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:  # cancelled, past its deadline, disconnected: free the pages now
            self.loop.abort(stream)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries `authorization: Bearer <key>`."""

    def __init__(self, key: str):
        self._expected = f"Bearer {key}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong API key: send 'authorization: Bearer <key>'",
        )

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclasses.dataclass
class Server:
    """A started server: the gRPC server, its health servicer and the port it listens on."""

    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int


async def start_server(
    loop: EngineLoop,
    served: ServedModel,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> Server:
    """Starts the Inference, health and reflection services on host:port (0 picks a port).

    Args:
      loop: the started engine loop every call shares.
      served: what ModelInfo reports of the model.
      api_key: if set, every call but health checks needs `authorization: Bearer <api_key>`.
      tls: (PEM certificate chain, PEM private key) to serve TLS; None serves plaintext.
    """
    server = grpc.aio.server(
        interceptors=[BearerAuth(api_key)] if api_key else [], options=[("grpc.so_reuseport", 0)]
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceService(loop, served), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's "Failed to bind to address"
        raise options.StartError(f"gRPC cannot listen on {address} ({e})") from None
    await server.start()
    for name in ("", SERVICE):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Server(server, checker, bound)


async def watch_engine(server: Server, loop: EngineLoop, every_s: float = 0.5) -> None:
    """Sets health to NOT_SERVING once the engine can serve no more (its process died), so that
    a supervisor restarts the server; requests meanwhile fail with INTERNAL."""
    while not loop.failure:
        await asyncio.sleep(every_s)
    log.error("%s: health is NOT_SERVING from now on", loop.failure)
    for name in ("", SERVICE):
        await server.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


async def shutdown(server: Server | None, loop: EngineLoop, grace_s: float, http=None) -> bool:
    """Stops taking requests, lets those in flight finish within `grace_s`; True if all did.

    `http`: the (uvicorn server, its task) of the HTTP front, if one runs; it closes last.
    """
    loop.close()  # new requests: UNAVAILABLE / 503
    if server is not None:
        await server.health.enter_graceful_shutdown()
    drained = await asyncio.to_thread(loop.drain, grace_s)
    if not drained:
        log.warning(
            "%d request(s) still running after the %.0fs grace period: ending them",
            loop.num_unfinished(),
            grace_s,
        )
    await asyncio.to_thread(loop.stop)  # fails any left with UNAVAILABLE
    if server is not None:
        await server.grpc_server.stop(grace=5)  # their last messages go out
    if http is not None:
        http[0].should_exit = True
        await http[1]
    return drained


async def serve(args: argparse.Namespace, engine: Engine, model_path: str) -> int:
    """Runs the fronts of the parsed options until SIGTERM / SIGINT; returns the exit code."""
    # The engine thread gives up the GIL while the device works and wants it back at once when a
    # step is done; Python's 5 ms default would let the network thread hold it that long.
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    loop = EngineLoop(engine, max_queue=args.max_queue)
    metrics = Metrics(loop.stats)
    loop.observer = metrics.observe
    if args.metrics_port is not None:
        try:
            port = metrics.serve(args.metrics_port, args.host)
        except OSError as e:
            raise options.StartError(
                f"the metrics cannot listen on {args.host}:{args.metrics_port} ({e})"
            ) from None
        log.info("serving metrics on http://%s:%d/metrics", args.host, port)
    loop.start()
    try:
        server, http = await _start_fronts(args, loop, metrics, model_path)
    except BaseException:
        await shutdown(None, loop, 0.0)  # the fronts that did start are dropped with the process
        raise
    watcher = asyncio.create_task(watch_engine(server, loop)) if server is not None else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info(
        "stopping: no new requests; %d in flight get %gs to finish",
        loop.num_unfinished(),
        args.grace_period,
    )
    await shutdown(server, loop, args.grace_period, http)
    log.info("stopped")
    return 0


async def _start_fronts(args, loop: EngineLoop, metrics: Metrics, model_path: str):
    """(the gRPC Server or None, the HTTP front's (server, task) or None), started."""
    tls = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            tls = (c.read(), k.read())
    server = http = None
    if args.grpc:
        server = await start_server(
            loop,
            ServedModel(model_path),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            tls=tls,
        )
        log.info(
            "serving gRPC for %s on %s:%d (%s%s)",
            model_path,
            args.host,
            server.port,
            "TLS" if tls else "plaintext",
            ", API key required" if args.api_key else "",
        )
    if args.http_port is not None:
        from jaxinfer.serving import http_server

        front = http_server.OpenAIFront(
            loop,
            args.served_model_name or model_path,
            api_key=args.api_key,
            metrics_text=metrics.text if args.metrics_port is not None else None,
        )
        http = await http_server.start_http(
            front,
            args.host,
            args.http_port,
            args.log_level,
            (args.tls_cert, args.tls_key) if tls else None,
        )
        port = http[0].servers[0].sockets[0].getsockname()[1]
        log.info(
            "serving the OpenAI API for %s on %s://%s:%d/v1 as model %r%s",
            model_path,
            "https" if tls else "http",
            args.host,
            port,
            front.model_name,
            ", API key required" if args.api_key else "",
        )
    return server, http


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve.py",
        description="jaxinfer's server: gRPC "
        "(jaxinfer.v1.Inference, health, reflection) and/or the "
        "OpenAI-compatible HTTP API (--http-port).",
    )
    options.add_server_args(p, default_port=50051)
    return p


def main(argv: list[str] | None = None, model=None, model_spec: tuple | None = None) -> int:
    """`scripts/serve.py`: parses options, loads the model (unless given), serves until SIGTERM.

    Args:
      argv: command-line arguments (default: sys.argv[1:]).
      model: a loaded Model to serve instead of --model; the engine then runs in this process.
      model_spec: (load, load_args) to serve `load(*load_args)` (a Model) instead of --model,
        called where the engine runs (benchmarks serve random weights:
        `(jaxinfer.benchmark.random_model, (shape, dtype, layers))`).
    """
    p = parser()
    args = p.parse_args(argv)
    options.check_server_args(p, args)
    remote = model is None and options.use_engine_process(args)
    options.check_processes_and_devices(p, args, devices=not remote)  # the child checks its own
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    load, load_args = model_spec or (options.load_served_model, (args,))
    path = args.model or "(in-process model)"
    try:
        config = options.engine_config(args)
        build_args = (load, load_args, config, path)
        if model is not None:
            engine = Engine(model, config)
        elif remote:
            log.info("starting the engine process")
            engine = RemoteEngine(
                options.served_engine, build_args, step_timeout=args.engine_step_timeout
            )
            path = engine.path
        else:
            engine, path = options.served_engine(*build_args)
    except ValueError as e:  # a bad model path or engine option: one line, no traceback
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args, engine, path))
    except options.StartError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if remote:
            engine.close()
