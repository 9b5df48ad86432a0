"""Time per token at batch 1 on this machine: the engine (`LLM`, the device's default sizes)
against `generate()`, same model, prompt and length, interleaved so both see the same load.

    python scripts/bench_cpu_engine.py --out bench/results/cpu-engine-vs-generate.json

Each side runs once untimed (compiles), then `--repeats` times; the figure is the median seconds
per generated token (greedy, `ignore_eos`, so both make exactly `--tokens`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the device's")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax

    import jaxinfer
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.benchmark import default_device, write_json

    model = jaxinfer.load_model(args.model, dtype=args.dtype)
    ids = model.tokenizer(args.prompt)["input_ids"]
    llm = LLM(model=model, max_model_len=args.max_model_len)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def engine_run():
        (out,) = llm.generate([ids], params, use_tqdm=False)
        return len(out.token_ids)

    def generate_run():  # no stop ids: exactly `tokens` new tokens, like ignore_eos
        return len(
            jaxinfer.generate(model, [ids], max_new_tokens=args.tokens, stop_token_ids=None)[0]
        )

    times = {"engine": [], "generate": []}
    for run in (engine_run, generate_run):
        run()  # compiles
    for _ in range(args.repeats):
        for name, run in (("engine", engine_run), ("generate", generate_run)):
            start = time.perf_counter()
            n = run()
            times[name].append((time.perf_counter() - start) / n)
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "device": default_device().device_kind,
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "dtype": str(model.dtype),
        "tokens": args.tokens,
        "prompt_tokens": len(ids),
        "engine_config": {k: v for k, v in vars(llm.engine.config).items()},
        "s_per_token": times,
        "median_s_per_token": median,
        "engine_over_generate": median["engine"] / median["generate"],
    }
    print(json.dumps(report, indent=1, default=str))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
