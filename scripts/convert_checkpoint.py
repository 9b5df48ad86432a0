"""Converts an HF directory, a .gguf file or a jaxinfer checkpoint into a jaxinfer checkpoint.

    python scripts/convert_checkpoint.py SOURCE DEST [--dtype bfloat16|float16|float32]
"""

from __future__ import annotations

import argparse
import sys

import jaxinfer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="HF directory, .gguf file or jaxinfer checkpoint")
    parser.add_argument("dest", help="new directory for the jaxinfer checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    try:
        model = jaxinfer.load_model(args.source, dtype=args.dtype)
        path = jaxinfer.save_checkpoint(model, args.dest)
    except ValueError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"wrote {path}: {c.model_type}, {c.num_layers} layers, D={c.hidden_size}, "
          f"{c.num_params / 1e6:.1f}M params, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
