"""Tensor and expert parallelism: the device mesh, the one rules table, and placement.

The model code is single-device code whose parameters name logical axes (`layers.declare`).
This module maps those names onto a one-axis mesh ("model") in the Megatron layout:

    q/k/v (fused, per kv head)  split by kv heads     o      split by heads (rows)
    gate/up                     split by F (columns)  down   split by F (rows)
    embedding, LM head          split by vocab        norms, router: replicated
    experts                     split by expert ("expert" parallel) or by F ("ffn")

so each layer needs two all-reduces (after o and after down) and no weight ever moves. XLA's
SPMD partitioner turns the single-device program into the per-device one (`jax.jit` over
sharded arguments); the Pallas kernels and the MoE dispatch run on each device's shard through
`shard_map` (see `attention.py`, `models/moe.py`). A dimension that the mesh does not divide is
replicated rather than padded.

KV pages are split by kv heads. With fewer kv heads than devices (Llama-3-8B's 8 at 16), the
pool holds `tp` head slots and each kv head is repeated on the tp / K devices whose query heads
read it (as vLLM replicates them); the q/k/v projection is then replicated too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.validate import as_int

MODEL = "model"  # the mesh axis that tensor and expert parallelism split
MOE_MODES = ("expert", "ffn")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a model is split: the mesh (None: one device, no sharding) and the MoE layout."""

    mesh: Mesh | None = None
    moe: str = "expert"  # "expert": each device owns E / N experts; "ffn": each expert's F split

    def __post_init__(self):
        if self.moe not in MOE_MODES:
            raise ValueError(f"moe parallelism {self.moe!r} is not one of {MOE_MODES}")

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[MODEL]


def check_tensor_parallel(cfg: ModelConfig, size: int, num_devices: int | None = None) -> None:
    """ValueError unless `size` devices can split `cfg`: it must divide the query heads, and the
    kv heads must divide it or it them; there must be that many devices."""
    as_int("tensor_parallel_size", size, 1)
    n, k = cfg.num_heads, cfg.num_kv_heads
    ok = [d for d in range(1, n + 1) if n % d == 0 and (k % d == 0 or d % k == 0)]
    if size not in ok:
        raise ValueError(
            f"tensor_parallel_size {size} does not split this model's {n} query heads and {k} "
            f"kv heads evenly: use one of {ok}"
        )
    num_devices = len(jax.devices()) if num_devices is None else num_devices
    if size > num_devices:
        fits = [d for d in ok if d <= num_devices]
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} devices but {num_devices} exist: "
            f"use one of {fits}"
        )


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A one-axis ("model") mesh over the first `tensor_parallel_size` of `devices` (default:
    all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} devices "
            f"but {len(devices)} exist"
        )
    return Mesh(np.asarray(devices[:tensor_parallel_size]), (MODEL,))


def parallel_for(
    cfg: ModelConfig, tensor_parallel_size: int = 1, moe: str = "expert", devices=None
) -> Parallel:
    """Checks the size against the model and the devices; size 1 is no mesh at all."""
    devices = list(jax.devices() if devices is None else devices)
    check_tensor_parallel(cfg, tensor_parallel_size, len(devices))
    e, f, n = cfg.num_experts, cfg.moe_intermediate_size, tensor_parallel_size
    if e and moe == "expert" and e % n:
        other = "moe='ffn', or " if not f % n else ""  # advice only where it would work
        raise ValueError(
            f"expert parallelism over {n} devices needs the {e} experts to divide evenly: "
            f"use {other}a size that divides the experts"
        )
    if e and moe == "ffn" and f % n:
        other = "moe='expert', or " if not e % n else ""
        raise ValueError(
            f"moe='ffn' over {n} devices needs the experts' width {f} to divide evenly: "
            f"use {other}a size that divides it"
        )
    if tensor_parallel_size == 1:
        return Parallel(None, moe)
    return Parallel(make_mesh(tensor_parallel_size, devices), moe)


# -- the rules table ------------------------------------------------------------------------------


