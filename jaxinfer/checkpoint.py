"""Checkpoints in, params out: HF safetensors directories, GGUF files, and jaxinfer's own (orbax).

Every source is turned into HF-named tensors first, none read yet (`LazyTensor`); one table
(`hf_layout`) says, for each of our params, which HF tensors it comes from, their shapes, and how
to lay them out. A missing, extra or mis-shaped tensor is an error naming the tensor and both
shapes, raised before any tensor is read.

Loading at scale: the config comes first, so a parallel layout that cannot split the model fails
before any weight is read. Then one param at a time: its tensors are read (memory-mapped:
safetensors and GGUF files are never read into memory whole), gathered with numpy into one host
array (a view of the file where one tensor suffices), put on the devices split as the param will
be, transposed into our layout and cast to the model's dtype there (each device its own shard,
onto `sharding.load_shardings`), and dropped from the host before the next param is read. Host
memory beyond the placed params stays within about one param (GGUF: plus its float32 decoding).
Orbax checkpoints restore each shard onto its device directly, cast as they are read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.model import Model, abstract_params, resolve_dtype
from jaxinfer.platform import logger
from jaxinfer.sharding import Parallel, load_shardings, resolve_parallel
from jaxinfer.validate import as_token_ids

FORMAT_FILE = "jaxinfer.json"
FORMAT_VERSION = 3  # 2: fused qkv and gate_up params; 3: qkv and o stored [out..., in...]
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# HF names that carry no weights of ours (derived buffers some checkpoints include).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# Each build lays the HF tensors `xs` (numpy; linear weights [out, in]) out with our param's
# axes in another order, `pre`, and says which: the param is `pre.transpose(perm)`. `pre` is a
# view of the file where it can be, else one contiguous copy; the transpose runs on the devices
# (`_place`), where it is fast and each device transposes only its own shard.


def _copy(xs, shape):
    return xs[0].reshape(shape), _same(shape)


def _linear(xs, shape):  # HF [out, in] -> ours [...in, ...out]
    k = next(k for k in range(len(shape) + 1) if math.prod(shape[:k]) == xs[0].shape[1])
    n = len(shape)  # ours[:k] are the in axes; pre is [...out, ...in]
    return xs[0].reshape(shape[k:] + shape[:k]), tuple(range(n - k, n)) + tuple(range(n - k))


def _qkv(xs, shape):  # [K, G + 2, H, D]: each kv head's G query heads, then its k and v
    k, c, h, d = shape
    return np.concatenate([x.reshape(k, -1, h, d) for x in xs], axis=1), _same(shape)


def _qkv_bias(xs, shape):  # [K, G + 2, H]
    k, c, h = shape
    return np.concatenate([x.reshape(k, -1, h) for x in xs], axis=1), _same(shape)


def _gate_up(xs, shape):  # HF gate, up [F, D] -> [2, F, D] -> ours [D, 2, F]
    return np.stack(xs), (2, 0, 1)


def _same(shape):
    return tuple(range(len(shape)))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One param: its place in our tree, the HF tensors (name, shape) it is built from, and how."""

    path: tuple[str, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    build: Callable  # (HF arrays, our shape) -> (pre, perm): our param is pre.transpose(perm)


def hf_layout(cfg: ModelConfig) -> list[Entry]:
    d, v = cfg.hidden_size, cfg.vocab_size
    entries = [
        Entry(("embed",), (("model.embed_tokens.weight", (v, d)),), _copy),
        Entry(("final_norm", "scale"), (("model.norm.weight", (d,)),), _copy),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(Entry(("lm_head",), (("lm_head.weight", (v, d)),), _linear))
    for i in range(cfg.num_layers):
        entries += _layer_layout(cfg, i)
    return entries


def _layer_layout(cfg: ModelConfig, i: int) -> list[Entry]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ours, hf = f"layers_{i}", f"model.layers.{i}"
    attn = f"{hf}.self_attn"
    qkv = tuple((f"{attn}.{x}_proj.weight", (n, d)) for x, n in (("q", nh), ("k", kh), ("v", kh)))
    entries = [
        Entry((ours, "attn_norm", "scale"), ((f"{hf}.input_layernorm.weight", (d,)),), _copy),
        Entry(
            (ours, "mlp_norm", "scale"), ((f"{hf}.post_attention_layernorm.weight", (d,)),), _copy
        ),
        Entry((ours, "attn", "qkv"), qkv, _qkv),
        Entry((ours, "attn", "o"), ((f"{attn}.o_proj.weight", (d, nh)),), _copy),  # [D, N, H]
    ]
    if cfg.num_experts:
        entries += _moe_layout(cfg, ours, hf)
    else:
        entries += _mlp_layout((ours, "mlp"), f"{hf}.mlp", d, f)
    if cfg.qkv_bias:
        bias = tuple((f"{attn}.{x}_proj.bias", (n,)) for x, n in (("q", nh), ("k", kh), ("v", kh)))
        entries.append(Entry((ours, "attn", "qkv_bias"), bias, _qkv_bias))
    if cfg.o_bias:
        entries.append(Entry((ours, "attn", "o_bias"), ((f"{attn}.o_proj.bias", (d,)),), _copy))
    if cfg.qk_norm:
        entries += [
            Entry(
                (ours, "attn", f"{x}_norm", "scale"),
                ((f"{attn}.{x}_norm.weight", (cfg.head_dim,)),),
                _copy,
            )
            for x in "qk"
        ]
    return entries


def _mlp_layout(ours: tuple[str, ...], hf: str, d: int, f: int) -> list[Entry]:
    return [
        Entry(
            (*ours, "gate_up"),
            ((f"{hf}.gate_proj.weight", (f, d)), (f"{hf}.up_proj.weight", (f, d))),
            _gate_up,
        ),
        Entry((*ours, "down"), ((f"{hf}.down_proj.weight", (d, f)),), _linear),
    ]


def _moe_layout(cfg: ModelConfig, ours: str, hf: str) -> list[Entry]:
    """Mixtral's block_sparse_moe.experts.j.w1/w3/w2, or Qwen2/3-MoE's mlp.experts.j.*_proj."""
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    if cfg.model_type == "mixtral":
        base, gate, up, down = f"{hf}.block_sparse_moe", "w1", "w3", "w2"
    else:
        base, gate, up, down = f"{hf}.mlp", "gate_proj", "up_proj", "down_proj"
    expert = lambda j, w, shape: (f"{base}.experts.{j}.{w}.weight", shape)
    entries = [
        Entry((ours, "moe", "router"), ((f"{base}.gate.weight", (e, d)),), _linear),
        Entry(
            (ours, "moe", "gate_up"),
            tuple(expert(j, gate, (f, d)) for j in range(e))
            + tuple(expert(j, up, (f, d)) for j in range(e)),
            _experts_gate_up,
        ),
        Entry(
            (ours, "moe", "down"), tuple(expert(j, down, (d, f)) for j in range(e)), _experts_down
        ),
    ]
    if cfg.shared_expert_intermediate_size:
        entries += _mlp_layout(
            (ours, "moe", "shared"), f"{base}.shared_expert", d, cfg.shared_expert_intermediate_size
        )
        entries.append(
            Entry(
                (ours, "moe", "shared_gate"),
                ((f"{base}.shared_expert_gate.weight", (1, d)),),
                _copy,
            )
        )
    return entries


def _experts_gate_up(xs, shape):  # E gate [F, D], E up [F, D] -> [2, E, F, D] -> [E, D, 2, F]
    e, d, _, f = shape
    return np.stack(xs).reshape(2, e, f, d), (1, 3, 0, 2)


def _experts_down(xs, shape):  # E of [D, F] -> [E, D, F] -> ours [E, F, D]
    return np.stack(xs), (0, 2, 1)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """An HF tensor not read yet: its shape, and `read()` -> a numpy array (a memory map or a
    decoded copy), called only when the param it belongs to is built."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def params_from_hf(
    cfg: ModelConfig, tensors: Mapping[str, Any], dtype, shardings: Any = None
) -> dict:
    """HF-named tensors -> our params pytree in `dtype`, every name and shape checked first.

    tensors: arrays, or `LazyTensor`s read one param at a time. shardings: a pytree like the
    params (`sharding.load_shardings`); None: the default device. Each param is gathered on the
    host, placed on its devices, laid out and cast there, and dropped from the host before the
    next one is read.
    """
    dtype = resolve_dtype(dtype)
    layout = hf_layout(cfg)
    _check_names(cfg, layout, tensors)
    _check_shapes(layout, tensors)
    shapes, _ = abstract_params(cfg, dtype)
    if shardings is None:
        shardings = load_shardings(cfg, dtype, Parallel())
    params: dict = {}
    for e in layout:
        pre, perm = e.build([_host(tensors[n]) for n, _ in e.sources], _get(shapes, e.path).shape)
        _set(params, e.path, _place(pre, perm, dtype, _get(shardings, e.path)))
        del pre  # before the next param is read
    return params


def _check_shapes(layout: list[Entry], tensors: Mapping[str, Any]) -> None:
    for e in layout:
        for name, shape in e.sources:
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )


def _host(x) -> np.ndarray:
    return x.read() if isinstance(x, LazyTensor) else np.asarray(x)


def _place(pre: np.ndarray, perm: tuple[int, ...], dtype, sharding) -> jax.Array:
    """The param `pre.transpose(perm)` in `dtype` on `sharding`, the copies finished (so the
    host array can go): `pre` is split over the devices as the param will be, so each device
    transposes and casts its own shard."""
    if perm == _same(pre.shape) and pre.dtype == dtype:
        return jax.block_until_ready(_put(pre, sharding))
    x = _put(pre, _permuted(sharding, perm))
    return jax.block_until_ready(_layout(perm, np.dtype(dtype), sharding)(x))


def _put(host: np.ndarray, sharding) -> jax.Array:
    """`host` on `sharding`, each device given its own slice: with several processes a process
    can only place its own devices' shards (device_put refuses a memory-mapped file's array
    there), and a memory-mapped file is read only where a shard needs it."""
    if not isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))


def _permuted(sharding, perm: tuple[int, ...]):
    """The sharding of `pre` whose transpose by `perm` lands on `sharding`."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
    pre = [None] * len(perm)
    for ours, axis in enumerate(perm):
        pre[axis] = spec[ours]
    return NamedSharding(sharding.mesh, PartitionSpec(*pre))


@functools.lru_cache(maxsize=64)
def _layout(perm: tuple[int, ...], dtype, sharding) -> Callable:
    """A jitted transpose and cast onto `sharding` (compiled once per distinct case)."""
    return jax.jit(lambda x: x.transpose(perm).astype(dtype), out_shardings=sharding)


def _check_names(cfg: ModelConfig, layout: list[Entry], tensors: Mapping[str, Any]) -> None:
    expected = {name for e in layout for name, _ in e.sources}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(
            f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
        )
    extra = sorted(
        n
        for n in set(tensors) - expected
        if not n.endswith(IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    )
    if extra:
        raise ValueError(
            f"checkpoint has {len(extra)} unexpected tensor(s): {', '.join(extra[:8])}"
        )


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Sources


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype=None,
    tensor_parallel_size: int | None = None,
    mesh=None,
    moe: str = "expert",
) -> Model:
    """Loads an HF directory, a `.gguf` file or a jaxinfer checkpoint; None = the default model.

    dtype: "bfloat16", "float16" or "float32"; None: bfloat16 on a GPU, float32 on a CPU.
    tensor_parallel_size / mesh: split the params over that many devices (or that mesh, whose one
      axis is "model"); moe: "expert" or "ffn" parallelism of the experts (`sharding.py`). Each
      tensor is read straight into its shards, one at a time (see the module docstring).
    Raises:
      ValueError: no such model, or a damaged one (truncated or garbage files, missing shards,
        tensors of the wrong name, shape or dtype); the message names the file and the fault.
        A layout that cannot split the model is refused before any tensor is read.
    """
    dtype = resolve_dtype(dtype)
    path = pathlib.Path(path) if path is not None else ensure_default_model()
    start = time.perf_counter()
    kind, open_source = _source(path)
    cfg, read_params = _readable(path, kind, open_source, path)
    parallel = resolve_parallel(cfg, tensor_parallel_size, mesh, moe)  # before any tensor
    shardings = load_shardings(cfg, dtype, parallel)
    params, tokenizer = _readable(path, kind, read_params, dtype, shardings)
    logger.info(
        "loaded %s (%s, %.2fB params, %s, tensor parallel %d) in %.1f s",
        path,
        cfg.model_type,
        cfg.num_params / 1e9,
        jnp.dtype(dtype).name,
        parallel.size,
        time.perf_counter() - start,
    )
    return Model(cfg, params, tokenizer, dtype, parallel=parallel)


def _source(path: pathlib.Path) -> tuple[str, Callable]:
    """What `path` is, and its opener: path -> (config, (dtype, shardings) -> (params,
    tokenizer)); opening reads the config and the tensors' names and shapes, no tensor."""
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return "GGUF file", _open_gguf
    if path.is_dir() and (path / FORMAT_FILE).exists():
        return "jaxinfer checkpoint", _open_jaxinfer
    if path.is_dir() and (path / "config.json").exists():
        return "HF model directory", _open_hf
    raise ValueError(
        f"{str(path)!r} is not a model: expected an HF directory with config.json, "
        f"a .gguf file, or a jaxinfer checkpoint directory with {FORMAT_FILE}"
    )


def _readable(path: pathlib.Path, kind: str, read: Callable, *args):
    """`read(*args)`, with any failure turned into one ValueError that names `path`."""
    try:
        return read(*args)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - readers raise their own types on damaged bytes
        raise ValueError(
            f"{path} is not a readable {kind}: {type(e).__name__}: {_one_line(e)}"
        ) from e


def _one_line(error: Exception, limit: int = 300) -> str:
    """The first line of an error's message, cut to `limit` characters (readers dump pages)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return text if len(text) <= limit else text[:limit] + "..."


# -- HF safetensors -------------------------------------------------------------------------------

# safetensors dtype codes -> numpy; bf16 and fp8 through ml_dtypes (safetensors' own numpy
# reader has no bf16, the dtype of most checkpoints, so tensors are memory-mapped here).
FLOAT_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
}
OTHER_DTYPES = {
    "BOOL": "bool",
    **{f"{c}{b}": f"{t}int{b}" for c, t in (("I", ""), ("U", "u")) for b in (8, 16, 32, 64)},
}


def _open_hf(path: pathlib.Path) -> tuple[ModelConfig, Callable]:
    cfg = with_generation_eos(ModelConfig.from_json_file(path / "config.json"), path)
    try:
        tensors = _safetensors(path)  # headers only: the params are read from them later
    except ValueError:
        tensors = None  # damaged files are named when the params are read, after these checks
    if tensors is not None:
        _check_counts(cfg, tensors)
        cfg = _untied_if_lm_head_differs(cfg, tensors, path)
    return cfg, functools.partial(_load_hf, path, cfg, tensors)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


def _check_counts(cfg: ModelConfig, tensors: Mapping[str, Any]) -> None:
    """The config's layer and expert counts against the tensors' names, before anything is
    built per layer or expert: a config's 10**9 layers would otherwise hang the load."""
    for what, pattern, count in (
        ("num_hidden_layers", _LAYER, cfg.num_layers),
        ("the expert count", _EXPERT, cfg.num_experts),
    ):
        found = {int(m.group(1)) for m in map(pattern.match, tensors) if m}
        if found and len(found) != count:
            raise ValueError(
                f"config.json says {what} = {count}, but the checkpoint's tensors hold "
                f"{len(found)} (indices {min(found)}-{max(found)})"
            )


def _untied_if_lm_head_differs(
    cfg: ModelConfig, tensors: Mapping[str, LazyTensor], path: pathlib.Path
) -> ModelConfig:
    """A tied config whose files also hold an `lm_head.weight` unlike the embedding (some
    fine-tunes and merges ship so) gets that head, as transformers does: it ties the two only
    when they are equal."""
    if not cfg.tie_word_embeddings:
        return cfg
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    shape = (cfg.vocab_size, cfg.hidden_size)
    if head is not None and tuple(head.shape) != shape:  # not left out as an unused extra
        raise ValueError(f"tensor lm_head.weight has shape {tuple(head.shape)}, expected {shape}")
    if head is None or embed is None or tuple(embed.shape) != shape:
        return cfg  # nothing to compare; a bad embedding is refused when the params are built
    if np.array_equal(head.read(), embed.read()):
        return cfg
    logger.info("%s: lm_head.weight differs from the embedding: the head is not tied", path)
    return dataclasses.replace(cfg, tie_word_embeddings=False)


def with_generation_eos(cfg: ModelConfig, path: pathlib.Path) -> ModelConfig:
    """`cfg` with the EOS ids of the directory's `generation_config.json` added: instruct models
    list their end-of-turn token there only (Llama-3-Instruct's <|eot_id|>, Qwen's <|im_end|>),
    and HF's `generate` stops on them."""
    file = path / "generation_config.json"
    if not file.exists():
        return cfg
    try:
        data = json.loads(file.read_text())
        ids = data.get("eos_token_id") if isinstance(data, dict) else None
        ids = as_token_ids("eos_token_id", [ids] if isinstance(ids, int) else ids, allow_empty=True)
    except ValueError as e:  # bad JSON or UTF-8 too
        raise ValueError(f"{file} is damaged: {e}") from e
    extra = tuple(i for i in dict.fromkeys(ids) if i not in cfg.eos_token_ids)
    if not extra:
        return cfg
    try:
        return dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + extra)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _load_hf(
    path: pathlib.Path, cfg: ModelConfig, tensors: dict | None, dtype, shardings
) -> tuple[dict, Any]:
    """tensors: the headers `_open_hf` read, or None where they did not read (read again here,
    which names the damage)."""
    tensors = _safetensors(path) if tensors is None else tensors
    params = params_from_hf(cfg, tensors, dtype, shardings)
    return params, _hf_tokenizer(path)


