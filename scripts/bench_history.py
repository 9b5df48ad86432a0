"""Host time of a step's penalties history (`runner.TokenHistories`): B penalized rows of about
N tokens, each step one token more (the step before's sample resolved, a new one in flight),
against copying every row's whole token list each step. Host only: any machine.

    python scripts/bench_history.py --rows 512 --tokens 1000 --out bench/results/history-host-<machine>.json
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer.runner import RowInfo, TokenHistories
from jaxinfer.sampling import SamplingParams
from jaxinfer.scheduler import PLACEHOLDER


def whole_lists(rows, b: int, max_model_len: int):
    """Every row's whole list copied (placeholders aside): the way before TokenHistories."""
    ids = np.full((b, max_model_len), -1, np.int32)
    is_output = np.zeros((b, max_model_len), bool)
    for i, r in enumerate(rows):
        n = len(r.token_ids)
        ids[i, :n] = r.token_ids
        is_output[i, r.num_prompt_tokens : n] = True
    return ids, is_output


def time_steps(build, b: int, n: int, max_model_len: int, steps: int) -> float:
    """Median ms of `build(plan, rows)` over `steps` steps of b rows growing from n tokens."""
    rng = np.random.default_rng(0)
    tokens = [[int(x) for x in rng.integers(0, 128_000, n)] for _ in range(b)]
    params = SamplingParams(repetition_penalty=1.1)
    plan = types.SimpleNamespace(
        seqs=[types.SimpleNamespace(request_id=str(i), arrival=i) for i in range(b)]
    )
    times = []
    for _ in range(steps):
        for t in tokens:
            if t[-1] == PLACEHOLDER:
                t[-1] = int(rng.integers(0, 128_000))  # the sample of the step before resolved
            t.append(PLACEHOLDER)  # this step's, in flight
        rows = [RowInfo(params, 0, len(t) - n // 2, t, n // 2, (), False, None) for t in tokens]
        start = time.perf_counter()
        build(plan, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=bm.int_list, default=[64, 512])
    p.add_argument("--tokens", type=bm.int_list, default=[1000, 4000])
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {**bm.report_header(), "max_model_len": args.max_model_len, "results": []}
    for b in args.rows:
        for n in args.tokens:
            histories = TokenHistories(args.max_model_len, b)
            prev = {str(i): i for i in range(b)}
            kept = time_steps(
                lambda plan, rows: histories.arrays(plan, rows, b, prev, False),  # noqa: B023
                b,
                n,
                args.max_model_len,
                args.steps,
            )
            whole = time_steps(
                lambda plan, rows: whole_lists(rows, b, args.max_model_len),  # noqa: B023
                b,
                n,
                args.max_model_len,
                args.steps,
            )
            row = {"rows": b, "tokens": n, "kept_ms": round(kept, 2), "whole_ms": round(whole, 2)}
            print(row, flush=True)
            report["results"].append(row)
    if args.out:
        bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
