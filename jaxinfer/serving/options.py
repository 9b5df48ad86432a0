"""Command-line options every server front shares: the model, the engine's limits, the listener.

parser = argparse.ArgumentParser()
add_server_args(parser, default_port=50051)
args = parser.parse_args()
engine, path = served_engine(load_served_model, (args,), engine_config(args))
# or, with --engine-process: RemoteEngine(served_engine, (load_served_model, (args,), config))
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import ssl

API_KEY_ENV = "JAXINFER_API_KEY"
# Seconds of silence, with requests in flight, after which an engine process is taken for hung.
ENGINE_STEP_TIMEOUT = 300.0


def add_server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Adds --model, the engine options, and the listener / security / metrics options."""
    m = parser.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        help="HF directory, .gguf file or jaxinfer checkpoint (default: SmolLM2-135M-Instruct)",
    )
    m.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="(default: bfloat16 on a GPU, float32 on a CPU)",
    )
    m.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="devices to split the model over (tensor parallel, on this host)",
    )
    e = parser.add_argument_group("engine")
    e.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most requests in one step (default: 512 on a GPU whose JAX allocator holds 40 GiB "
        "or more, 64 on a smaller one, 8 on a CPU)",
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens in one step (default: 8192 on a GPU whose JAX allocator holds 40 GiB "
        "or more, 2048 on a smaller one, 256 on a CPU)",
    )
    e.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + max_tokens at most (default: the model's context, at most 2048 on a CPU)",
    )
    e.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    e.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages in the pool (default: fill --kv-cache-memory-fraction)",
    )
    e.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    e.add_argument(
        "--attention-impl",
        default=None,
        help="attention kernels: pallas, xla or reference (EngineConfig checks it; default: "
        "the platform's, pallas on a GPU and xla on a CPU)",
    )
    e.add_argument("--seed", type=int, default=0, help="seeds requests that bring none")
    e.add_argument(
        "--num-decode-steps",
        type=int,
        default=None,
        help="decode steps in one program when every request decodes (default: 8 on a GPU, "
        "1 on a CPU; 1 gives the least time to first token under load)",
    )
    e.add_argument(
        "--engine-process",
        default="auto",
        choices=["auto", "on", "off"],
        help="run the engine in a process of its own, away from the fronts' GIL (auto: on "
        "when a GPU is visible, off on a CPU)",
    )
    e.add_argument(
        "--engine-step-timeout",
        type=float,
        default=ENGINE_STEP_TIMEOUT,
        help="seconds an engine process may go without a step while requests are in flight; "
        "then it is taken for hung and killed, its requests fail and health turns NOT_SERVING",
    )
    e.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        default=None,
        help="compile each step shape on first use instead of at start-up (a CPU's default)",
    )
    s = parser.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    s.add_argument(
        "--port", type=int, default=default_port, help="the gRPC port (0 picks a free port)"
    )
    s.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the OpenAI-compatible HTTP API on this port (0 picks one)",
    )
    s.add_argument(
        "--no-grpc", dest="grpc", action="store_false", help="serve HTTP only (needs --http-port)"
    )
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the HTTP API (default: the --model path)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="most requests waiting for their first token; more are refused",
    )
    s.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds requests in flight may take to finish after SIGTERM",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require 'authorization: Bearer KEY' on every call (or set ${API_KEY_ENV})",
    )
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (off by default)",
    )
    s.add_argument("--log-level", default="INFO")
    s.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.5,
        help="Python's GIL switch interval: how long the network threads may keep the "
        "engine thread waiting after each device step (Python's default is 5)",
    )


