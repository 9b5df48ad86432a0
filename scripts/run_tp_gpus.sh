#!/usr/bin/env bash
# The tensor-parallel runs on a host of several GPUs, ready to go (one command per figure; each
# writes its JSON and log under $OUT). Usage, on a machine of 2, 4 or 8 GPUs:
#
#     OUT=/tmp/out bash scripts/run_tp_gpus.sh 2        # the runs for two GPUs
#     OUT=/tmp/out bash scripts/run_tp_gpus.sh 8        # for eight: 70B and Mixtral at N = 4 and 8
#
# Each model shape is random bf16 weights; every engine figure has the one-device or the
# data-parallel peer beside it in the same call, and profile_step's "collective" category is the
# all-reduce time per step, measured.
set -uo pipefail
GPUS=${1:?number of GPUs}
OUT=${OUT:?set OUT}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' A-Z' '-a-z')

run() {  # name, command...: one log per run; a failure is logged and the next run goes on
  local name=$1; shift
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1 || echo "   failed (rc $?): see $name.log"
  tail -4 "$OUT/$name.log"
}

sizes() {  # the tensor-parallel sizes to run: 1 and every power of two up to the GPUs
  local n=1
  while [ "$n" -le "$GPUS" ]; do echo "$n"; n=$((n * 2)); done
}

# Correctness first: the sharded engine's tokens against one device's.
for n in $(sizes); do
  [ "$n" -gt 1 ] && run "check-llama3-8b-tp$n" python scripts/check_sharded.py \
    --model llama3-8b --layers 4 --tensor-parallel-size "$n"
done
run "check-mixtral-tp$GPUS-expert" python scripts/check_sharded.py --model mixtral-8x7b \
  --layers 2 --tensor-parallel-size "$GPUS" --moe-parallel expert
run "check-mixtral-tp$GPUS-ffn" python scripts/check_sharded.py --model mixtral-8x7b \
  --layers 2 --tensor-parallel-size "$GPUS" --moe-parallel ffn

# Llama-2-7B: batch-1 and batch-256 steps with the all-reduce time, throughput at each N, and
# data-parallel replicas against tensor parallelism on the same work.
for n in $(sizes); do
  for seqs in 1 256; do
    run "profile-llama2-7b-b$seqs-tp$n-$card" python scripts/profile_step.py --model llama2-7b \
      --seqs "$seqs" --prompt 200 --tensor-parallel-size "$n" \
      --out "$OUT/profile-llama2-7b-b$seqs-tp$n-$card.json"
  done
  run "throughput-llama2-7b-tp$n-$card" python scripts/bench_throughput.py --model llama2-7b \
    --workloads 128x128:1000 --tensor-parallel-size "$n" \
    --out "$OUT/throughput-llama2-7b-tp$n-$card.json"
done
run "throughput-llama2-7b-dp$GPUS-$card" python scripts/bench_throughput.py --model llama2-7b \
  --workloads 128x128:1000 --data-parallel-size "$GPUS" \
  --out "$OUT/throughput-llama2-7b-dp$GPUS-$card.json"

# A 70B shape over every GPU (N >= 2): decode steps against one GPU's share of the bytes.
if [ "$GPUS" -ge 2 ]; then
  for seqs in 1 32; do
    run "profile-llama3-70b-b$seqs-tp$GPUS-$card" python scripts/profile_step.py \
      --model llama3-70b --seqs "$seqs" --prompt 200 --tensor-parallel-size "$GPUS" \
      --out "$OUT/profile-llama3-70b-b$seqs-tp$GPUS-$card.json"
  done
  run "throughput-llama3-70b-tp$GPUS-$card" python scripts/bench_throughput.py \
    --model llama3-70b --workloads 128x128:1000,1000x1000:200 --tensor-parallel-size "$GPUS" \
    --out "$OUT/throughput-llama3-70b-tp$GPUS-$card.json"
  for moe in expert ffn; do
    run "throughput-mixtral-tp$GPUS-$moe-$card" python scripts/bench_throughput.py \
      --model mixtral-8x7b --workloads 128x128:500 --tensor-parallel-size "$GPUS" \
      --moe-parallel "$moe" --out "$OUT/throughput-mixtral-tp$GPUS-$moe-$card.json"
  done
fi
