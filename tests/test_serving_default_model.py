"""End to end with the default model (SmolLM2-135M-Instruct): text in, the same text out of the
gRPC server, `scripts/client.py` and `LLM.generate`."""

from __future__ import annotations

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

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512, num_pages=64)
QUESTION = "Name a primary colour."


def test_default_model_text_matches_llm_generate(tmp_path):
    from jaxinfer.checkpoint import ensure_default_model

    ensure_default_model()  # converted here once, not by two processes at a time
    srv = ServerProcess(["--dtype=float32", *(f"--{k.replace('_', '-')}={v}"
                                              for k, v in ENGINE.items())], tmp_path / "server.log")
    try:
        model = jaxinfer.load_model(None, dtype="float32")  # meanwhile, the reference answers
        llm = jaxinfer.LLM(model=model, **ENGINE, warmup=False)
        params = jaxinfer.SamplingParams(max_tokens=24, temperature=0.0)
        chat_ids = encode_prompt(model.tokenizer, QUESTION, chat=True)
        chat_ref, plain_ref = llm.generate([chat_ids, "The capital of France is"], params,
                                           use_tqdm=False)
        srv.wait_healthy(600)
        with Client(srv.target) as client:
            pieces = list(client.stream(QUESTION, chat=True, max_tokens=24, temperature=0.0))
            assert "".join(p.text for p in pieces) == chat_ref.text and chat_ref.text
            assert [t for p in pieces for t in p.token_ids] == chat_ref.token_ids
            whole = client.generate("The capital of France is", max_tokens=24, temperature=0.0)
            assert whole.text == plain_ref.text and list(whole.token_ids) == plain_ref.token_ids
            info = client.model_info()
            assert (info.model_family, info.vocab_size) == ("llama", 49152)
        cli = subprocess.run([sys.executable, str(ROOT / "scripts" / "client.py"), QUESTION,
                              "--chat", "--max-tokens", "24", "--target", srv.target],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == chat_ref.text + "\n"
    finally:
        assert srv.stop() == 0, srv.log()
