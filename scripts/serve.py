"""jaxinfer's server: one engine shared by every client, over gRPC (jaxinfer/serving/grpc_server.py)
and/or the OpenAI-compatible HTTP API (jaxinfer/serving/http_server.py).

    python scripts/serve.py                                # the default model on 127.0.0.1:50051
    python scripts/serve.py --model PATH --host 0.0.0.0 --port 50051 --api-key KEY \
        --tls-cert cert.pem --tls-key key.pem --metrics-port 9090 --max-num-seqs 128
    python scripts/serve.py --http-port 8000               # gRPC on 50051 and OpenAI HTTP on 8000
    python scripts/serve.py --http-port 8000 --no-grpc     # HTTP only
    python scripts/serve.py --tensor-parallel-size 8       # the model split over 8 GPUs

The engine runs in a process of its own when a GPU is visible (--engine-process auto|on|off), so
the fronts' threads do not compete with its host work for one GIL.

One process on one host: a server does not run over several hosts yet (jaxinfer/distributed.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxinfer.serving.grpc_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