def rules(cfg: ModelConfig, size: int, moe: str = "expert") -> dict[str, str | None]:
    """Logical axis name -> mesh axis (None: replicated). Every declared axis name is here."""
    kv_split = cfg.num_kv_heads % size == 0
    return {
        "vocab": MODEL,
        "embed": None,
        "heads": MODEL,
        "kv_heads": MODEL if kv_split else None,  # else replicated: see the module docstring
        "qkv": None,
        "head_dim": None,
        "mlp": MODEL,
        "gate_up": None,
        "router": None,
        "experts": MODEL if moe == "expert" else None,
        "expert_mlp": None if moe == "expert" else MODEL,
    }


def spec_for(
    axes: tuple[str | None, ...], shape: tuple[int, ...], table: dict, size: int
) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axes; a dimension the mesh does not
    divide is replicated."""
    out = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        mesh_axis = table.get(name) if name is not None else None
        out.append(mesh_axis if mesh_axis is not None and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_specs(cfg: ModelConfig, shapes: Any, axes: Any, size: int, moe: str = "expert") -> Any:
    """PartitionSpecs of the params pytree (shapes: ShapeDtypeStructs, axes: logical specs)."""
    table = rules(cfg, size, moe)
    return jax.tree.map(
        lambda s, a: spec_for(tuple(a), s.shape, table, size),
        shapes,
        axes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_shardings(cfg: ModelConfig, dtype, parallel: Parallel) -> Any:
    """NamedShardings of the params of `cfg` under `parallel.mesh` (no memory used)."""
    from jaxinfer.model import abstract_params

    shapes, axes = abstract_params(cfg, dtype)
    specs = param_specs(cfg, shapes, axes, parallel.size, parallel.moe)
    return jax.tree.map(
        lambda s: NamedSharding(parallel.mesh, s),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def load_shardings(cfg: ModelConfig, dtype, parallel: Parallel) -> Any:
    """Where each param of `cfg` is loaded: its NamedSharding over `parallel.mesh`, or without
    a mesh the default device (`pallas_kernels.common.default_device`)."""
    if parallel.mesh is not None:
        return param_shardings(cfg, dtype, parallel)
    from jaxinfer.model import abstract_params

    device = one_device()
    return jax.tree.map(lambda _: device, abstract_params(cfg, dtype)[0])


def place_params(params: Any, cfg: ModelConfig, parallel: Parallel) -> Any:
    """Params moved onto their shardings (`load_shardings`: without a mesh, the default
    device)."""
    dtype = jax.tree.leaves(params)[0].dtype
    shardings = load_shardings(cfg, dtype, parallel)
    if parallel.mesh is not None and parallel.mesh.is_multi_process:  # see `put`
        return jax.tree.map(put, params, shardings)
    return jax.device_put(params, shardings)


def put(x, sharding):
    """`jax.device_put(x, sharding)` of an array that every process holds alike (host data, or
    an array on one of this process's devices). Over a mesh of several processes each process
    puts only its own devices' shards, taken from its copy: device_put would first compare the
    copies across the processes (an all-gather of the data each call), and refuses an array
    committed to one device."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(
        np.shape(x), sharding, lambda index: x[index], dtype=x.dtype
    )


def put_tree(tree: Any, sharding) -> Any:
    """`put` of every array of `tree` onto one sharding (one transfer with one process)."""
    if sharding is None or sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: put(x, sharding), tree)


# -- the KV pool ----------------------------------------------------------------------------------


def kv_pool_heads(cfg: ModelConfig, size: int) -> int:
    """Head slots of a page pool: the kv heads, or `size` when each is repeated (K < size)."""
    return max(cfg.num_kv_heads, size)


def kv_spec() -> PartitionSpec:
    """A page pool [K, P, L, H] (or a contiguous cache [K, B, S, H]) split by kv heads."""
    return PartitionSpec(MODEL, None, None, None)


def kv_sharding(parallel: Parallel) -> jax.sharding.Sharding:
    return one_device() if parallel.mesh is None else NamedSharding(parallel.mesh, kv_spec())