def _safetensors(path: pathlib.Path) -> dict[str, LazyTensor]:
    """Every tensor of the directory's safetensors files, checked but not read."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _shard_names(index)
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors files in {str(path)!r} (only safetensors are supported)"
        )
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file}: shard listed in {index.name} is missing")
        tensors |= _safetensors_file(file)
    return tensors


def _safetensors_file(file: pathlib.Path) -> dict[str, LazyTensor]:
    """One file's tensors, memory-mapped when read; a damaged file is a ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy"):
            pass  # checks the header against the file: a cut or garbage file fails here
        start, header = _safetensors_header(file)
        return {
            name: _lazy_tensor(file, name, start, info)
            for name, info in header.items()
            if name != "__metadata__"
        }
    except ValueError as e:
        if str(file) in str(e):
            raise
        raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - SafetensorError on truncated or garbage bytes
        raise ValueError(
            f"{file} is not a readable safetensors file: {type(e).__name__}: {_one_line(e)}"
        ) from e


def _safetensors_header(file: pathlib.Path) -> tuple[int, dict]:
    """(where the tensor bytes start, the JSON header): an 8-byte little-endian length first."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _lazy_tensor(file: pathlib.Path, name: str, start: int, info: dict) -> LazyTensor:
    """A floating-point tensor of `file`: an integer or bool one means a damaged or foreign file."""
    if info["dtype"] not in FLOAT_DTYPES:
        raise ValueError(
            f"{file}: tensor {name} has dtype {OTHER_DTYPES.get(info['dtype'], info['dtype'])}, "
            "expected a floating-point dtype (quantized safetensors are not supported)"
        )
    shape, offset = tuple(info["shape"]), start + info["data_offsets"][0]
    return LazyTensor(
        shape, functools.partial(_map, file, FLOAT_DTYPES[info["dtype"]], offset, shape)
    )


def _map(file: pathlib.Path, dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of one tensor (the OS pages it in as the param is built)."""
    if not math.prod(shape):
        return np.zeros(shape, dtype)  # mmap cannot map 0 bytes
    return np.memmap(file, dtype, "r", offset, shape)


