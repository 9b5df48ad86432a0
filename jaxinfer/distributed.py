"""Several hosts: one process per host, all running the same program over one global mesh.

`initialize()` joins this process to the others (`jax.distributed.initialize`) before anything
else touches jax. After it, `jax.devices()` lists every process's devices and a tensor-parallel
mesh (`sharding.make_mesh`) spans them; each process holds and computes only the shards on its
own devices (`jax.local_devices()`), and XLA's collectives cross the hosts (NCCL on GPUs, gloo
on CPUs).

Every process runs the same engine on the same requests: the scheduler is deterministic, so all
of them plan the same steps, place the same host arrays on the global mesh (`sharding.put`, each
process its own devices' copies) and launch the same programs, and every process reads the same
sampled tokens from its own devices (`Runner.collect`). The KV pool is the least that every
process's devices can hold (`agree_min`). Offline batch generation (`LLM`, `python -m jaxinfer
generate`) works so; the servers (`scripts/serve.py`) do not yet: only one process can take
requests, and the others would have to be told of each one, so a server refuses to start as one
of several. The mesh must hold devices of every process (`check_mesh`): tensor parallel over all
of them, not one host's share.

Launching. `initialize()` reads, in order of precedence, its arguments, then

    JAXINFER_COORDINATOR_ADDRESS   host:port of process 0 (it listens there; the others connect)
    JAXINFER_NUM_PROCESSES         how many processes in all
    JAXINFER_PROCESS_ID            this process's number, 0 .. JAXINFER_NUM_PROCESSES - 1

and where none of these is given, jax's own detection of a SLURM, Open MPI or Kubernetes job;
with none of those either it does nothing (one process). `python -m jaxinfer generate` calls it,
and so can any program using `LLM` (before its first jax call).

By hand, two hosts of 8 GPUs each, tensor parallel over all 16:

    # on host a (10.0.0.1)
    JAXINFER_COORDINATOR_ADDRESS=10.0.0.1:5000 JAXINFER_NUM_PROCESSES=2 JAXINFER_PROCESS_ID=0 \
        python my_batch.py            # initialize(); LLM(path, tensor_parallel_size=16)
    # on host b
    JAXINFER_COORDINATOR_ADDRESS=10.0.0.1:5000 JAXINFER_NUM_PROCESSES=2 JAXINFER_PROCESS_ID=1 \
        python my_batch.py

Under SLURM nothing needs setting: jax reads SLURM_NTASKS / SLURM_PROCID and the first node
of the step. jax then gives each task the GPU of its SLURM_LOCALID, so run one task per GPU,
each seeing all of its node's GPUs:

    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 python my_batch.py

Open MPI likewise (`mpirun -np 16 ...`, one rank per GPU). To run one process per host over all
of its GPUs instead, set the three variables in each task (they switch detection off).

As a Kubernetes indexed Job, with a headless service so that pod 0 has a stable host name
(`<job>-0.<service>`); the completion index is the process id:

    apiVersion: v1
    kind: Service
    metadata: {name: jaxinfer}
    spec: {clusterIP: None, publishNotReadyAddresses: true, selector: {job-name: jaxinfer}}
    ---
    apiVersion: batch/v1
    kind: Job
    metadata: {name: jaxinfer}
    spec:
      completionMode: Indexed
      completions: 2
      parallelism: 2
      template:
        spec:
          subdomain: jaxinfer
          restartPolicy: Never
          containers:
          - name: worker
            image: my-jaxinfer-image
            command: ["python", "my_batch.py"]
            env:
            - {name: JAXINFER_COORDINATOR_ADDRESS, value: "jaxinfer-0.jaxinfer:5000"}
            - {name: JAXINFER_NUM_PROCESSES, value: "2"}
            - name: JAXINFER_PROCESS_ID
              valueFrom:
                fieldRef:
                  fieldPath: "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            resources: {limits: {nvidia.com/gpu: 8}}

Every process must see the same model files (a shared volume, or a copy on each host) and pass
the same options and prompts; every process returns the same outputs. jaxinfer's own (orbax)
checkpoints load only where every process has as many devices as the others. On CPUs (tests),
gloo prints a line on stdout for each group of devices it connects.
"""

from __future__ import annotations

import os

from jaxinfer.platform import logger

