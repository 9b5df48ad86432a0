"""What a GPU engine's scheduler does with a workload, replayed on the CPU: the programs it runs.

    python scripts/replay_schedule.py --workloads 128x128:1000 --max-num-seqs 512
    python scripts/replay_schedule.py --workloads 1000x1000:100,mix:300 --steps

The engine runs with the GPU's settings (row buckets from 16, k decode steps a program, seats and
step budget as given) over the tiny model: the scheduler and the runner's bucketing are those of
any model, so the plans are the ones a GPU engine makes for the same requests (greedy, ignore_eos,
`bench_throughput.py`'s workloads). For each workload it reports the engine steps by kind
(multi-step decode programs, single decode steps, steps with prompt tokens), the decode programs'
row-steps and how many of them are live, and with `--steps` one line a step. Scheduling changes
can be predicted here before a GPU times them (bench/README.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

from bench_throughput import run_engine, workload

from jaxinfer import benchmark as bm


def replay(spec: str, max_num_seqs: int, budget: int, num_decode_steps: int, requests=None) -> dict:
    """Runs workload `spec` (or `requests`, [(prompt ids, output length)]) through a CPU engine
    with a GPU's settings; returns its step log ([{kind, seqs, tokens, rows, live_steps}], rows:
    the step's row bucket) and a summary."""
    from jaxinfer.engine import Engine, EngineConfig, device_defaults

    model = bm.random_model("tiny", "float32")
    requests = requests or workload(spec, model.config.vocab_size)
    longest = max(len(p) + n for p, n in requests)
    page = EngineConfig.page_size
    engine = Engine(
        model,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=longest,
        num_pages=sum(-(-(len(p) + n) // page) for p, n in requests) + 16,
        enable_prefix_caching=False,
        num_decode_steps=num_decode_steps,
        # a GPU's row buckets
        smallest_bucket=device_defaults("gpu", longest)["smallest_bucket"],
        warmup=False,
    )
    runner, log = engine.runner, []
    dispatch = runner.dispatch

    def logged(plan, rows):
        multi = runner.multi_step(plan, rows)
        kind = "program" if multi else ("decode" if plan.decode_only else "prompt")
        live = sum(s.num_steps for s in plan.seqs)
        log.append(
            dict(
                kind=kind,
                seqs=plan.num_seqs,
                tokens=plan.num_tokens,
                rows=runner.bucket(plan.num_tokens)[1],
                live_steps=live,
            )
        )
        return dispatch(plan, rows)

    runner.dispatch = logged
    stats = run_engine(engine, requests)
    programs = [s for s in log if s["kind"] == "program"]
    row_steps = sum(num_decode_steps * s["rows"] for s in programs)
    summary = {
        "steps": len(log),
        "kinds": dict(collections.Counter(s["kind"] for s in log)),
        "program_rows": dict(sorted(collections.Counter(s["rows"] for s in programs).items())),
        "program_row_steps": row_steps,
        "program_live_row_steps": sum(s["live_steps"] for s in programs),
        "output_tokens": stats["output_tokens"],
        # the engine's own counts of the same (its `stats`), beside the log's
        "engine_decode_row_steps": stats["decode_row_steps"],
        "engine_decode_planned_tokens": stats["decode_planned_tokens"],
    }
    if row_steps:
        summary["program_row_use"] = summary["program_live_row_steps"] / row_steps
    return {"log": log, "summary": summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="128x128:1000")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-decode-steps", type=int, default=8)
    p.add_argument("--steps", action="store_true", help="print one line a step")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {}
    for spec in [w for w in args.workloads.split(",") if w]:
        res = replay(spec, args.max_num_seqs, args.max_num_batched_tokens, args.num_decode_steps)
        report[spec] = res
        if args.steps:
            for i, s in enumerate(res["log"]):
                print(
                    f"{spec} step {i:4d} {s['kind']:8s} {s['seqs']:5d} seqs {s['tokens']:6d} "
                    f"tokens, {s['rows']:5d} rows, {s['live_steps']:6d} live row-steps"
                )
        print(json.dumps({spec: res["summary"]}), flush=True)
    if args.out:
        bm.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
