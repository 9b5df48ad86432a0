"""Checkpoints in, params out: HF safetensors directories, GGUF files, and jaxinfer's own (orbax).

Every source is turned into HF-named tensors first; one table (`hf_layout`) says, for each of our
params, which HF tensor it comes from, that tensor's shape, and how to lay it out. A missing,
extra or mis-shaped tensor is an error naming the tensor and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model import Model, abstract_params, resolve_dtype
from jaxinfer.platform import logger
from pallas_kernels.common import default_device

FORMAT_FILE = "jaxinfer.json"
FORMAT_VERSION = 2  # 2: fused qkv and gate_up params
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# HF names that carry no weights of ours (derived buffers some checkpoints include).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _copy(xs, shape):
    return xs[0].reshape(shape)


def _linear(xs, shape):  # HF linear weights are [out, in]; ours are [in, ...out]
    return xs[0].T.reshape(shape)


def _qkv(xs, shape):  # [D, K, G + 2, H]: each kv head's G query heads, then its k and v
    d, k, c, h = shape
    q, kk, v = (x.T.reshape(d, k, -1, h) for x in xs)
    return jnp.concatenate([q, kk, v], axis=2)


def _qkv_bias(xs, shape):  # [K, G + 2, H]
    k, c, h = shape
    return jnp.concatenate([x.reshape(k, -1, h) for x in xs], axis=1)


def _gate_up(xs, shape):  # [D, 2, F]
    return jnp.stack([x.T for x in xs], axis=1)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One param: its place in our tree, the HF tensors (name, shape) it is built from, and how."""

    path: tuple[str, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    build: Callable  # (HF arrays, our shape) -> our array


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
        Entry((ours, "attn", "o"), ((f"{attn}.o_proj.weight", (d, nh)),), _linear),
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


def _experts_gate_up(xs, shape):  # E gate [F, D] then E up [F, D] -> [E, D, 2, F]
    e = shape[0]
    return jnp.stack([jnp.stack([g.T, u.T], axis=1) for g, u in zip(xs[:e], xs[e:])])


def _experts_down(xs, shape):  # E of [D, F] -> [E, F, D]
    return jnp.stack([x.T for x in xs])


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, Any], dtype) -> dict:
    """HF-named tensors -> our params pytree in `dtype`, every name and shape checked."""
    dtype = resolve_dtype(dtype)
    layout = hf_layout(cfg)
    _check_names(cfg, layout, tensors)
    shapes, _ = abstract_params(cfg, dtype)
    params: dict = {}
    for e in layout:
        for name, shape in e.sources:
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )
        xs = [jnp.asarray(tensors[name]) for name, _ in e.sources]
        _set(params, e.path, e.build(xs, _get(shapes, e.path).shape).astype(dtype))
    return params


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
      axis is "model"); moe: "expert" or "ffn" parallelism of the experts (`sharding.py`).
    Raises:
      ValueError: no such model, or a damaged one (truncated or garbage files, missing shards,
        tensors of the wrong name, shape or dtype); the message names the file and the fault.
    """
    dtype = resolve_dtype(dtype)
    path = pathlib.Path(path) if path is not None else ensure_default_model()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        model = _readable(path, "GGUF file", _load_gguf, dtype)
    elif path.is_dir() and (path / FORMAT_FILE).exists():
        model = _readable(path, "jaxinfer checkpoint", _load_jaxinfer, dtype)
    elif path.is_dir() and (path / "config.json").exists():
        model = _readable(path, "HF model directory", _load_hf, dtype)
    else:
        raise ValueError(
            f"{str(path)!r} is not a model: expected an HF directory with config.json, "
            f"a .gguf file, or a jaxinfer checkpoint directory with {FORMAT_FILE}"
        )
    from jaxinfer.sharding import shard_model

    model = shard_model(model, tensor_parallel_size, mesh=mesh, moe=moe)
    logger.info(
        "loaded %s (%s, %.2fB params, %s, tensor parallel %d) in %.1f s",
        path,
        model.config.model_type,
        model.config.num_params / 1e9,
        jnp.dtype(dtype).name,
        model.parallel.size,
        time.perf_counter() - start,
    )
    return model


def _readable(path: pathlib.Path, kind: str, load: Callable, dtype) -> Model:
    """`load(path, dtype)`, with any failure turned into one ValueError that names `path`."""
    try:
        return load(path, dtype)
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


def _load_hf(path: pathlib.Path, dtype) -> Model:
    cfg = ModelConfig.from_json_file(path / "config.json")
    params = params_from_hf(cfg, _read_safetensors(path), dtype)
    return Model(cfg, params, _hf_tokenizer(path), dtype)


def _read_safetensors(path: pathlib.Path) -> dict[str, Any]:
    from safetensors import safe_open

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
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    tensors[key] = _float_tensor(file, key, f.get_tensor(key))
        except ValueError as e:
            if str(file) in str(e):
                raise
            raise ValueError(f"{file} is not a readable safetensors file: {_one_line(e)}") from e
        except Exception as e:  # noqa: BLE001 - SafetensorError on truncated or garbage bytes
            raise ValueError(
                f"{file} is not a readable safetensors file: {type(e).__name__}: {_one_line(e)}"
            ) from e
    return tensors


def _shard_names(index: pathlib.Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e


def _float_tensor(file: pathlib.Path, name: str, x):
    """Weights are floating point: an integer or bool tensor means a damaged or foreign file."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{file}: tensor {name} has dtype {x.dtype.name}, expected a "
            "floating-point dtype (quantized safetensors are not supported)"
        )
    return x


