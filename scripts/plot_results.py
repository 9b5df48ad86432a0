"""Draws the headline figures from bench/results/ into PNGs, each figure beside its limit or peer.

  python scripts/plot_results.py [--card nvidia-h200] [--results bench/results] [--out bench/figures]

decode_vs_roofline.png   decode ms/step by batch against the HBM roofline and HF (bench_generate)
attention_vs_cudnn.png   prefill attention TFLOP/s against cuDNN; paged decode GB/s against the
                         card's copy bandwidth and a contiguous cache through XLA (bench_kernels)
throughput_vs_hf.png     engine output tokens/s against HF and the compute bound (bench_throughput)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

MODELS = ("llama2-7b", "llama3-8b", "mixtral-8x7b")
OURS, PEER, LIMIT = "tab:blue", "tab:orange", "0.35"


def load(results: str, name: str) -> dict | None:
    path = os.path.join(results, name)
    if not os.path.exists(path):
        print(f"skipped: no {path}", file=sys.stderr)
        return None
    with open(path) as fh:
        return json.load(fh)


def newest_generate(results: str, model: str, card: str) -> tuple[list[dict], list[dict], str]:
    """The newest bench_generate decode rows of our kernels (impl "pallas") for a model, the
    newest HF decode rows (the runs without --hf have none), and the device name."""
    runs = []
    for name in sorted(glob.glob(os.path.join(results, f"generate-{model}*-{card}.json"))):
        with open(name) as fh:
            report = json.load(fh)
        if model in report.get("models", {}):
            runs.append((report.get("date", ""), report))
    ours = hf = []
    device = card
    for _, report in sorted(runs, key=lambda run: run[0]):
        r = report["models"][model]
        rows = [d for d in r["jaxinfer"]["decode"] if d["impl"] == "pallas" and "error" not in d]
        ours, device = (rows, report["device"]) if rows else (ours, device)
        hf = r.get("hf", {}).get("decode") or hf
    return ours, hf, device


def decode_vs_roofline(results: str, card: str):
    """One panel per model: ms per decode step by batch; the roofline is every byte the step
    must read (weights, live KV; with experts, those the steps routed to) at the copy bandwidth
    measured in the same run."""
    runs = {m: run for m in MODELS if (run := newest_generate(results, m, card))[0]}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, (name, (rows, hf, _)) in zip(axes[0], runs.items()):
        batches = [d["batch"] for d in rows]
        ax.plot(batches, [d["ms_per_step"] for d in rows], "o-", color=OURS, label="jaxinfer")
        ax.plot(batches, [d["roofline_ms"] for d in rows], "--", color=LIMIT, label="HBM roofline")
        if hf:
            ax.plot(
                [d["batch"] for d in hf],
                [d["ms_per_step"] for d in hf],
                "s-",
                color=PEER,
                label="HF transformers",
            )
        for d in rows:
            ax.annotate(
                f"{d['x_roofline']:.2f}x",
                (d["batch"], d["ms_per_step"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
        ax.set(xscale="log", yscale="log", xlabel="batch", title=name)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        low, high = ax.get_ylim()
        ticks = [t for t in (2, 3, 5, 10, 20, 30, 50, 100, 200) if low <= t <= high]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per decode step (lower is better)")
    axes[0][0].legend(fontsize=8)
    device = next(iter(runs.values()))[2]
    fig.suptitle(
        f"Decode step against the HBM roofline, {device} (labels: multiple of the roofline)"
    )
    return fig


def attention_vs_cudnn(results: str, card: str):
    report = load(results, f"kernels-{card}.json")
    if report is None:
        return None
    fig, (pre, dec) = plt.subplots(1, 2, figsize=(11, 4))
    for heads, style in (((32, 8), "-"), ((32, 32), "--")):
        rows = [r for r in report.get("prefill", []) if (r["N"], r["K"]) == heads]
        t = [r["T"] for r in rows]
        label = f"N={heads[0]} K={heads[1]}"
        pre.plot(
            t, [r.get("ours_tflops") for r in rows], "o" + style, color=OURS, label=f"ours, {label}"
        )
        pre.plot(
            t,
            [r.get("cudnn_tflops") for r in rows],
            "s" + style,
            color=PEER,
            label=f"cuDNN, {label}",
        )
    pre.set(
        xscale="log",
        xlabel="tokens T (B x T = 16k)",
        ylabel="TFLOP/s (higher is better)",
        title="causal prefill attention, bf16, H=128",
    )
    pre.set_ylim(bottom=0)
    ts = sorted({r["T"] for r in report.get("prefill", [])})
    pre.set_xticks(ts, [str(t) for t in ts])
    pre.minorticks_off()
    pre.legend(fontsize=8)
    pre.grid(alpha=0.3)
    rows = [r for r in report.get("decode", []) if r["L"] == 16]
    labels = [f"B{r['B']}\n{r['ctx'] // 1024}k" for r in rows]
    x = range(len(rows))
    width = 0.4
    dec.bar(
        [i - width / 2 for i in x],
        [r.get("ours_GBps", 0) for r in rows],
        width,
        color=OURS,
        label="ours (paged, L=16)",
    )
    dec.bar(
        [i + width / 2 for i in x],
        [r.get("contiguous_xla_GBps", 0) for r in rows],
        width,
        color=PEER,
        label="contiguous cache, XLA",
    )
    dec.axhline(report["copy"]["GBps"], ls="--", color=LIMIT, label="copy bandwidth")
    dec.set_xticks(list(x), labels, fontsize=8)
    dec.set(ylabel="KV GB/s (higher is better)", title="paged decode attention, N=32 K=8 H=128")
    dec.legend(fontsize=8)
    dec.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Attention kernels, {report['card']}")
    fig.tight_layout()
    return fig


def throughput_vs_hf(results: str, card: str):
    """Per model and workload: output tokens/s of the engine, of HF (where the run has it), and
    the compute bound (bf16 matmul peak over 2 x params flops per token)."""
    bars, device = [], card
    for m in MODELS:
        for name in (f"throughput-{m}-with-hf-{card}.json", f"throughput-{m}-{card}.json"):
            report = load(results, name)
            if report and "workloads" in report:
                bars += [(f"{m}\n{spec}", w) for spec, w in report["workloads"].items()]
                device = report["device"]
                break
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4.2))
    width = 0.27
    for i, (_, w) in enumerate(bars):
        ax.bar(
            i - width,
            w["out_tok_per_s"],
            width,
            color=OURS,
            label="jaxinfer engine" if i == 0 else None,
        )
        hf = w.get("hf", {}).get("out_tok_per_s")
        if hf:
            ax.bar(i, hf, width, color=PEER, label="HF transformers" if i == 0 else None)
            ax.annotate(
                f"{w['out_tok_per_s'] / hf:.0f}x HF",
                (i - width, w["out_tok_per_s"]),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
        ax.bar(
            i + width,
            w["compute_bound_out_tok_per_s"],
            width,
            color=LIMIT,
            label="compute bound" if i == 0 else None,
        )
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set(ylabel="output tokens/s (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(
        f"Offline engine throughput, greedy, bf16 (workload IN x OUT : requests), {device}"
    )
    fig.tight_layout()
    return fig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card", default="nvidia-h200", help="the card slug in the result file names")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--out", default="bench/figures")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, draw in (
        ("decode_vs_roofline", decode_vs_roofline),
        ("attention_vs_cudnn", attention_vs_cudnn),
        ("throughput_vs_hf", throughput_vs_hf),
    ):
        fig = draw(args.results, args.card)
        if fig is None:
            continue
        path = os.path.join(args.out, f"{name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
