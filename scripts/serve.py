"""jaxinfer's gRPC server: one engine shared by every client (see jaxinfer/serving/grpc_server.py).

    python scripts/serve.py                                # the default model on 127.0.0.1:50051
    python scripts/serve.py --model PATH --host 0.0.0.0 --port 50051 --api-key KEY \
        --tls-cert cert.pem --tls-key key.pem --metrics-port 9090 --max-num-seqs 128
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxinfer.serving.grpc_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