ADDRESS_ENV = "JAXINFER_COORDINATOR_ADDRESS"
COUNT_ENV = "JAXINFER_NUM_PROCESSES"
ID_ENV = "JAXINFER_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins this process to the others of its job; True if there are several.

    Args (each None: its environment variable, see the module docstring):
      coordinator_address: "host:port" of process 0.
      num_processes: processes in all; 1 (or nothing given, and no cluster found) does nothing.
      process_id: this process's number, in [0, num_processes).
    Raises:
      ValueError: options that do not fit together (an id out of range, no coordinator for
        several processes, an id without a count, a malformed number or address).
    Must run before any other jax call of the process; a second call does nothing.
    """
    import jax

    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    address, count, pid = _options(coordinator_address, num_processes, process_id)
    if address is None and count is None and pid is None:
        return _initialize_detected()
    check_options(address, count, pid)
    if count == 1:
        return False
    if pid == 0:
        _check_port_free(address)
    _use_cpu_collectives()
    # Our options say it all: no cluster detection (under SLURM it would also pin one device).
    try:
        jax.distributed.initialize(address, count, pid, cluster_detection_method="deactivate")
    except RuntimeError as e:  # jax's own error, a traceback's worth, for a port in use too
        raise OSError(
            f"process {pid} of {count} could not join the job at {address} (its port in use, "
            f"or the coordinator out of reach?): {' '.join(str(e).split())[:300]}"
        ) from e
    return True


def _check_port_free(address: str) -> None:
    """OSError if something listens on the coordinator's port already: jax's coordinator then
    fails with a long traceback, or at times crashes the process (a segfault)."""
    import errno
    import socket

    port = int(address.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # not ours to judge (no IPv4, say): jax tries
            raise OSError(
                f"process 0 of the job cannot be the coordinator at {address}: port {port} is "
                "in use (another job's coordinator still running?)"
            ) from None


def requested_processes() -> int:
    """How many processes the environment asks for ($JAXINFER_NUM_PROCESSES, else a detected
    cluster's count, else 1), without joining them."""
    _, count, _ = _options(None, None, None)
    if count is not None:
        return count
    cluster = detected_cluster()
    return 1 if cluster is None else _cluster_count(cluster)


def _options(address, count, pid) -> tuple[str | None, int | None, int | None]:
    """The three options, each from its argument or else its environment variable."""
    return (
        address or os.environ.get(ADDRESS_ENV) or None,
        _number("num_processes", COUNT_ENV, count),
        _number("process_id", ID_ENV, pid),
    )


def _number(name: str, env: str, value) -> int | None:
    """An option's value, or else its environment variable's; ValueError unless an integer."""
    if value is None:
        value = os.environ.get(env) or None
    if value is None:
        return None
    try:
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):  # 10**400 overflows the float
        raise ValueError(f"{name} (${env}) must be an integer, got {value!r}") from None


def check_options(address: str | None, count: int | None, pid: int | None) -> None:
    """ValueError unless the three options describe a job."""
    if count is None:
        raise ValueError(
            f"num_processes (${COUNT_ENV}) is needed with a coordinator address or process id"
        )
    if count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}")
    if count == 1:
        if pid not in (None, 0):
            raise ValueError(f"process_id {pid} is out of range for 1 process: use 0")
        return
    if address is None:
        raise ValueError(
            f"{count} processes need a coordinator address (${ADDRESS_ENV}, host:port of process 0)"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:  # a bad one hangs the job
        raise ValueError(f"coordinator address {address!r} is not host:port (port 1-65535)")
    if pid is None:
        raise ValueError(f"{count} processes need this one's process_id (${ID_ENV})")
    if not 0 <= pid < count:
        raise ValueError(
            f"process_id {pid} is out of range for {count} processes: 0 .. {count - 1}"
        )


def detected_cluster():
    """The cluster environment (SLURM, Open MPI, Kubernetes, Cloud TPU) that jax's own
    auto-detection finds this process in, or None."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # jax moved it: no auto-detection
        return None
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env
    return None


def _initialize_detected() -> bool:
    """jax's auto-detected initialize where a cluster of several processes is found. A job of
    one process is left alone: under SLURM jax would also pin it to one device."""
    import jax

    cluster = detected_cluster()
    if cluster is None or _cluster_count(cluster) <= 1:
        return False
    _use_cpu_collectives()
    jax.distributed.initialize()
    return True


def _cluster_count(cluster) -> int:
    """The processes of a detected cluster's job; 1 where it cannot say."""
    try:
        return int(cluster.get_process_count())
    except Exception as e:  # noqa: BLE001 - e.g. a Kubernetes pod that no Job owns
        logger.warning(
            "found a %s environment but not its process count (%s): running as one process; "
            "set $%s, $%s and $%s to join several",
            cluster.__name__,
            e,
            ADDRESS_ENV,
            COUNT_ENV,
            ID_ENV,
        )
        return 1


def _use_cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo (a no-op for GPUs); must be set
    before the CPU backend starts."""
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# -- after initialize -----------------------------------------------------------------------------


def local_devices(devices) -> list:
    """Those of `devices` that this process holds (all of them with one process)."""
    import jax

    return [d for d in devices if d.process_index == jax.process_index()]


def agree_min(value: int) -> int:
    """The least of every process's `value` (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def check_mesh(mesh) -> None:
    """ValueError unless, with several processes, `mesh` holds devices of every one of them
    (a process without any would have nothing to compute and no tokens to read)."""
    import jax

    n = jax.process_count()
    if n == 1:
        return
    devices = [] if mesh is None else list(mesh.devices.flat)
    held = {d.process_index for d in devices}
    if len(held) < n:
        total = len(jax.devices())
        raise ValueError(
            f"with {n} processes the model must be split over devices of each of them: "
            f"tensor_parallel_size {len(devices) or 1} uses the devices of {len(held) or 1}; "
            f"use tensor_parallel_size={total} (every device of the {n} processes)"
        )
