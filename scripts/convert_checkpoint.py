"""Converts an HF directory, a .gguf file or a jaxinfer checkpoint into a jaxinfer checkpoint.

python scripts/convert_checkpoint.py SOURCE DEST [--dtype bfloat16|float16|float32]
"""

import sys

from jaxinfer.checkpoint import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
