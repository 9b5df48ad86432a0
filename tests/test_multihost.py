"""Several hosts, played by processes on this machine: two processes of 2 CPU devices each join
through `jaxinfer.distributed` (gloo collectives) and run `LLM` tensor parallel over all 4
devices; both return the tokens one process returns alone.

Run as a script, this file is one such process:
    python tests/test_multihost.py PROCESS_ID NUM_PROCESSES COORDINATOR TENSOR_PARALLEL_SIZE
printing its outputs' token ids as one JSON line.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # a stuck collective would hang forever: each process is killed past this
PROMPTS = [[5, 17, 42, 8, 99, 3], [250, 11], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 30]]


def tiny_model():
    """The same random Llama in every process: 4 query heads, 2 kv heads (repeated over 4
    devices), vocab 320 (split by 4)."""
    import jax.numpy as jnp

    from jaxinfer import Model, ModelConfig, init_params

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    return Model(cfg, init_params(cfg, "float32", seed=3), None, jnp.float32, "xla")


def worker(
    process_id: int, num_processes: int, address: str, tensor_parallel_size: int, *paths: str
):
    """One process: greedy and seeded-sampled outputs of PROMPTS, as token id lists. With
    `paths` (an HF directory, a new directory): the model loaded from the first, saved into the
    second as a jaxinfer checkpoint, and loaded back from it: both models' outputs."""
    from jaxinfer import distributed

    distributed.initialize(address, num_processes, process_id)
    from jaxinfer import LLM, SamplingParams, load_model, save_checkpoint

    options = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    if num_processes > 1 and not paths:
        check_partial_mesh_refused(options)
    tp = tensor_parallel_size
    if paths:
        loaded = load_model(paths[0], dtype="float32", tensor_parallel_size=tp)
        save_checkpoint(loaded, paths[1])
        models = [loaded, load_model(paths[1], dtype="float32", tensor_parallel_size=tp)]
    else:
        models = [tiny_model()]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    tokens = []
    for model in models:
        # The pool: every seat at full length (a CPU's default), the least of the processes'.
        llm = LLM(model=model, tensor_parallel_size=tp, **options)
        params = [greedy] * len(PROMPTS) + [sampled]
        outs = llm.generate(PROMPTS + PROMPTS[:1], params, use_tqdm=False)
        tokens += [o.token_ids for o in outs]
    return tokens


def check_partial_mesh_refused(options: dict) -> None:
    """A mesh over one process's devices only leaves the other with nothing to run."""
    from jaxinfer import LLM

    try:
        LLM(model=tiny_model(), tensor_parallel_size=2, **options)
    except ValueError as e:
        assert "tensor_parallel_size=4" in str(e), e
    else:
        raise AssertionError("tensor_parallel_size 2 over 2 processes of 2 devices was accepted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(devices: int, *args) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAXINFER_COMPILATION_CACHE="",
        JAXINFER_LOG_LEVEL="WARNING",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),  # this checkout
    )
    for name in ("JAXINFER_COORDINATOR_ADDRESS", "JAXINFER_NUM_PROCESSES", "JAXINFER_PROCESS_ID"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, __file__, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen, name: str) -> list:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{name} did not finish in {TIMEOUT_S} s:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def two_and_one(paths=(), alone_paths=()) -> tuple[list, list, list]:
    """The outputs of two processes of 2 devices (tensor parallel 4) and of one process alone."""
    address = f"127.0.0.1:{free_port()}"
    procs = [spawn(2, pid, 2, address, 4, *paths) for pid in (0, 1)]
    alone = spawn(4, 0, 1, "-", 1, *alone_paths)
    try:
        first, second = (result(p, f"process {i}") for i, p in enumerate(procs))
        return first, second, result(alone, "the one-process run")
    finally:
        for p in procs + [alone]:
            if p.poll() is None:
                p.kill()


def test_two_processes_equal_one():
    first, second, reference = two_and_one()
    assert first == second  # sampled outputs too: every process draws the same tokens
    n = len(PROMPTS)
    assert first[:n] == reference[:n]  # greedy: as on one device
    assert all(len(ids) == 8 for ids in first)


def test_two_processes_load_an_hf_directory_save_and_load_again(tmp_path):
    """Safetensors (memory-mapped) placed shard by shard by each process; a checkpoint saved
    by both and read back by both; as one process reads the HF directory."""
    from conftest import build_hf_model

    hf = tmp_path / "hf"
    build_hf_model("llama3", hf)
    first, second, reference = two_and_one((hf, tmp_path / "ours"), (hf, tmp_path / "alone"))
    n = len(PROMPTS) + 1
    assert first == second and first[:n] == first[n:]  # the saved checkpoint: the same model
    assert first[: n - 1] == reference[: n - 1]  # greedy: as on one device
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["jaxinfer.json", "params"]


