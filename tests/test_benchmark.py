"""The benchmark kit: the timer's call pattern, the error metric, and a sweep that survives a
native crash in one of its units."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxinfer import benchmark as bm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pipelined_time_threads_state_through_back_to_back_calls():
    calls, starts = [], []

    def setup():
        starts.append(len(calls))
        return 0

    def fn(state):
        calls.append(state)
        return state + 1

    assert bm.pipelined_time(fn, repeats=3, calls=4, setup=setup) >= 0
    # one warm-up call, then 3 runs of 4 calls, each run starting from setup()
    assert calls == [0] + [0, 1, 2, 3] * 3 and starts == [0, 1, 5, 9]
    seen = []  # min_time sets the calls per run from a second warm-up call: at least 2
    bm.pipelined_time(seen.append, repeats=2, calls=99, min_time=0.0)
    assert len(seen) == 1 + 1 + 2 * 2


def test_time_over_sets_hands_back_the_program_it_timed():
    import jax.numpy as jnp

    sets = [(np.full((4, 8), i, np.float32), np.ones((8, 2), np.float32)) for i in range(3)]
    texts = []
    sec = bm.time_over_sets(jnp.dot, sets, repeats=1, min_time=None, compiled_text=texts)
    assert sec > 0 and len(texts) == 1 and texts[0].count("f32[4,2]") >= 3  # three outputs


def test_gemm_calls_counts_cublas_calls_and_triton_gemm_fusions():
    # Lines as XLA's GPU compiler prints them (a rotation of two o weights that its dot merger
    # joined: one cuBLAS call over their concatenation; the Triton form, one GEMM fusion).
    cublas = (
        "%custom-call.1 = (bf16[128,8192]{1,0}, s8[33554432]{0}) custom-call(%c, %cat), "
        'custom_call_target="__cublas$lt$matmul", metadata={}'
    )
    triton = (
        "%gemm_fusion_dot.1 = f32[2,128,8192]{2,1,0} fusion(%c, %w0, %w1), kind=kCustom, "
        "calls=%gemm_fusion_dot.1_computation, metadata={}"
    )
    loop = "%wrapped_slice = bf16[128,4096]{1,0} fusion(%g), kind=kLoop, calls=%wrapped_slice_c"
    assert bm.gemm_calls("\n".join([cublas, loop, cublas])) == 2
    assert bm.gemm_calls("\n".join([triton, loop])) == 1
    assert bm.gemm_calls(loop) == 0


def test_errors_name_each_measure():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]])
    out = ref + np.array([[0.0, 0.5], [0.0, -1.0]])
    e = bm.errors(out, ref)
    assert e["max_abs_err"] == 1.0 and e["max_rel_err"] == 0.25 and e["finite"]
    np.testing.assert_allclose(e["rel_err"], np.sqrt(1.25) / np.linalg.norm(ref))
    np.testing.assert_allclose(bm.max_rel_err(out, ref, axis=-1), [0.25, 0.25])
    assert not bm.errors(out * np.nan, ref)["finite"]


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model shape 'llama9'"):
        bm.shape("llama9")
    assert bm.shape("tiny", layers=3)["num_layers"] == 3


def test_check_against_f32_measures_the_dtype_s_own_rounding():
    """check_impls(f32=True): the bf16 reference's error against the f32 forward of the same
    weights is bf16 rounding (well above f32 noise, well below 10%), an impl on those weights
    lands at the same floor, and an f32 model's check against itself is exact."""
    rng = np.random.RandomState(0)
    bf16 = bm.check_impls(bm.random_model("tiny", "bfloat16"), ["xla"], rng, f32=True)["vs_f32"]
    assert set(bf16) == {"reference", "xla"}
    for name in ("reference", "xla"):
        assert 1e-3 < bf16[name]["max_rel_error"] < 0.1, bf16
        assert bf16[name]["median_rel_error"] <= bf16[name]["max_rel_error"]
        assert bf16[name]["argmax_agreement"] > 0.8
    ratio = bf16["xla"]["median_rel_error"] / bf16["reference"]["median_rel_error"]
    assert 0.8 < ratio < 1.25, bf16  # the impl rounds like the reference, no worse
    f32 = bm.check_impls(bm.random_model("tiny", "float32"), ["xla"], rng, f32=True)["vs_f32"]
    assert all(r["max_rel_error"] < 1e-5 and r["argmax_agreement"] == 1.0 for r in f32.values())


