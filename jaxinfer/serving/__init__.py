"""Serving: one engine loop (a thread that owns the `Engine`) shared by the network fronts.

loop.py          EngineLoop: submit / abort / stats / drain, request streams for threads and asyncio
grpc_server.py   the gRPC front (jaxinfer.v1.Inference, health, reflection, auth, TLS, SIGTERM)
http_server.py   the OpenAI-compatible HTTP front (FastAPI + uvicorn: completions, chat, models)
metrics.py       one log line per request; Prometheus counters, histograms and engine gauges
options.py       the command-line options every front shares (model, engine, listener)
client.py        a small gRPC client (scripts/client.py, the tests, scripts/bench_serve.py)
proto/           inference.proto and its generated stubs (python -m jaxinfer.serving.protogen)
"""