def check_server_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses option values the server cannot serve, as one-line parser errors."""
    if args.tensor_parallel_size < 1:
        parser.error(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name.replace('_', '-')} {path!r} is not a file")
    if not args.grpc and args.http_port is None:
        parser.error("--no-grpc leaves no front: give --http-port")
    sizes = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_pages", "max_queue")
    for name in (*sizes, "num_decode_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    for name in ("port", "http_port", "metrics_port"):
        port = getattr(args, name)
        if port is not None and not 0 <= port <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 65535], got {port}")
    if not 0 <= args.grace_period < math.inf:
        parser.error(f"--grace-period must be a number of seconds >= 0, got {args.grace_period}")
    if not 0 < args.engine_step_timeout < math.inf:
        parser.error(
            f"--engine-step-timeout must be a number of seconds > 0, got {args.engine_step_timeout}"
        )
    if not 0 < args.switch_interval_ms < math.inf:
        parser.error(f"--switch-interval-ms must be > 0, got {args.switch_interval_ms}")
    if args.log_level.upper() not in logging.getLevelNamesMapping():
        parser.error(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}")
    if args.tls_cert:
        try:  # a pair that does not load would fail later as "Failed to bind to address"
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.tls_cert, args.tls_key
            )
        except (ssl.SSLError, OSError) as e:
            parser.error(f"--tls-cert / --tls-key do not load as a PEM certificate and key: {e}")
    # An empty key (`--api-key "$KEY"` with KEY unset) would serve without one: refused.
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV)
        if args.api_key is not None and not args.api_key.strip():
            parser.error(f"${API_KEY_ENV} is set but empty; unset it to serve without a key")
    elif not args.api_key.strip():
        parser.error("--api-key is empty; leave it out to serve without a key")


class StartError(Exception):
    """A front could not start (its port is taken, say): one line for the user."""


def use_engine_process(args: argparse.Namespace) -> bool:
    """--engine-process; "auto" is on when a GPU is visible, judged without starting jax here
    ($JAX_PLATFORMS if set, else an NVIDIA or AMD device node)."""
    if args.engine_process != "auto":
        return args.engine_process == "on"
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(p.strip() in ("cuda", "gpu", "rocm") for p in platforms.split(","))
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


def check_processes_and_devices(
    parser: argparse.ArgumentParser, args: argparse.Namespace, devices: bool = True
):
    """Refuses, as a one-line parser error, a server of several processes (they would all have
    to be told of every request; jaxinfer/distributed.py) and, if `devices`, a
    --tensor-parallel-size beyond this host's devices (which starts jax's backend)."""
    from jaxinfer import distributed

    try:
        n = distributed.requested_processes()
    except ValueError as e:  # $JAXINFER_NUM_PROCESSES=two, say
        parser.error(str(e))
    if n > 1:
        parser.error(
            f"{n} processes asked for (${distributed.COUNT_ENV} or the cluster): a server runs "
            "in one process, tensor parallel over its host's devices; several hosts serve "
            "offline batches (LLM) only for now"
        )
    error = devices and device_error(args.tensor_parallel_size)
    if error:
        parser.error(error)


def device_error(tensor_parallel_size: int) -> str | None:
    """Why this host cannot run `tensor_parallel_size` devices, or None. Starts jax's backend."""
    import jax

    devices = len(jax.devices())
    if tensor_parallel_size > devices:
        return (
            f"--tensor-parallel-size {tensor_parallel_size} needs that many devices "
            f"but {devices} exist"
        )
    return None


def engine_config(args: argparse.Namespace):
    """The EngineConfig the options ask for (it checks its own values)."""
    from jaxinfer.engine import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        attention_impl=args.attention_impl,
        seed=args.seed,
        warmup=args.warmup,
        num_decode_steps=args.num_decode_steps,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def served_engine(load, load_args: tuple, config, path: str | None = None):
    """(the Engine of `load(*load_args)` and `config`, the model's path), in the process that runs
    the engine. `load` returns a Model or (Model, path): `load_served_model` with (args,), or
    `jaxinfer.benchmark.random_model` with (shape, dtype, layers). Raises ValueError for a bad
    --tensor-parallel-size, path or option."""
    from jaxinfer.engine import Engine

    error = device_error(config.tensor_parallel_size or 1)
    if error:
        raise ValueError(error)
    loaded = load(*load_args)
    model, path = loaded if isinstance(loaded, tuple) else (loaded, path)
    return Engine(model, config), path


def load_served_model(args: argparse.Namespace):
    """(the Model of --model, its path); no --model: the default model, converted on first use."""
    from jaxinfer.checkpoint import ensure_default_model, load_model

    path = args.model if args.model is not None else ensure_default_model()
    model = load_model(path, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size)
    return model, str(path)