SWEEP = """
import argparse, os, sys, json
from jaxinfer import benchmark as bm

p = argparse.ArgumentParser()
p.add_argument("--out")
bm.add_sweep_args(p)
args = p.parse_args()
status, journal = bm.sweep_journal(args, args.out + ".journal")
if journal is None:
    sys.exit(status)

def unit(name):
    with open(args.out + ".runs", "a") as fh:
        fh.write(name + "\\n")
    if name == "b":
        os.abort()  # a native crash: no Python handler runs
    if name == "c":
        raise RuntimeError("no kernel for this shape")
    return {"name": name, "value": len(name)}

rows = [journal.run(f"unit/{n}", unit, n, error_row={"name": n}) for n in ("a", "b", "c", "dd")]
json.dump(rows, open(args.out, "w"))
"""


def test_a_native_crash_costs_one_unit_not_the_sweep(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(SWEEP))
    out = tmp_path / "out.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    a, b, c, dd = json.loads(out.read_text())
    assert a == {"name": "a", "value": 1} and dd == {"name": "dd", "value": 2}
    assert b["name"] == "b" and b["error"].startswith("native crash")
    assert c == {"name": "c", "error": "RuntimeError: no kernel for this shape"}
    # "a" ran once: the restarted sweep replayed its recorded figure instead of measuring again
    assert (tmp_path / "out.json.runs").read_text().split() == ["a", "b", "c", "dd"]
    assert not (tmp_path / "out.json.journal").exists()  # removed after the sweep finished


