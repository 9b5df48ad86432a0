"""How fast `load_model` reads an HF safetensors checkpoint, and how much host memory it takes.

    python scripts/bench_load.py --model llama3-8b --layers 8 --out bench/results/load-<card>.json

Builds the shape in HF transformers (random bf16 weights, on the GPU if there is one), saves it
with `save_pretrained` (safetensors) to a temporary folder, then in a fresh process loads it with
`jaxinfer.load_model` (bf16) and reports seconds, GB/s of checkpoint, and that process's peak
anonymous resident memory beside the checkpoint's size and its largest tensor. Last, the logits of a few
tokens against HF's (bf16 both: a loose check that every tensor landed in place).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from jaxinfer import benchmark as bm


def save_hf(shape: dict, path: str) -> dict:
    """Saves the random HF model of `shape`; returns its sizes and the logits of a probe."""
    import torch

    model, device = bm.hf_random_model(shape)
    model.save_pretrained(path)
    probe = np.random.RandomState(0).randint(0, shape["vocab_size"], (1, 16))
    with torch.no_grad():
        logits = model(torch.tensor(probe, device=device)).logits.float().cpu().numpy()
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return {
        "checkpoint_bytes": sum(sizes),
        "largest_tensor_bytes": max(sizes),
        "probe": probe,
        "hf_logits": logits,
    }


def anon_rss_bytes() -> int:
    """This process's anonymous resident memory (file-backed pages, such as the checkpoint's
    memory map, are the page cache's, not the loader's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """The highest `anon_rss_bytes` seen, sampled every few milliseconds until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = anon_rss_bytes(), threading.Event()

    def run(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, anon_rss_bytes())


def load_in_this_process(path: str, tp: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxinfer

    jax.block_until_ready(jnp.zeros(8))  # the backend up: its memory is not the loader's
    before = anon_rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = jaxinfer.load_model(path, dtype="bfloat16", tensor_parallel_size=tp)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    probe = np.load(os.path.join(path, "probe.npy"))
    logits = np.asarray(jaxinfer.forward(model, probe), np.float32)
    return {
        "load_s": seconds,
        "anon_rss_before_load_bytes": before,
        "anon_rss_peak_bytes": sampler.peak,
        "logits": logits.tolist(),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--load-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.load_only:
        print(json.dumps(load_in_this_process(args.load_only, args.tensor_parallel_size)))
        return 0
    shape = bm.shape(args.model, args.layers)
    with tempfile.TemporaryDirectory() as path:
        saved = save_hf(shape, path)
        np.save(os.path.join(path, "probe.npy"), saved.pop("probe"))
        hf_logits = saved.pop("hf_logits")
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--load-only",
                path,
                "--tensor-parallel-size",
                str(args.tensor_parallel_size),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = np.asarray(loaded.pop("logits"), np.float32)
    scale = float(np.abs(hf_logits).max())
    report = {
        "device": bm.default_device().device_kind,
        "model": args.model,
        "layers": args.layers,
        "tensor_parallel_size": args.tensor_parallel_size,
        **saved,
        **loaded,
        "checkpoint_GB_per_s": saved["checkpoint_bytes"] / loaded["load_s"] / 1e9,
        "load_anon_rss_growth_bytes": loaded["anon_rss_peak_bytes"]
        - loaded["anon_rss_before_load_bytes"],
        "logits_max_abs_diff_over_max": float(np.abs(ours - hf_logits).max()) / scale,
        "greedy_agree": float(np.mean(ours.argmax(-1) == hf_logits.argmax(-1))),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        bm.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
