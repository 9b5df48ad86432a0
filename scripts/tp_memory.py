"""Tensor parallelism's memory per device, worked out from the sharded declarations alone.

For each model shape and N devices: the weight bytes each device holds
(`sharding.weight_bytes_per_device`: the params' shapes through `jax.eval_shape`, split by the
rules table; nothing is allocated), the KV bytes one token costs each device
(`sharding.kv_bytes_per_token_per_device`), and, on an 80 GB and a 141 GB card, how many tokens
of KV fit in what is left of `--fraction` (0.9) of the card's memory after the weights (the rest
is for activations, compiled programs and CUDA's own), and how many sequences of the model's full
context that is. Weights and KV in bf16. A configuration whose weights leave no room for one
full-context sequence is marked as not fitting.

    python scripts/tp_memory.py [--json bench/results/tp-memory.json] [--models llama3-70b ...]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The shapes of the declarations need no accelerator: keep JAX off the GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {"llama2-70b": "Llama-2-70B", "llama3-70b": "Llama-3-70B", "mixtral-8x7b": "Mixtral-8x7B"}
SIZES = (1, 2, 4, 8)
MIB = 2**20
# The memory nvidia-smi reports: an H100 80GB HBM3 and an H200 (141 GB).
CARDS = {"80 GB": 81559 * MIB, "141 GB": 143771 * MIB}
DTYPE = "bfloat16"


def row(name: str, size: int, fraction: float) -> dict:
    """One model at one size: per-device weight and KV bytes, and the KV room on each card."""
    from jaxinfer.benchmark import shape
    from jaxinfer.config import ModelConfig
    from jaxinfer.sharding import kv_bytes_per_token_per_device, weight_bytes_per_device

    cfg = ModelConfig(**shape(name))
    weights = weight_bytes_per_device(cfg, DTYPE, size)
    per_token = kv_bytes_per_token_per_device(cfg, DTYPE, size)
    cards = {card: room(total, fraction, weights, per_token, cfg) for card, total in CARDS.items()}
    return dict(
        model=MODELS[name],
        shape=name,
        devices=size,
        weight_bytes_per_device=weights,
        kv_bytes_per_token_per_device=per_token,
        context=cfg.max_position_embeddings,
        cards=cards,
    )


def room(total: int, fraction: float, weights: int, per_token: int, cfg) -> dict:
    """KV tokens that fit on one device of `total` bytes after the weights, and full sequences."""
    left = int(total * fraction) - weights
    tokens = max(left, 0) // per_token
    sequences = tokens // cfg.max_position_embeddings
    return dict(kv_bytes=left, kv_tokens=tokens, full_sequences=sequences, fits=sequences > 0)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = ["model", "N", "weights / device", "KV / token / device"]
    for card in CARDS:
        head += [f"{card}: KV tokens", f"{card}: full-context seqs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"],
            str(r["devices"]),
            f"{r['weight_bytes_per_device'] / 2**30:.1f} GiB",
            f"{r['kv_bytes_per_token_per_device'] / 2**10:.0f} KiB",
        ]
        for c in r["cards"].values():
            if c["fits"]:
                cells += [f"{c['kv_tokens']:,}", f"{c['full_sequences']:,} x {r['context']:,}"]
            else:
                cells += ["does not fit", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the table; `--json PATH` also writes the rows and the assumptions."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--fraction", type=float, default=0.9, help="of each card's memory used")
    p.add_argument("--json", help="write the table here as JSON")
    args = p.parse_args(argv)
    rows = [row(name, n, args.fraction) for name in args.models for n in SIZES]
    print(
        f"Per-device memory under tensor parallelism ({DTYPE} weights and KV; "
        f"{args.fraction:.0%} of each card's memory for weights + KV):\n"
    )
    print(table(rows))
    if args.json:
        report = dict(
            dtype=DTYPE,
            fraction=args.fraction,
            card_bytes=CARDS,
            source="sharding.weight_bytes_per_device / kv_bytes_per_token_per_device",
            rows=rows,
        )
        from jaxinfer.benchmark import write_json

        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
