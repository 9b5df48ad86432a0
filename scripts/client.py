"""Streams an answer from a jaxinfer gRPC server to stdout.

python scripts/client.py "Name a primary colour." --chat --max-tokens 64
python scripts/client.py --info                       # the served model and the engine's state
"""

import argparse
import os
import sys

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxinfer.serving.client import Client  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?")
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--api-key", default=None, help="default: $JAXINFER_API_KEY")
    p.add_argument("--tls-ca", default=None, help="PEM certificate to trust: connect with TLS")
    p.add_argument("--info", action="store_true", help="print ModelInfo instead")
    args = p.parse_args()
    if not args.info and not args.prompt:
        p.error("give a prompt (or --info)")
    try:
        client = Client(args.target, api_key=args.api_key, root_cert=args.tls_ca)
    except OSError as e:
        p.error(f"--tls-ca {args.tls_ca!r}: {e.strerror or e}")
    try:
        if args.info:
            print(client.model_info(timeout=10), end="")
            return 0
        for piece in client.stream(
            args.prompt, chat=args.chat, max_tokens=args.max_tokens, temperature=args.temperature
        ):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except grpc.RpcError as e:
        print(f"client.py: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