def test_profile_step_prefill_reports_the_traced_prompt_steps(tmp_path):
    """`profile_step.py --prefill`: the traced round's model steps are counted (not the engine's
    last step, which only collects outputs), and the trace's device time lands in the report."""
    out = tmp_path / "prefill.json"
    cmd = [sys.executable, "scripts/profile_step.py", "--model", "tiny", "--prefill"]
    cmd += ["--seqs", "4", "--prompt", "40", "--budget", "64", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rep = json.loads(out.read_text())
    assert rep["mode"] == "prefill" and rep["steps_traced"] == 3  # 160 tokens: 64, 64, 32
    assert rep["prompt_tokens_per_step"] == pytest.approx(4 * 40 / 3)
    assert rep["device_busy_us_per_step"] > 0 and rep["achieved_TFLOPs"] > 0
    assert sum(rep["by_category_us_per_step"].values()) == pytest.approx(
        rep["device_busy_us_per_step"]
    )


def test_ragged_tile_sweep_checks_each_tile_and_times_the_dense_peers(tmp_path):
    """`bench_ragged_tiles.py` at CPU sizes: each tile's error against the f32 reference is a
    bf16 rounding, and cache-free cases also time the dense flash kernels."""
    out = tmp_path / "ragged.json"
    cmd = [sys.executable, "scripts/bench_ragged_tiles.py", "--cases", "2x40x24,2x32x0"]
    cmd += ["--block-rows", "32,64", "--block-k", "16", "--warps", "4", "--stages", "2"]
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    tiles = [r for r in rows if "block_rows" in r]
    assert len(tiles) == 4 and all(0 < r["err"] < 2e-2 and r["us"] > 0 for r in tiles), tiles
    peers = {r["peer"] for r in rows if "peer" in r and r["case"] == "2x32x0"}
    assert peers == {"flash_packed", "flash_batched"}  # cuDNN only on a GPU
    assert not any("peer" in r for r in rows if r["case"] == "2x40x24")  # a cache: no dense peer


def test_throughput_smoke_runs_with_and_without_env_switches(tmp_path):
    """`bench_throughput.py`'s CPU smoke: without `--env` one run in the environment as it is
    (here once more with a request carrying a logit_bias); with it, every workload once per
    switch, keyed by the switches after the first."""
    base = [sys.executable, "scripts/bench_throughput.py", "--model", "tiny"]
    base += ["--workloads", "8x8:2", "--num-pages", "64"]
    plain, switched = tmp_path / "plain.json", tmp_path / "switched.json"
    biased = ["--biased", "0,1"]
    subprocess.run([*base, *biased, "--out", str(plain)], cwd=ROOT, check=True, capture_output=True)
    rows = json.loads(plain.read_text())["workloads"]
    assert list(rows) == ["8x8:2", "8x8:2-biased1"]
    assert rows["8x8:2-biased1"]["requests_with_logit_bias"] == 1
    assert rows["8x8:2-biased1"]["output_tokens"] == rows["8x8:2"]["output_tokens"] == 16
    env = ["--env", "JAXINFER_ROW_GEMV=0,JAXINFER_ROW_GEMV=1"]
    subprocess.run([*base, *env, "--out", str(switched)], cwd=ROOT, check=True, capture_output=True)
    assert list(json.loads(switched.read_text())["workloads"]) == [
        "8x8:2",
        "8x8:2@JAXINFER_ROW_GEMV=1",
    ]
    bad = subprocess.run([*base, "--env", "JAXINFER_ROW_GEMV"], cwd=ROOT, capture_output=True)
    assert bad.returncode != 0 and b"--env takes VAR=VALUE items" in bad.stderr


def test_schedule_replay_counts_the_programs_a_gpu_engine_runs():
    """`replay_schedule.py`: 8 requests of 16 prompt tokens over 8 seats and 4-step programs, one
    prompt step first (each request's first token). 8 tokens each: a program of 4 steps, one of
    3 live steps. 6 of 6 tokens and 2 of 9: a full program; then 1 and 4 tokens left, 14 of 32
    row-steps live, so a single step; then a program for the 2 rows left (3 steps each). The
    log's program row-steps are the engine's own count."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import replay_schedule
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    even = replay_schedule.replay("16x8:8", max_num_seqs=8, budget=128, num_decode_steps=4)
    s = even["summary"]
    assert s["kinds"] == {"prompt": 1, "program": 2} and s["output_tokens"] == 8 * 8
    assert s["program_rows"] == {8: 2} and s["program_row_steps"] == 2 * 4 * 8
    assert s["program_live_row_steps"] == 8 * 7
    assert s["program_row_steps"] == s["engine_decode_row_steps"]
    assert s["program_live_row_steps"] == s["engine_decode_planned_tokens"]
    prompts = [[i + 1] * 16 for i in range(8)]
    requests = [(p, 6) for p in prompts[:6]] + [(p, 9) for p in prompts[6:]]
    mixed = replay_schedule.replay("", 8, 128, 4, requests=requests)
    assert [(x["kind"], x["seqs"], x["live_steps"]) for x in mixed["log"]] == [
        ("prompt", 8, 8),
        ("program", 8, 32),
        ("decode", 8, 8),
        ("program", 2, 6),
    ]
    s = mixed["summary"]
    assert s["program_row_steps"] == s["engine_decode_row_steps"] == 4 * 8 + 4 * 8
    assert s["output_tokens"] == 6 * 6 + 2 * 9


def test_decode_fusions_smoke_times_both_forms_and_checks_them_against_f32(tmp_path):
    """`bench_decode_fusions.py --smoke`: the fused SwiGLU kernel (Mosaic GPU interpreter) and
    XLA's form, alone and in a layer, each layer's error a bf16 rounding of the f32 layer."""
    from pallas_kernels.common import mosaic_gpu_interpreter

    if mosaic_gpu_interpreter() is None:
        pytest.skip("JAX's Mosaic GPU interpreter")
    out = tmp_path / "fusions.json"
    cmd = [sys.executable, "scripts/bench_decode_fusions.py", "--smoke", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rep = json.loads(out.read_text())
    assert [r["cfg"] for r in rep["swiglu_alone"]] == ["xla", [64, 64, 2, 1, 1]]  # fastest first
    assert all(r["us"] > 0 for r in rep["swiglu_alone"])
    assert set(rep["forms"]) == {"xla", "swiglu"}
    for form in rep["forms"].values():
        assert form["us_per_layer"] > 0 and 0 < form["err_x"] < 2e-2 and 0 < form["err_norm"] < 2e-2


def test_filter_sort_bench_checks_both_sorts_and_times_each(tmp_path):
    """`bench_filter_sort.py` at CPU sizes: the uint32 keys give the float sort's order and
    keep-masks on this backend, and every variant gets a time."""
    out = tmp_path / "filter.json"
    cmd = [sys.executable, "scripts/bench_filter_sort.py", "--rows", "2", "--vocab", "300"]
    cmd += ["--check-rows", "8", "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rep = json.loads(out.read_text())
    assert all(v for k, v in rep["checks"].items() if "u32" in k) and len(rep["checks"]) == 22
    assert rep["checks"]["tokens_top_k_only_normal_{'top_k': 50, 'top_p': 0.95}"]
    assert rep["cub"] == {"2": False, "8": False}  # CUB is a GPU's
    (row,) = rep["rows"]
    assert row["rows"] == 2 and all(v > 0 for k, v in row.items() if k != "rows")
