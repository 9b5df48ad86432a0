"""End to end with the default model (SmolLM2-135M-Instruct): text in, the same text out of the
gRPC server, `scripts/client.py` and `LLM.generate`."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import pytest

import jaxinfer
from jaxinfer.serving.client import Client
from jaxinfer.tokenizer import encode_prompt
from serving_utils import ROOT, ServerProcess

gguf = pytest.importorskip("jaxinfer.gguf")
try:
    gguf.default_gguf_path()
except FileNotFoundError as e:  # pragma: no cover - the README's setup installs it
    pytest.skip(str(e), allow_module_level=True)

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256, num_pages=32)
QUESTION = "Name a primary colour."
N = 12  # tokens per answer


def test_default_model_text_matches_llm_generate(tmp_path):
    from jaxinfer.checkpoint import ensure_default_model

    ensure_default_model()  # converted here once, not by two processes at a time
    srv = ServerProcess(["--dtype=float32", *(f"--{k.replace('_', '-')}={v}"
                                              for k, v in ENGINE.items())], tmp_path / "server.log")
    try:
        model = jaxinfer.load_model(None, dtype="float32")  # meanwhile, the reference answer
        llm = jaxinfer.LLM(model=model, **ENGINE, warmup=False)
        chat_ids = encode_prompt(model.tokenizer, QUESTION, chat=True)
        (ref,) = llm.generate([chat_ids], jaxinfer.SamplingParams(max_tokens=N, temperature=0.0),
                              use_tqdm=False)
        assert ref.text
        srv.wait_healthy(600)
        answers = {}
        with Client(srv.target) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
            # Three clients at once: one engine step serves all three.
            stream = pool.submit(lambda: list(client.stream(QUESTION, chat=True, max_tokens=N,
                                                            temperature=0.0)))
            whole = pool.submit(client.generate, QUESTION, chat=True, max_tokens=N,
                                temperature=0.0)
            cli = pool.submit(subprocess.run, [sys.executable, str(ROOT / "scripts" / "client.py"),
                                               QUESTION, "--chat", "--max-tokens", str(N),
                                               "--target", srv.target],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
            answers = {"stream": stream.result(), "whole": whole.result(), "cli": cli.result()}
            info = client.model_info()
        pieces = answers["stream"]
        assert "".join(p.text for p in pieces) == ref.text
        assert [t for p in pieces for t in p.token_ids] == ref.token_ids
        assert answers["whole"].text == ref.text and list(answers["whole"].token_ids) == ref.token_ids
        assert answers["cli"].returncode == 0, answers["cli"].stderr
        assert answers["cli"].stdout == ref.text + "\n"
        assert (info.model_family, info.vocab_size, info.context_length) == ("llama", 49152, 256)
    finally:
        assert srv.stop() == 0, srv.log()
