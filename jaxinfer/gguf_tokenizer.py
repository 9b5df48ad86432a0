"""The tokenizer a GGUF file describes, built from its metadata with `tokenizers` alone (no torch).

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, token types,
special ids and chat template as metadata. This module rebuilds the two kinds Llama-family
files use:

    tokenizer.ggml.model = "gpt2"    byte-level BPE (SmolLM, Llama 3, Qwen2): the split regex is
                                     picked by `tokenizer.ggml.pre`, as llama.cpp picks it
    tokenizer.ggml.model = "llama"   SentencePiece BPE (Llama 2, Mistral): metaspace, byte fallback

and wraps it as a transformers `PreTrainedTokenizerFast`, so the rest of jaxinfer (prompts,
chat templates, incremental detokenization, `save_pretrained`) treats it like any HF tokenizer.
"""

from __future__ import annotations

import os

import gguf
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from jaxinfer.gguf import gguf_reader

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes by `tokenizer.ggml.pre`, as llama.cpp's llm_tokenizer_bpe uses them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-tokenizers that split every digit on its own before the GPT-2 regex (SmolLM's
# tokenizer.json: Digits(individual_digits=True), then ByteLevel).
_DIGIT_SPLIT = {"smollm"}
# Those that split as GPT-2 does (llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT and GPT-2).
_DEFAULT_SPLIT = {"default", "gpt-2", *_DIGIT_SPLIT}


def gguf_tokenizer(path: str | os.PathLike):
    """The HF fast tokenizer stored in the GGUF file at `path` (vocab, merges, specials, template).

    Raises:
        ValueError: the file's tokenizer kind is not one this module builds.
    """
    from transformers import PreTrainedTokenizerFast

    meta = _metadata(gguf_reader(path))
    kind = meta.get("model")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise ValueError(
            f"{os.fspath(path)}: GGUF tokenizer kind {kind!r} is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
        )
    _add_special_tokens(backend, meta)
    for key in ("bos_token_id", "eos_token_id"):  # unk and pad, unused, may be left out
        if meta.get(key) is not None and not 0 <= meta[key] < len(meta["tokens"]):
            raise ValueError(
                f"{os.fspath(path)}: tokenizer.ggml.{key} {meta[key]} is outside the "
                f"vocabulary [0, {len(meta['tokens'])})"
            )
    specials = {
        name: meta["tokens"][meta[key]]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if meta.get(key) is not None and meta[key] < len(meta["tokens"])
    }
    _set_post_processor(backend, meta, specials.get("bos_token"), specials.get("eos_token"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("chat_template"),
        clean_up_tokenization_spaces=False,
        **specials,
    )


def _metadata(reader: gguf.GGUFReader) -> dict:
    """`tokenizer.ggml.*` fields without their prefix, plus `chat_template`."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            meta[key.removeprefix("tokenizer.ggml.")] = field.contents()
    if (template := reader.get_field("tokenizer.chat_template")) is not None:
        meta["chat_template"] = template.contents()
    if not meta.get("tokens"):
        raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    return meta


def _byte_level_bpe(meta: dict) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or ()]
    pre = meta.get("pre", "default")
    if pre not in _SPLITS and pre not in _DEFAULT_SPLIT:
        known = ", ".join(sorted({*_SPLITS, *_DEFAULT_SPLIT}))
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (supported: {known}); its split "
            "rules differ, and a wrong split gives the model other token ids"
        )
    # Llama 3's tokenizer takes a word found whole in the vocabulary before any merge.
    ignore_merges = _SPLITS.get(pre) is _LLAMA3_SPLIT
    tok = Tokenizer(
        models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    )
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # GPT-2's own regex, built into ByteLevel
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in _DIGIT_SPLIT:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict) -> Tokenizer:
    tokens = meta["tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if meta.get("merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    else:
        merges = _merges_from_scores(tokens, meta.get("scores") or [0.0] * len(tokens))
    unk = tokens[meta["unknown_token_id"]] if meta.get("unknown_token_id") is not None else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix, as llama.cpp adds it: before every piece of text that starts
    # the input or follows a special token ("<s>[INST]" -> <s> "\u2581[INST]"), a leading space
    # or not. (Metaspace's prepend_scheme "first" adds it only at offset 0, and not before a
    # space, as transformers' GGUF loader does.) Special tokens are split off before this runs.
    add_prefix = meta.get("add_space_prefix", True)
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_prefix else spaces
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores no merges: every split of a token into two tokens is a merge,
    ranked by the merged token's score (higher first), then by the pieces' ranks."""
    rank = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in rank and right in rank:
                found.append((-score, rank[left], rank[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_special_tokens(tok: Tokenizer, meta: dict) -> None:
    """Control tokens (`<|im_start|>`) match whole and are special; user-defined ones match whole."""
    types = meta.get("token_type") or ()
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(meta["tokens"], types)
        if kind == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(meta["tokens"], types)
        if kind == _USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _set_post_processor(tok: Tokenizer, meta: dict, bos: str | None, eos: str | None) -> None:
    """Prepends BOS and appends EOS where the file asks for them (`add_bos_token`, SentencePiece
    files by default; `add_eos_token`), as llama.cpp and transformers do."""
    add_bos = bos is not None and meta.get("add_bos_token", meta.get("model") == "llama")
    add_eos = eos is not None and meta.get("add_eos_token", False)
    if not (add_bos or add_eos):
        return
    head, tail = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
    specials = [(bos, meta["bos_token_id"])] if add_bos else []
    specials += [(eos, meta["eos_token_id"])] if add_eos and eos != bos else []
    tok.post_processor = processors.TemplateProcessing(
        single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B{tail}", special_tokens=specials
    )