def _shard_names(index: pathlib.Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e


def _hf_tokenizer(path: pathlib.Path):
    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _open_gguf(path: pathlib.Path) -> tuple[ModelConfig, Callable]:
    from jaxinfer.gguf import open_gguf

    hf_config, tensors = open_gguf(path)  # the reader maps the file; no tensor is read
    cfg = ModelConfig.from_hf(hf_config)
    return cfg, functools.partial(_load_gguf, path, cfg, hf_config, tensors)


def _load_gguf(
    path: pathlib.Path, cfg: ModelConfig, hf_config: dict, tensors: dict, dtype, shardings
) -> tuple[dict, Any]:
    from jaxinfer.gguf import hf_array, hf_shape
    from jaxinfer.gguf_tokenizer import gguf_tokenizer

    lazy = {
        name: LazyTensor(hf_shape(t), functools.partial(hf_array, t, hf_config))
        for name, t in tensors.items()
    }
    return params_from_hf(cfg, lazy, dtype, shardings), gguf_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# jaxinfer's own checkpoints (orbax)


def save_checkpoint(model: Model, path: str | os.PathLike) -> pathlib.Path:
    """Writes `jaxinfer.json` (config, dtype), `params/` (orbax) and `tokenizer/` under `path`,
    a new or empty directory (ValueError otherwise).

    With several processes every one calls it (each writes its own shards, on a filesystem they
    share); the first writes the rest, and all return once the checkpoint is whole."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    _check_new_directory(path)
    _sync_processes("jaxinfer save_checkpoint: checked")  # none writes before all have looked
    first = jax.process_index() == 0
    if first:
        path.mkdir(parents=True, exist_ok=True)
    _sync_processes("jaxinfer save_checkpoint: made")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", model.params)
    checkpointer.wait_until_finished()
    if first:
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(path / "tokenizer"))
        meta = {
            "format": "jaxinfer",
            "version": FORMAT_VERSION,
            "dtype": jnp.dtype(model.dtype).name,
            "config": model.config.to_dict(),
        }
        temporary = path / f"{FORMAT_FILE}.partial"
        temporary.write_text(json.dumps(meta, indent=2))
        temporary.replace(path / FORMAT_FILE)  # the file is whole or absent, never half-written
    _sync_processes("jaxinfer save_checkpoint: written")
    return path


def _check_new_directory(path: pathlib.Path) -> None:
    """`path` is a directory that is empty, or can be made: ValueError naming it otherwise."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"checkpoint directory {str(path)!r}: {str(parent)!r} is a file")
            break
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"checkpoint directory {str(path)!r} exists and is not empty")


