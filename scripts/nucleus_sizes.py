"""How many tokens a model's top-p nucleus keeps, on its own sampled answers (CPU is enough).

The sampler draws a filtered row among its top 256 tokens where the filters cut inside them and
sorts the whole row otherwise (`sampling._draw_filtered`): this counts how often a real model's
rows need the whole row. It samples answers to a few chat prompts, runs the model once over each
answer, and reports the nucleus sizes of every answer position per (temperature, top_p).

    python scripts/nucleus_sizes.py --out bench/results/nucleus-sizes-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer import LLM, SamplingParams
from jaxinfer.model import forward

PROMPTS = (
    "Write a short story about a dragon.",
    "Explain how a CPU works.",
    "What is the capital of France?",
    "Give me ten ideas for a birthday party.",
    "Write a poem about the sea.",
    "Summarize the plot of Hamlet.",
    "How do I bake bread?",
    "Tell me a joke.",
    "Describe a sunset.",
    "List some prime numbers and explain them.",
)
SETTINGS = ((0.7, 0.9), (0.8, 0.95), (1.0, 0.9), (1.0, 0.95))


def nucleus_sizes(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """[T] tokens each row's top-p keeps (float64, as the filter's definition)."""
    x = logits / temperature
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ordered = -np.sort(-probs, axis=-1)
    return ((np.cumsum(ordered, axis=-1) - ordered) < top_p).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = jaxinfer.load_model(args.model)
    chats = [
        model.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in PROMPTS
    ]
    llm = LLM(args.model, max_num_seqs=len(chats))
    answers = llm.generate(
        chats, SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=3)
    )
    sizes = {s: [] for s in SETTINGS}
    for chat, answer in zip(chats, answers):
        ids = model.tokenizer(chat)["input_ids"]
        seq = list(ids) + list(answer.token_ids)
        logits = np.asarray(forward(model, jnp.asarray([seq]))[0, len(ids) - 1 : -1], np.float64)
        for t, top_p in SETTINGS:
            sizes[(t, top_p)] += nucleus_sizes(logits, t, top_p).tolist()
    report = {"model": args.model or "default", "rows": []}
    for (t, top_p), n in sizes.items():
        n = np.asarray(n)
        row = {
            "temperature": t,
            "top_p": top_p,
            "rows": len(n),
            "median": float(np.median(n)),
            "p90": float(np.percentile(n, 90)),
            "p99": float(np.percentile(n, 99)),
            "max": int(n.max()),
            "past_256": round(float((n > 256).mean()), 4),
        }
        report["rows"].append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
