"""The README's code runs as written: its Python examples, in order, in a fresh interpreter (the
default model, the device's default sizes), and its two commands are the ones CI runs."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run(tmp_path):
    blocks = python_blocks(README)
    assert len(blocks) >= 3
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env["JAXINFER_COMPILATION_CACHE"] = str(tmp_path / "xla")
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout  # the greedy answer to "The capital of France is"
    assert "running on 1 x" in out.stderr  # the device line


def test_readme_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    main = 'bash scripts/setup.sh && .venv/bin/python -m jaxinfer generate --chat "What is the capital of France?"'
    tests = "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q -n 2 tests"
    for command in (main, tests):
        assert f"    {command}\n" in README
        assert command in ci