if __name__ == "__main__":
    pid, count, address, tp, *paths = sys.argv[1:]
    tokens = worker(int(pid), int(count), None if address == "-" else address, int(tp), *paths)
    print(json.dumps(tokens), flush=True)


# -- the options, without starting anything -------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_processes=2, process_id=0), "need a coordinator address"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "out of range"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "out of range"),
        (dict(coordinator_address="h:1", num_processes=2), "need this one's process_id"),
        (dict(coordinator_address="h:1", process_id=0), "num_processes"),
        (dict(coordinator_address="h", num_processes=2, process_id=0), "not host:port"),
        (dict(num_processes=0), "must be >= 1"),
        (dict(num_processes=1, process_id=1), "out of range for 1 process"),
        (dict(num_processes="two"), "must be an integer"),
        (dict(num_processes=10**400), "must be an integer"),  # an OverflowError traceback
        # ports past 65535 were taken, and the processes then waited for each other for ever
        (dict(coordinator_address="h:65536", num_processes=2, process_id=0), "port 1-65535"),
        (dict(coordinator_address="h:0", num_processes=2, process_id=0), "port 1-65535"),
    ],
)
def test_inconsistent_options_are_refused(options, message, monkeypatch):
    from jaxinfer import distributed

    for name in (distributed.ADDRESS_ENV, distributed.COUNT_ENV, distributed.ID_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**options)


def test_environment_variables_are_read(monkeypatch):
    from jaxinfer import distributed

    monkeypatch.setenv(distributed.ADDRESS_ENV, "10.0.0.1:5000")
    monkeypatch.setenv(distributed.COUNT_ENV, "2")
    monkeypatch.setenv(distributed.ID_ENV, "7")
    with pytest.raises(ValueError, match="process_id 7 is out of range for 2 processes"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ID_ENV, "x")
    with pytest.raises(
        ValueError, match=r"process_id \(\$JAXINFER_PROCESS_ID\) must be an integer"
    ):
        distributed.initialize()


def test_one_process_does_nothing(monkeypatch):
    import jax

    from jaxinfer import distributed

    for name in (distributed.ADDRESS_ENV, distributed.COUNT_ENV, distributed.ID_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("called"))
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False


class OneTaskJob:
    """A SLURM step of one task, as jax's cluster detection sees it."""

    @staticmethod
    def get_process_count():
        return 1


class PodOfNoJob:
    """A Kubernetes pod that no Job owns (a Deployment's)."""

    @staticmethod
    def get_process_count():
        raise KeyError("job-name")


@pytest.mark.parametrize("cluster", [OneTaskJob, PodOfNoJob])
def test_a_cluster_of_one_process_is_left_alone(cluster, monkeypatch):
    import jax

    from jaxinfer import distributed

    for name in (distributed.ADDRESS_ENV, distributed.COUNT_ENV, distributed.ID_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("called"))
    monkeypatch.setattr(distributed, "detected_cluster", lambda: cluster)
    assert distributed.initialize() is False


def test_a_job_that_cannot_be_joined_is_an_oserror(monkeypatch):
    """jax's RuntimeError (a port in use: "Failed to start RPC server") becomes an OSError that
    names the address, which the CLI prints as one line."""
    import jax

    from jaxinfer import distributed

    def refuse(*args, **kwargs):
        raise RuntimeError("UNKNOWN: Failed to start RPC server")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    monkeypatch.setattr(distributed, "_use_cpu_collectives", lambda: None)
    with pytest.raises(OSError, match=r"could not join the job at h:1 .*Failed to start RPC"):
        distributed.initialize(coordinator_address="h:1", num_processes=2, process_id=0)


def test_a_coordinator_port_in_use_is_named_before_jax_tries(monkeypatch):
    """Process 0 checks the port first: jax's coordinator on a port in use had crashed the
    process at times (a segfault) rather than raising."""
    import socket

    import jax

    from jaxinfer import distributed

    def never(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize was called")

    monkeypatch.setattr(jax.distributed, "initialize", never)
    monkeypatch.setattr(distributed, "_use_cpu_collectives", lambda: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=rf"coordinator at 127.0.0.1:{port}: port {port} is in use"
        ):
            distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=0)