def _sync_processes(name: str) -> None:
    """Waits for every process to get here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _open_jaxinfer(path: pathlib.Path) -> tuple[ModelConfig, Callable]:
    try:
        meta = json.loads((path / FORMAT_FILE).read_text())
        cfg = ModelConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path / FORMAT_FILE} is not a valid jaxinfer checkpoint file: {e}"
        ) from e
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is a jaxinfer checkpoint of format version {meta.get('version')}; "
            f"this jaxinfer reads version {FORMAT_VERSION}: convert it again"
        )
    return cfg, functools.partial(_load_jaxinfer, path, cfg)


def _load_jaxinfer(path: pathlib.Path, cfg: ModelConfig, dtype, shardings) -> tuple[Any, Any]:
    """Orbax restores each shard onto its device, cast to `dtype` as it is read."""
    import orbax.checkpoint as ocp

    shapes, _ = abstract_params(cfg, dtype)
    target = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings
    )
    try:
        params = ocp.StandardCheckpointer().restore(path.absolute() / "params", target)
    except Exception as e:  # noqa: BLE001 - orbax / TensorStore raise bare Exceptions with dumps
        raise ValueError(
            f"{path / 'params'}: the params cannot be restored (a damaged, incomplete "
            f"or mismatched orbax checkpoint): {type(e).__name__}: {_one_line(e)}"
        ) from e
    tokenizer = _hf_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return params, tokenizer


def checkpoints_dir() -> pathlib.Path:
    env = os.environ.get("JAXINFER_CHECKPOINTS")
    return (
        pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parent.parent / "checkpoints"
    )


def ensure_default_model() -> pathlib.Path:
    """The default model's jaxinfer checkpoint, converted once from its GGUF (kept in f32: lossless)."""
    target = checkpoints_dir() / DEFAULT_MODEL_NAME
    if _current_checkpoint(target):
        return target
    from jaxinfer.gguf import default_gguf_path

    gguf = default_gguf_path()
    if jax.process_count() > 1:  # the conversion is a one-process job: these read the GGUF
        logger.info("several processes: %s is read as it is, not converted", gguf.name)
        return gguf
    if (target / FORMAT_FILE).exists():
        shutil.rmtree(target)  # written by an older jaxinfer: convert again
    logger.info("converting %s once into %s", gguf.name, target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        save_checkpoint(load_model(gguf, dtype=jnp.float32), partial)
        partial.rename(target)  # a conversion cut short never looks finished
    except OSError:
        if not _current_checkpoint(target):
            raise
        logger.info("another process converted %s first", gguf.name)  # its copy serves
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _current_checkpoint(path: pathlib.Path) -> bool:
    """A whole jaxinfer checkpoint of this format version is at `path`."""
    try:
        return json.loads((path / FORMAT_FILE).read_text()).get("version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def convert_main(argv: list[str] | None = None) -> int:
    """`scripts/convert_checkpoint.py SOURCE DEST [--dtype ...]`: converts an HF directory, a
    .gguf file or a jaxinfer checkpoint into a jaxinfer checkpoint. Returns the exit status (2,
    with the reason on stderr, for bad input)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Converts an HF directory, a .gguf file or a "
        "jaxinfer checkpoint into a jaxinfer checkpoint."
    )
    parser.add_argument("source", help="HF directory, .gguf file or jaxinfer checkpoint")
    parser.add_argument("dest", help="new directory for the jaxinfer checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    try:
        _check_new_directory(pathlib.Path(args.dest).absolute())  # before the model is read
        model = load_model(args.source, dtype=args.dtype)
        path = save_checkpoint(model, args.dest)
    except (ValueError, OSError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(
        f"wrote {path}: {c.model_type}, {c.num_layers} layers, D={c.hidden_size}, "
        f"{c.num_params / 1e6:.1f}M params, {args.dtype}"
    )
    return 0
