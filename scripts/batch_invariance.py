"""How often do greedy tokens differ between a request run inside a batch and the same request
run alone? Prints one JSON summary (and writes it with --out).

Both runs go through one `Engine` (same compiled buckets, same weights): first every prompt at
once (up to --max-num-seqs in a step), then each prompt by itself. For each request that differs,
the summary gives the first differing position and the gap between the top two log-probabilities
of the alone run there: a near tie (a small gap) flipped by a different summation order.

    PYTHONPATH=$PWD python scripts/batch_invariance.py                      # default model, bf16
    PYTHONPATH=$PWD python scripts/batch_invariance.py --dtype float32      # expect 0 differing
    PYTHONPATH=$PWD python scripts/batch_invariance.py --num-prompts 256 --max-tokens 128 \\
        --max-num-seqs 256 --out bench/results/batch_invariance_h200.json  # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time

import jax

import jaxinfer
from jaxinfer.benchmark import default_device
from jaxinfer.engine import Engine
from jaxinfer.sampling import SamplingParams

SUBJECTS = [
    "the sea",
    "a small town",
    "bread",
    "the moon",
    "rain",
    "a library",
    "trains",
    "winter",
    "a garden",
    "music",
    "the desert",
    "bees",
    "a bridge",
    "coffee",
    "snow",
    "a lighthouse",
]
TASKS = [
    "Write one sentence about {}.",
    "List three facts about {}.",
    "Explain {} to a child.",
    "Give a short poem about {}.",
]


def prompts(n: int) -> list[str]:
    """n distinct instruction prompts (subjects x tasks, then numbered)."""
    base = [t.format(s) for t, s in itertools.product(TASKS, SUBJECTS)]
    return [
        base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})") for i in range(n)
    ]


def run(engine: Engine, ids: dict[str, list[int]], params: SamplingParams) -> dict:
    """Runs the requests of `ids` to completion together; request id -> final output."""
    for rid, prompt in ids.items():
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def top2_gap(logprobs: dict[int, float]) -> float:
    top = sorted(logprobs.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def compare(batched, alone) -> dict:
    """Per differing request: the first differing position and the alone run's top-2 gap there."""
    diffs = []
    for rid in alone:
        a, b = alone[rid].token_ids, batched[rid].token_ids
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None and len(a) != len(b):
            k = min(len(a), len(b))
        if k is not None:
            gap = top2_gap(alone[rid].logprobs[k]) if k < len(a) else None
            diffs.append({"request": rid, "position": k, "alone_top2_logprob_gap": gap})
    return {"requests_differing": len(diffs), "differences": diffs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the repo's default model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    model = jaxinfer.load_model(args.model, dtype=args.dtype)
    texts = prompts(args.num_prompts)
    ids = {f"p{i}": list(model.tokenizer(t)["input_ids"]) for i, t in enumerate(texts)}
    longest = max(map(len, ids.values())) + args.max_tokens
    engine = Engine(
        model,
        max_num_seqs=args.max_num_seqs,
        max_model_len=max(longest, 256),
        max_num_batched_tokens=args.max_num_batched_tokens,
        warmup=False,
        enable_prefix_caching=False,
    )  # the alone runs must not reuse batched K/V
    # greedy; logprobs=2 gives the top two candidates at every position
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, logprobs=2
    )
    t0 = time.perf_counter()
    batched = run(engine, ids, params)
    t1 = time.perf_counter()
    print(f"batched run: {t1 - t0:.1f} s; now each request alone", file=sys.stderr, flush=True)
    alone = {}
    for i, (rid, prompt) in enumerate(ids.items()):
        alone |= run(engine, {rid: prompt}, params)
        if (i + 1) % 16 == 0:
            print(f"alone: {i + 1}/{len(ids)}", file=sys.stderr, flush=True)
    t2 = time.perf_counter()
    result = compare(batched, alone)
    gaps = [
        d["alone_top2_logprob_gap"]
        for d in result["differences"]
        if d["alone_top2_logprob_gap"] is not None
    ]
    summary = {
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "dtype": args.dtype,
        "platform": default_device().platform,
        "device": default_device().device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "requests_differing": result["requests_differing"],
        "fraction_differing": result["requests_differing"] / args.num_prompts,
        "tokens_compared": sum(len(o.token_ids) for o in alone.values()),
        "max_top2_gap_at_divergence": max(gaps, default=None),
        "median_first_divergence": sorted(d["position"] for d in result["differences"])[
            len(result["differences"]) // 2
        ]
        if result["differences"]
        else None,
        "batched_s": round(t1 - t0, 2),
        "alone_s": round(t2 - t1, 2),
        "differences": result["differences"],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
