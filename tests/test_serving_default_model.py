"""End to end with the default model (SmolLM2-135M-Instruct): text in, the same text out of the
gRPC server, `scripts/client.py`, the OpenAI HTTP front (chat template) and `LLM.generate`."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import pytest
from serving_utils import ROOT, ServerProcess

import jaxinfer
from jaxinfer.serving.client import Client
from jaxinfer.tokenizer import encode_prompt

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
    srv = ServerProcess(
        [
            "--dtype=float32",
            "--http-port",
            "0",
            "--served-model-name",
            "smol",
            "--no-warmup",  # compiled on first use (test_serving_grpc's server warms up)
            *(f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()),
        ],
        tmp_path / "server.log",
    )
    try:
        model = jaxinfer.load_model(None, dtype="float32")  # meanwhile, the reference answer
        llm = jaxinfer.LLM(model=model, **ENGINE, warmup=False)
        chat_ids = encode_prompt(model.tokenizer, QUESTION, chat=True)
        (ref,) = llm.generate(
            [chat_ids], jaxinfer.SamplingParams(max_tokens=N, temperature=0.0), use_tqdm=False
        )
        assert ref.text
        srv.wait_healthy(600)
        answers = {}
        with Client(srv.target) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            # Four clients at once: one engine step serves all four.
            stream = pool.submit(
                lambda: list(client.stream(QUESTION, chat=True, max_tokens=N, temperature=0.0))
            )
            whole = pool.submit(client.generate, QUESTION, chat=True, max_tokens=N, temperature=0.0)
            cli = pool.submit(
                subprocess.run,
                [
                    sys.executable,
                    str(ROOT / "scripts" / "client.py"),
                    QUESTION,
                    "--chat",
                    "--max-tokens",
                    str(N),
                    "--target",
                    srv.target,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=ROOT,
            )
            chat = pool.submit(openai_chat, srv.http_port, QUESTION)
            answers = {
                "stream": stream.result(),
                "whole": whole.result(),
                "cli": cli.result(),
                "chat": chat.result(),
            }
            info = client.model_info()
        pieces = answers["stream"]
        assert "".join(p.text for p in pieces) == ref.text
        assert [t for p in pieces for t in p.token_ids] == ref.token_ids
        assert (
            answers["whole"].text == ref.text and list(answers["whole"].token_ids) == ref.token_ids
        )
        assert answers["cli"].returncode == 0, answers["cli"].stderr
        assert answers["cli"].stdout == ref.text + "\n"
        if answers["chat"] is not None:
            assert answers["chat"].choices[0].message.content == ref.text
            assert answers["chat"].usage.prompt_tokens == len(chat_ids)
        assert (info.model_family, info.vocab_size, info.context_length) == ("llama", 49152, 256)
    finally:
        assert srv.stop() == 0, srv.log()


def openai_chat(port: int, question: str):
    """The question through the official `openai` client's chat API (None if it is not installed)."""
    try:
        import openai
    except ImportError:
        return None
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=300
    ) as client:
        return client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": question}],
            max_tokens=N,
            temperature=0,
        )
