"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers on the same file."""

from __future__ import annotations

import pytest
import torch

import jaxinfer
from jaxinfer.tokenizer import IncrementalDetokenizer, encode_prompt

gguf = pytest.importorskip("jaxinfer.gguf")
try:
    GGUF_PATH = gguf.default_gguf_path()
except FileNotFoundError as e:  # pragma: no cover - the README's setup installs it
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def ours():
    return jaxinfer.load_model(GGUF_PATH, dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32
    ).eval()


def test_config_of_default_model(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert c.tie_word_embeddings and c.eos_token_ids == (2,)


@pytest.mark.parametrize(
    "text, chat",
    [
        ("The capital of France is", False),
        ("def fibonacci(n):", False),
        ("What is the tallest mountain on Earth?", True),
    ],
)
def test_greedy_tokens_match_hf(ours, hf_model, text, chat):
    ids = encode_prompt(ours.tokenizer, text, chat=chat)
    (tokens,) = jaxinfer.generate(ours, [ids], max_new_tokens=24)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    assert tokens == ref[0, len(ids) :].tolist()[: len(tokens)]
    assert len(tokens) == 24 or tokens[-1] in ours.config.eos_token_ids


def test_default_checkpoint_conversion_and_cli(tmp_path, monkeypatch, capsys, ours):
    monkeypatch.setenv("JAXINFER_CHECKPOINTS", str(tmp_path))
    from jaxinfer.__main__ import main

    assert (
        main(
            [
                "generate",
                "--dtype",
                "float32",
                "--max-new-tokens",
                "12",
                "--chat",
                "Name a primary colour.",
            ]
        )
        == 0
    )
    target = tmp_path / "smollm2-135m-instruct"
    assert (target / "jaxinfer.json").exists()
    # a second process that converted at the same time and lost the race: its rename into place
    # fails, and the winner's copy serves it
    from jaxinfer import checkpoint

    current, looks = checkpoint._current_checkpoint, iter([False])
    monkeypatch.setattr(checkpoint, "_current_checkpoint", lambda p: next(looks, current(p)))
    assert checkpoint.ensure_default_model() == target
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # its partial copy removed
    ids = encode_prompt(ours.tokenizer, "Name a primary colour.", chat=True)
    (tokens,) = jaxinfer.generate(ours, [ids], max_new_tokens=12)
    expected = ours.tokenizer.decode(tokens, skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_reports_bad_input(capsys):
    from jaxinfer.__main__ import main

    assert main(["generate", "--model", str(GGUF_PATH), "--temperature", "-1", "hi"]) == 2
    assert "--temperature must be a finite float32 number >= 0" in capsys.readouterr().err
    # checked before the model loads: a missing model is not what it reports
    assert main(["generate", "--model", "/no/such/model", "--top-p", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--top-p must be" in err and "/no/such/model" not in err
    assert main(["generate", "--max-new-tokens", "0", "hi"]) == 2  # the flag, not the field
    assert "error: --max-new-tokens must be an integer >= 1, got 0" in capsys.readouterr().err


def test_incremental_detokenizer_never_splits_characters(ours):
    text = "naïve café — 東京 🚀🎉 über ﬁn"
    ids = ours.tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(ours.tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == ours.tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert sum(d == "" for d in deltas) > 0  # some tokens held back a partial character


def test_incremental_detokenizer_keeps_a_sentencepiece_first_space():
    """SentencePiece drops the leading space of a decode: "▁Paris" alone is "Paris". Started on
    the prompt's last tokens, the first delta keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = tok("The capital of France is Paris")["input_ids"]
    assert ids == [1, 2, 3, 4, 5, 6] and tok.decode([6]) == "Paris"
    detok = IncrementalDetokenizer(tok, prompt_ids=ids[:-2])
    assert [detok.push(t) for t in ids[-2:]] == [" is", " Paris"]
    assert [IncrementalDetokenizer(tok).push(6)] == ["Paris"]  # no prompt: as decode gives


def test_llm_on_default_model_matches_generate(ours):
    """Text prompts through the engine (real tokenizer, paged cache) equal `generate` greedy."""
    llm = jaxinfer.LLM(
        model=ours, max_num_seqs=4, max_num_batched_tokens=64, num_pages=64, warmup=False
    )
    texts = ["Paris is", "Écris un haïku sur la mer 🌊:"]
    outs = llm.generate(
        texts, jaxinfer.SamplingParams(max_tokens=10, temperature=0), use_tqdm=False
    )
    for text, out in zip(texts, outs):
        ids = encode_prompt(ours.tokenizer, text)
        (expected,) = jaxinfer.generate(ours, [ids], max_new_tokens=10)
        assert out.prompt_token_ids == ids and out.token_ids == expected
        # a character cut off by max_tokens is never emitted half-made
        assert out.text == ours.tokenizer.decode(expected, skip_special_tokens=True).rstrip(
            "\ufffd"
        )
        assert "\ufffd" not in out.text