def one_device() -> jax.sharding.SingleDeviceSharding:
    """The default device (`pallas_kernels.common.default_device`) as a sharding. Arrays put
    on it are committed, as every jitted program's outputs are: an engine's inputs must be
    too, or a program compiled for the uncommitted pool or batch compiles again when it first
    gets the committed ones (with several devices; one device keys both alike)."""
    from pallas_kernels.common import default_device

    return jax.sharding.SingleDeviceSharding(default_device())


# -- per-device bytes -----------------------------------------------------------------------------


def shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec, size: int) -> int:
    """Bytes one device holds of an array of `shape` under `spec` on a mesh of `size`."""
    local = [d // size if i < len(spec) and spec[i] is not None else d for i, d in enumerate(shape)]
    return math.prod(local) * np.dtype(dtype).itemsize


def weight_bytes_per_device(cfg: ModelConfig, dtype, size: int, moe: str = "expert") -> int:
    """Weight bytes on each device at tensor-parallel `size`, from the declarations alone."""
    from jaxinfer.model import abstract_params

    shapes, axes = abstract_params(cfg, dtype)
    specs = param_specs(cfg, shapes, axes, size, moe)
    leaves = zip(
        jax.tree.leaves(shapes),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
    )
    return sum(shard_bytes(s.shape, s.dtype, p, size) for s, p in leaves)


def kv_bytes_per_token_per_device(cfg: ModelConfig, dtype, size: int) -> int:
    """KV cache bytes one token costs each device (all layers, k and v)."""
    from jaxinfer.kv_cache import page_bytes

    heads = kv_pool_heads(cfg, size) // size
    return page_bytes(cfg.num_layers, heads, cfg.head_dim, 1, dtype)


# -- models ---------------------------------------------------------------------------------------


def resolve_parallel(
    cfg: ModelConfig,
    tensor_parallel_size: int | None = None,
    mesh: Mesh | None = None,
    moe: str = "expert",
) -> Parallel:
    """A Parallel from a size (over the first devices) or a mesh with a "model" axis (kept even
    with one device: a data-parallel replica lives on a device of its own)."""
    if mesh is None:
        return parallel_for(cfg, 1 if tensor_parallel_size is None else tensor_parallel_size, moe)
    if MODEL not in mesh.shape or len(mesh.shape) != 1:
        raise ValueError(f"the mesh must have the one axis {MODEL!r}, got axes {mesh.axis_names}")
    size = mesh.shape[MODEL]
    if tensor_parallel_size not in (None, size):
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} differs from the mesh's size {size}"
        )
    parallel_for(cfg, size, moe, devices=list(mesh.devices.flat))
    return Parallel(mesh, moe)


def shard_model(model, tensor_parallel_size: int | None = None, *, mesh=None, moe="expert"):
    """`model` with its params placed over a mesh (a new Model; size 1 and no mesh: on the
    default device)."""
    parallel = resolve_parallel(model.config, tensor_parallel_size, mesh, moe)
    if parallel == model.parallel:
        return model
    params = place_params(model.params, model.config, parallel)
    return dataclasses.replace(model, params=params, parallel=parallel)


def replica_meshes(tensor_parallel_size: int, data_parallel_size: int, devices=None) -> list[Mesh]:
    """One mesh of `tensor_parallel_size` devices per data-parallel replica, in device order;
    ValueError where the devices do not suffice."""
    devices = list(jax.devices() if devices is None else devices)
    as_int("data_parallel_size", data_parallel_size, 1)
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} needs that many devices but "
            f"{len(devices)} exist"
        )
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ValueError(
            f"data_parallel_size {data_parallel_size} x tensor_parallel_size "
            f"{tensor_parallel_size} needs {need} devices but {len(devices)} exist: use "
            f"data_parallel_size <= {len(devices) // tensor_parallel_size}"
        )
    return [
        make_mesh(tensor_parallel_size, devices[r * tensor_parallel_size :])
        for r in range(data_parallel_size)
    ]