def _hf_tokenizer(path: pathlib.Path):
    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_gguf(path: pathlib.Path, dtype) -> Model:
    from jaxinfer.gguf import read_gguf
    from jaxinfer.gguf_tokenizer import gguf_tokenizer

    hf_config, tensors = read_gguf(path)
    cfg = ModelConfig.from_hf(hf_config)
    return Model(cfg, params_from_hf(cfg, tensors, dtype), gguf_tokenizer(path), dtype)


# ---------------------------------------------------------------------------------------------
# jaxinfer's own checkpoints (orbax)


def save_checkpoint(model: Model, path: str | os.PathLike) -> pathlib.Path:
    """Writes `jaxinfer.json` (config, dtype), `params/` (orbax) and `tokenizer/` under `path`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"checkpoint directory {str(path)!r} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", model.params)
    checkpointer.wait_until_finished()
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path / "tokenizer"))
    meta = {
        "format": "jaxinfer",
        "version": FORMAT_VERSION,
        "dtype": jnp.dtype(model.dtype).name,
        "config": model.config.to_dict(),
    }
    (path / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
    return path


def _load_jaxinfer(path: pathlib.Path, dtype) -> Model:
    import orbax.checkpoint as ocp

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
    shapes, _ = abstract_params(cfg, meta["dtype"])
    device = jax.sharding.SingleDeviceSharding(default_device())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    try:
        params = ocp.StandardCheckpointer().restore(path.absolute() / "params", target)
    except Exception as e:  # noqa: BLE001 - orbax / TensorStore raise bare Exceptions with dumps
        raise ValueError(
            f"{path / 'params'}: the params cannot be restored (a damaged, incomplete "
            f"or mismatched orbax checkpoint): {type(e).__name__}: {_one_line(e)}"
        ) from e
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    tokenizer = _hf_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return Model(cfg, params, tokenizer, dtype)


def checkpoints_dir() -> pathlib.Path:
    env = os.environ.get("JAXINFER_CHECKPOINTS")
    return (
        pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parent.parent / "checkpoints"
    )


def ensure_default_model() -> pathlib.Path:
    """The default model's jaxinfer checkpoint, converted once from its GGUF (kept in f32: lossless)."""
    target = checkpoints_dir() / DEFAULT_MODEL_NAME
    if (target / FORMAT_FILE).exists():
        if json.loads((target / FORMAT_FILE).read_text()).get("version") == FORMAT_VERSION:
            return target
        shutil.rmtree(target)  # written by an older jaxinfer: convert again
    from jaxinfer.gguf import default_gguf_path

    gguf = default_gguf_path()
    logger.info("converting %s once into %s", gguf.name, target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    save_checkpoint(_load_gguf(gguf, jnp.float32), partial)
    partial.rename(target)  # a conversion cut short never looks finished
    return target


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
        model = load_model(args.source, dtype=args.dtype)
        path = save_checkpoint(model, args.dest)
    except ValueError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(
        f"wrote {path}: {c.model_type}, {c.num_layers} layers, D={c.hidden_size}, "
        f"{c.num_params / 1e6:.1f}M params, {args.dtype}"
    )
    return 0
