"""Model configuration: a frozen, hashable dataclass built from an HF `config.json`.

It is static under `jit` (hashable), so one compiled program serves one model shape. Every field
is checked when the config is built; an unsupported `model_type` or field value raises a
`ValueError` that names the field, so nothing the model cannot honour is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

# model_type -> the HF architecture name of its causal LM.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0")
        length = self.original_max_position_embeddings
        if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length <= 0:
            raise ValueError(
                f"rope_scaling original_max_position_embeddings must be a positive integer, "
                f"got {length!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (shape letters as in the jaxinfer package docstring)."""

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (num_experts 0 = a dense MLP in every layer).
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # F of one expert
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # a shared expert with a sigmoid gate (Qwen2-MoE)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        ):  # 0: none
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config field {name} must be an integer >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError("moe_intermediate_size must be > 0 for a mixture of experts")
        for token in self.eos_token_ids:
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"eos_token_id {token} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * f
        if self.num_experts:
            mlp = (
                self.num_experts * (3 * d * self.moe_intermediate_size + d)
                + 3 * d * self.shared_expert_intermediate_size
            )
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    @property
    def active_params(self) -> int:
        """Parameters one token uses: with experts, only k of the E per layer."""
        if not self.num_experts:
            return self.num_params
        idle = self.num_experts - self.num_experts_per_tok
        return (
            self.num_params
            - self.num_layers * idle * 3 * self.hidden_size * self.moe_intermediate_size
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (jaxinfer's own checkpoints)."""
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from an HF `config.json` dict; raises ValueError on what it can't honour."""
        try:
            return cls._from_hf(hf)
        except TypeError as e:  # a string or a list where a number goes, say
            raise ValueError(f"config has a value of the wrong type: {e}") from e

    @classmethod
    def _from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ValueError(f"config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        _check_architectures(hf, model_type)
        _check_activation_and_bias(hf, model_type)
        num_heads = _require(hf, "num_attention_heads")
        hidden = _require(hf, "hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        max_pos = _require(hf, "max_position_embeddings")
        _check_sliding_window(hf, model_type, max_pos)
        qwen = model_type in ("qwen2", "qwen2_moe")  # q/k/v bias (Qwen2-MoE: unless told), no o
        qkv_bias = _flag(hf, "qkv_bias", True) if qwen else bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size"),
            num_layers=_require(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS[model_type]["rms_norm_eps"])),
            rope_theta=_rope_theta(hf, _DEFAULTS[model_type]["rope_theta"]),
            rope_scaling=_rope_scaling(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=not qwen and bool(hf.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            **_moe_fields(hf, model_type),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        return cls.from_hf(data)


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise ValueError(f"config is missing the required field {key!r}")
    return hf[key]


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _check_architectures(hf: dict, model_type: str) -> None:
    expected = SUPPORTED_MODEL_TYPES[model_type]
    for arch in hf.get("architectures") or []:
        if arch != expected:
            raise ValueError(
                f"architecture {arch!r} is not supported for model_type {model_type!r} "
                f"(expected {expected!r})"
            )


def _check_activation_and_bias(hf: dict, model_type: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")


def _check_sliding_window(hf: dict, model_type: str, max_pos: int) -> None:
    """A window narrower than the context changes the model's output: refuse it, never ignore it."""
    window = hf.get("sliding_window")
    if model_type.startswith("qwen") and not hf.get("use_sliding_window", False):
        return  # Qwen2 configs carry a window value that is off unless use_sliding_window is set
    if not _any_sliding_layer(hf, model_type):
        return
    if window is not None and window < max_pos:
        raise ValueError(
            f"sliding_window={window} (narrower than max_position_embeddings={max_pos}) is not "
            "supported yet: the model's output would differ from its reference"
        )


def _flag(hf: dict, key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config {key} must be true or false, got {value!r}")
    return value


def _any_sliding_layer(hf: dict, model_type: str) -> bool:
    """Whether transformers gives any layer the window: `layer_types` when the config lists them;
    Qwen2 / Qwen3 slide only layers from `max_window_layers` (default 28) on."""
    types = hf.get("layer_types")
    if isinstance(types, list):
        return "sliding_attention" in types
    layers, first = hf.get("num_hidden_layers"), hf.get("max_window_layers", 28)
    if model_type in ("qwen2", "qwen3") and isinstance(layers, int) and isinstance(first, int):
        return first < layers
    return True


def _moe_fields(hf: dict, model_type: str) -> dict:
    """Expert settings of Mixtral (num_local_experts) and Qwen2/3-MoE (num_experts; Qwen2-MoE's
    shared expert)."""
    if model_type == "mixtral":
        return dict(
            num_experts=_require(hf, "num_local_experts"),
            num_experts_per_tok=_require(hf, "num_experts_per_tok"),
            moe_intermediate_size=_require(hf, "intermediate_size"),
            norm_topk_prob=True,
        )
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return {}
    if (hf.get("decoder_sparse_step") or 1) != 1 or hf.get("mlp_only_layers"):
        raise ValueError(
            f"{model_type} with dense layers (decoder_sparse_step != 1 or "
            "mlp_only_layers) is not supported yet"
        )
    # Hub configs say num_experts; transformers 5 saves num_local_experts.
    experts = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    return dict(
        num_experts=_require(hf, experts),
        num_experts_per_tok=_require(hf, "num_experts_per_tok"),
        moe_intermediate_size=_require(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
    )


# transformers' defaults for what a config.json may leave out, by model_type.
_DEFAULTS = {t: dict(rms_norm_eps=1e-6, rope_theta=10000.0) for t in SUPPORTED_MODEL_TYPES} | {
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6)
}


def _rope_params(hf: dict) -> dict:
    # transformers >= 5 folds rope_theta and rope_scaling into one `rope_parameters` dict; a
    # legacy `rope_scaling` beside it wins, as transformers reads them.
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def _rope_theta(hf: dict, default: float) -> float:
    theta = _rope_params(hf).get("rope_theta", hf.get("rope_theta", default))
    return float(theta)


_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_scaling(hf: dict) -> RopeScaling | None:
    params = _rope_params(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    unknown = set(params) - fields - {"rope_type", "type", "rope_theta"}
    if unknown:
        raise ValueError(f"rope_scaling fields {sorted(unknown)} are not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:  # transformers rotates part of each head
        raise ValueError(
            f"partial_rotary_factor {hf['partial_rotary_factor']} with rope_type {rope_type!r} "
            "is not supported"
        )
    values = {k: v for k, v in params.items() if k in fields}
    if rope_type == "llama3":  # transformers (>= 5) falls back to the context it is given
        values.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = sorted(set(_ROPE_REQUIRED.get(rope_type, ())) - set(values))
    if missing:  # transformers refuses them too; a default would be a guess
        raise ValueError(f"rope_scaling type {rope_type!r} needs {', '.join(missing)}")
    if "factor" in values and not math.isfinite(float(values["factor"])):
        raise ValueError(f"rope_scaling factor must be finite, got {values['factor']}")
    return RopeScaling(rope_type=rope_type, **values)
