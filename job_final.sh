#!/bin/bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
t0=$(date +%s)
timeout 100 python scripts/profile_step.py --model llama3-8b --seqs 256 --prompt 200 --max-num-seqs 512 --limits --top 8 --out $OUT/profile-llama3-8b-b256-row-gemv-nvidia-h200.json > /tmp/p256.log 2>&1
echo "== b256 rc=$? $(( $(date +%s) - t0 )) s"; grep -A3 "engine step" /tmp/p256.log | head -4
t0=$(date +%s)
timeout 330 python scripts/bench_generate.py --models llama3-8b --batches 1,8,64 --impls pallas --repeats 3 --out $OUT/generate-llama3-8b-row-gemv-nvidia-h200.json > /tmp/gen.log 2>&1
echo "== generate rc=$? $(( $(date +%s) - t0 )) s"; tail -25 /tmp/gen.log
