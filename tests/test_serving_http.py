"""The OpenAI-compatible HTTP front as a real process on loopback, driven by the official `openai`
client, against `LLM.generate`.

One server (a tiny random model with a word-level tokenizer and a chat template, gRPC beside it on
the same engine loop) serves the module; the last test stops it by SIGTERM while a stream runs.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import build_hf_model
from serving_utils import ServerProcess

import jaxinfer
from jaxinfer.serving.client import auth_metadata
from jaxinfer.serving.proto import inference_pb2 as pb
from jaxinfer.serving.proto import inference_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")

KEY = "http-key-456"
ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=128, num_pages=96, max_model_len=256)
ENGINE_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()] + ["--dtype=float32"]
NAME = "tiny"
VOCAB = 320
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def save_word_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer: ids 0..V-4 are "w0".., then the chat roles; text is words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(ROLES))] + list(ROLES)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-http")
    build_hf_model("llama3", path)
    save_word_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("http")
    srv = ServerProcess(
        [
            "--model",
            str(tiny_path),
            *ENGINE_ARGS,
            "--http-port",
            "0",
            "--served-model-name",
            NAME,
            "--api-key",
            KEY,
            "--metrics-port",
            "0",
            "--max-queue",
            "24",
            "--grace-period",
            "60",
            "--no-warmup",
        ],
        d / "server.log",
    )
    try:
        srv.wait_healthy(240)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=KEY, max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="module")
def llm(tiny_path):
    model = jaxinfer.load_model(tiny_path, dtype="float32")
    return jaxinfer.LLM(model=model, **ENGINE, warmup=False)


def reference(llm, prompts, **sampling):
    return llm.generate(prompts, jaxinfer.SamplingParams(**sampling), use_tqdm=False)


def prompts(n, seed=0, length=(3, 20)):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(2, 310, rng.integers(*length)).tolist() for _ in range(n)]


def word(t: int) -> str:
    """Token t's text (the tokenizer's last ids are the chat roles)."""
    return f"w{t}" if t < VOCAB - len(ROLES) else ROLES[t - VOCAB + len(ROLES)]


def words(ids):
    return " ".join(map(word, ids))


def stats(server) -> pb.ModelInfoResponse:
    with server.channel() as channel:  # the gRPC front reads the same engine loop
        return pb_grpc.InferenceStub(channel).ModelInfo(
            pb.ModelInfoRequest(), metadata=auth_metadata(KEY), timeout=5
        )


def wait_all_pages_free(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        info = stats(server)
        if info.kv_pages_free == info.kv_pages_total and info.requests_running == 0:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def test_completions_unary_and_stream_equal_llm_generate(client, llm):
    ps = prompts(3)
    refs = reference(llm, ps, max_tokens=10, temperature=0.0, ignore_eos=True)
    # Token ids and text prompts, several at once: choices in prompt order, usage exact.
    for prompt in (ps, [words(p) for p in ps]):
        r = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert [c.text for c in r.choices] == [ref.text for ref in refs]
        assert {c.finish_reason for c in r.choices} == {"length"}
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            sum(map(len, ps)),
            30,
            sum(map(len, ps)) + 30,
        )
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=ps[0],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == refs[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ps[0])


def test_chat_unary_and_stream_equal_llm_generate(client, llm, tiny_path):
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7 w8 w9"}]
    ids = llm.engine.model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    (ref,) = reference(llm, [ids], max_tokens=12, temperature=0.0)
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_sampling_fields_logprobs_and_n(client, llm):
    (prompt,) = prompts(1, seed=1)
    sampling = dict(
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        min_p=0.01,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        ignore_eos=True,
        logprobs=3,
    )
    refs = reference(llm, [prompt, prompt], **{**sampling, "seed": 11}) + reference(
        llm, [prompt], **{**sampling, "seed": 12}
    )
    r = client.completions.create(
        model=NAME,
        prompt=prompt,
        n=2,
        seed=11,
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logprobs=3,
        extra_body=dict(top_k=40, min_p=0.01, repetition_penalty=1.1, ignore_eos=True),
    )
    # Sample j is seeded with seed + j: sample 0 is seed 11's answer, sample 1 seed 12's.
    assert [c.text for c in r.choices] == [refs[0].text, refs[2].text]
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"w{t}" for t in refs[0].token_ids]
    assert lp.token_logprobs == pytest.approx(
        [d[t] for d, t in zip(refs[0].logprobs, refs[0].token_ids)], abs=1e-5
    )
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "w3"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        stop=["w999"],
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy


def test_16_concurrent_streams(client, llm):
    ps = prompts(16, seed=2)
    refs = reference(llm, ps, max_tokens=16, temperature=0.0, ignore_eos=True)
    texts: dict[int, str] = {}

    def run(i):
        stream = client.completions.create(
            model=NAME,
            prompt=ps[i],
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == {i: ref.text for i, ref in enumerate(refs)}


def test_chat_default_max_tokens_fits_the_kv_pool():
    """A chat without max_tokens gets the rest of the context, or of what the whole KV pool
    holds where that is less (a long-context model on a small card), not a refusal."""
    from types import SimpleNamespace as NS

    from jaxinfer.serving.http_server import OpenAIFront

    engine = NS(model=NS(tokenizer=None), max_model_len=4096, num_pages=10, config=NS(page_size=16))
    front = OpenAIFront(NS(engine=engine), NAME)
    assert front._longest() == 161  # the last sampled token needs no page
    engine.num_pages = 1000
    assert front._longest() == 4096


def test_chat_text_with_a_lone_surrogate_is_refused(llm):
    """JSON may carry "\\ud800"; the tokenizer would fail on it with a TypeError (a 500)."""
    from jaxinfer.serving.http_server import chat_prompt

    tokenizer = llm.engine.model.tokenizer
    for messages, name in (
        ([{"role": "user", "content": "w5 \ud800"}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], "content"),
        ([{"role": "user", "content": "w5", "name": "\udfff"}], r"messages\[0\]\.name"),
    ):
        with pytest.raises(ValueError, match=name + " has a lone surrogate"):
            chat_prompt(tokenizer, messages)


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    client.completions.create(model=NAME, prompt=[5], max_tokens=2, extra_body={"ignore_eos": True})
    base = f"http://127.0.0.1:{server.http_port}"
    assert urllib.request.urlopen(f"{base}/health", timeout=5).status == 200
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert re.search(r'^jaxinfer_requests_total\{outcome="length"\} [1-9]', text, re.M)


BAD = {
    "temperature": (dict(temperature=-1), "temperature must be"),
    "top_p": (dict(top_p=0), "top_p must be a finite float32 number in (0.0, 1.0]"),
    "max_tokens": (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    "n": (dict(n=0), "n must be an integer in [1, 128]"),
    "n too large": (dict(n=10**8), "n must be an integer in [1, 128], got 100000000"),
    "too many choices": (dict(prompt=[[5]] * 40, n=128), "would make 5120 requests"),
    "echo": (dict(echo="yes"), "echo must be True or False, got 'yes'"),
    "response_format": (
        dict(extra_body={"response_format": {"type": "json_object"}}),
        "response_format=",
    ),
    "best_of": (dict(best_of=3), "best_of=3 is not supported"),
    "spaces_between_special_tokens": (
        dict(extra_body={"spaces_between_special_tokens": False}),
        "spaces_between_special_tokens=false is not supported",
    ),
    "prompt_logprobs": (
        dict(extra_body={"prompt_logprobs": 21}),
        "prompt_logprobs must be an integer in [0, 20], got 21",
    ),
    "suffix": (dict(suffix="x"), 'suffix="x" is not supported'),
    "logprobs": (dict(logprobs=99), "logprobs must be an integer in [0, 20]"),
    "prompt shape": (dict(prompt=[1, "a"]), "prompt must be a string"),
    "token outside the vocab": (dict(prompt=[5, 320]), "outside the vocabulary"),
    "too long": (dict(prompt=[5] * 300), "exceeds max_model_len (256)"),
    "unknown field": (dict(extra_body={"max_new_tokens": 5}), "unknown field 'max_new_tokens'"),
    "user": (dict(extra_body={"user": ["x"]}), "user must be a string"),
}


def test_bad_values_are_400_in_openai_shape(client):
    for name, (kw, message) in BAD.items():
        kw = {"prompt": [5, 6], "max_tokens": 2, **kw}
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                r = client.completions.create(model=NAME, stream=stream, **kw)
                list(r) if stream else None
            assert e.value.status_code == 400, name
            err = e.value.body
            assert set(err) >= {"message", "type", "param", "code"}, err
            assert message in err["message"], (name, err)
            if name in ("temperature", "max_tokens", "n", "logprobs", "user", "echo"):
                assert err["param"] == name, err
            if name == "prompt_logprobs":
                assert err["param"] == name, err
            if name == "unknown field":
                assert err["param"] == "max_new_tokens", err
    with pytest.raises(openai.BadRequestError) as e:  # usage chunks need a stream
        client.completions.create(
            model=NAME, prompt=[5], max_tokens=2, stream_options={"include_usage": True}
        )
    assert "stream_options is only allowed with stream: true" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    hello = [{"role": "user", "content": "w5"}]
    for kw, message in (
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools="),
        (dict(top_logprobs=2), "top_logprobs needs logprobs: true"),
        # completions' own fields (vLLM's chat `echo` means something else)
        (dict(extra_body={"echo": True}), "echo=true is not supported by /v1/chat/completions"),
        (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs=1 is not supported by /v1/chat"),
        (dict(messages=[{"role": "tool", "content": "w5"}]), "chat template refused"),
        (
            dict(messages=[{"role": "user", "content": "w5", "tool_calls": 5}]),
            "messages[0].tool_calls must be a list of objects",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": NAME, "messages": hello, **kw})
        assert message in e.value.body["message"], (kw, e.value.body)
    # the no-op values of those fields are taken
    tags = {"safety_identifier": "u1", "prompt_cache_key": "k", "metadata": {"a": "b"}}
    out = client.completions.create(
        model=NAME,
        prompt=[5, 6],
        max_tokens=2,
        best_of=2,
        n=2,
        extra_body={"min_tokens": 0, "add_special_tokens": True, "echo": False, **tags},
    )
    assert len(out.choices) == 2
    out = client.chat.completions.create(
        model=NAME, messages=hello, max_tokens=2, extra_body={"add_special_tokens": False, **tags}
    )
    assert out.choices[0].finish_reason == "length"


# vLLM's request options (SamplingParams' min_tokens, logit_bias, include_stop_str_in_output,
# skip_special_tokens): each bad value, with the message and the param of its 400.
BAD_OPTIONS = {
    "logit_bias key": ({"logit_bias": {"abc": 1}}, "logit_bias token id must be an integer"),
    "logit_bias negative key": ({"logit_bias": {"-1": 1}}, "got '-1'"),
    "logit_bias bias": ({"logit_bias": {"5": 101}}, "logit_bias[5] must be a finite float32 "),
    "logit_bias bias type": ({"logit_bias": {"5": "up"}}, "logit_bias[5] must be a finite"),
    "logit_bias entries": (
        {"logit_bias": {str(i): 1 for i in range(301)}},
        "logit_bias has 301 entries, more than 300",
    ),
    "logit_bias id twice": ({"logit_bias": {"5": 1, "05": 2}}, "gives token id 5 twice"),
    "logit_bias list": ({"logit_bias": [[5, 1]]}, "logit_bias must be an object"),
    "logit_bias id outside the vocab": (  # the engine's refusal
        {"logit_bias": {"320": 1}},
        "logit_bias: token id 320 is outside the vocabulary [0, 320)",
    ),
    "min_tokens above max_tokens": ({"min_tokens": 3}, "min_tokens (3) must be at most max_tokens"),
    "min_tokens negative": ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
    "min_tokens fraction": ({"min_tokens": 1.5}, "min_tokens must be an integer"),
    "skip_special_tokens": (
        {"skip_special_tokens": "yes"},
        "skip_special_tokens must be True or False, got 'yes'",
    ),
    "include_stop_str_in_output": (
        {"include_stop_str_in_output": 1},
        "include_stop_str_in_output must be True or False, got 1",
    ),
}


def test_bad_request_options_are_400_naming_the_param(client):
    hello = [{"role": "user", "content": "w5"}]
    for name, (extra, message) in BAD_OPTIONS.items():
        param = next(iter(extra))
        for chat in (False, True):
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as e:
                    if chat:
                        r = client.chat.completions.create(
                            model=NAME,
                            messages=hello,
                            max_tokens=2,
                            stream=stream,
                            extra_body=extra,
                        )
                    else:
                        r = client.completions.create(
                            model=NAME, prompt=[5, 6], max_tokens=2, stream=stream, extra_body=extra
                        )
                    list(r) if stream else None
                err = e.value.body
                assert e.value.status_code == 400, (name, chat, stream)
                assert message in err["message"], (name, err)
                assert err["param"] == param and err["type"] == "invalid_request_error", (name, err)


def test_request_options_reach_sampling_params(llm):
    """Both endpoints' bodies (as JSON gives them: logit_bias ids as strings) make engine
    requests with these values; unset or null means SamplingParams' default."""
    from types import SimpleNamespace as NS

    from jaxinfer.serving.http_server import OpenAIFront

    front = OpenAIFront(NS(engine=llm.engine), NAME)
    options = json.loads(
        '{"min_tokens": 3, "logit_bias": {"17": 100, "5": -2.5, "300": 0},'
        ' "include_stop_str_in_output": true, "skip_special_tokens": false}'
    )

    def fields(p):
        return p.min_tokens, p.logit_bias, p.include_stop_str_in_output, p.skip_special_tokens

    defaults = (0, (), False, True)
    for chat, body in (
        (False, {"prompt": [5, 6], "max_tokens": 8}),
        (True, {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 8}),
    ):
        plan = front._plan({**body, **options, "n": 2}, chat)
        assert plan.n == 2 and len(plan.params) == 2
        for p in plan.params:
            assert fields(p) == (3, ((5, -2.5), (17, 100.0)), True, False)
            assert p.max_tokens == 8 and p.prompt_logprobs is None
        for unset in ({}, dict.fromkeys(options), {"logit_bias": {}}):
            (p,) = front._plan({**body, **unset}, chat).params
            assert fields(p) == defaults, unset
        # what the other fields do is unchanged by them
        (p,) = front._plan({**body, **options, "temperature": 0}, chat).params
        assert p.temperature == 0 and p.max_tokens == 8 and p.min_tokens == 3


# ---- echo and prompt logprobs -----------------------------------------------------------------


def post_json(server, body: dict) -> dict:
    """POST `body` to /v1/completions as a plain JSON client does (lm-eval's requests)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {KEY}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def top_words(lp: dict, n: int) -> dict:
    """An engine logprobs dict's top n as the completions' top_logprobs: {word: logprob}."""
    return {word(t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:n]}


def test_echo_asks_the_engine_for_prompt_logprobs_only_with_logprobs(llm):
    """echo alone: the prompt's text only (no prompt logprobs, so no prefix-cache bypass); with
    logprobs n: the engine's prompt_logprobs n; vLLM's field: its own n, the larger taken."""
    from types import SimpleNamespace as NS

    from jaxinfer.serving.http_server import OpenAIFront

    front = OpenAIFront(NS(engine=llm.engine), NAME)
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "n": 2}
    for extra, want, echo in (
        ({}, None, None),
        ({"echo": False, "logprobs": 2}, None, None),
        ({"echo": True}, None, ["w5 w6 w7", "w8 w9"]),
        ({"echo": True, "logprobs": 0}, 0, ["w5 w6 w7", "w8 w9"]),
        ({"echo": True, "logprobs": 3}, 3, ["w5 w6 w7", "w8 w9"]),
        ({"prompt_logprobs": 2}, 2, None),
        ({"prompt_logprobs": 2, "echo": True, "logprobs": 5}, 5, ["w5 w6 w7", "w8 w9"]),
    ):
        plan = front._plan({**body, **extra}, False)
        assert [p.prompt_logprobs for p in plan.params] == [want, want], extra
        assert plan.echo == echo, extra
        asked = extra.get("prompt_logprobs")
        assert plan.prompt_logprobs == (None if asked is None else (asked, want)), extra
    # a text prompt is echoed as given, not as its tokens decode
    plan = front._plan({"prompt": ["w5  w6\tw7", "w8"], "echo": True}, False)
    assert plan.echo == ["w5  w6\tw7", "w8"] and plan.prompts == [[5, 6, 7], [8]]


def test_echo_prepends_the_prompt_unary_and_streamed(client, llm):
    ps = prompts(2, seed=11)
    refs = reference(llm, ps, max_tokens=6, temperature=0.0, ignore_eos=True)
    tokenizer = llm.engine.model.tokenizer
    for prompt in (ps, [words(p) for p in ps]):  # ids are decoded; text comes back as given
        r = client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            echo=True,
            n=2,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        for c in r.choices:
            p, ref = ps[c.index // 2], refs[c.index // 2]
            assert tokenizer.decode(p) == words(p)
            assert c.text == words(p) + ref.text and c.logprobs is None
        assert r.usage.prompt_tokens == sum(map(len, ps)) and r.usage.completion_tokens == 24
        chunks = list(
            client.completions.create(
                model=NAME,
                prompt=prompt,
                max_tokens=6,
                temperature=0,
                echo=True,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        for i, (p, ref) in enumerate(zip(ps, refs)):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
            assert mine[0].text.startswith(words(p))  # with the first chunk, as vLLM sends it
            assert not any(c.text.startswith(words(p)) for c in mine[1:] if c.text)
            assert "".join(c.text for c in mine) == words(p) + ref.text
    # without echo nothing changes
    r = client.completions.create(model=NAME, prompt=ps[0], max_tokens=6, temperature=0, echo=False)
    assert r.choices[0].text == refs[0].text


LOGPROBS_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def check_echo_logprobs(lp: dict, prompt: list[int], ref, n: int, text: str) -> None:
    """A choice's echoed `logprobs` (JSON) against LLM.generate's prompt_logprobs and logprobs."""
    k = len(prompt)
    assert lp["tokens"] == [word(t) for t in prompt + ref.token_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref.prompt_logprobs[i][prompt[i]] for i in range(1, k)]
    want += [d[t] for d, t in zip(ref.logprobs, ref.token_ids)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    tops = [top_words(d, n) for d in ref.prompt_logprobs[1:] + ref.logprobs]
    for got, top in zip(lp["top_logprobs"][1:], tops, strict=True):
        assert got.keys() == top.keys() and len(got) == n
        assert list(got.values()) == pytest.approx(list(top.values()), abs=1e-5)
    # offsets: each token's text after the one before, the prompt's then the completion's (as
    # vLLM's); the completion's text is the echoed text's end
    offsets = lp["text_offset"]
    pieces = [len(word(t)) for t in prompt + ref.token_ids]
    assert offsets == [sum(pieces[:i]) for i in range(len(pieces))]
    assert text == words(prompt) + ref.text


def test_echo_with_logprobs_begins_with_the_prompts_logprobs(client, llm):
    ps = prompts(2, seed=12, length=(5, 30))
    params = dict(max_tokens=4, temperature=0.0, logprobs=2, ignore_eos=True)
    refs = reference(llm, ps, prompt_logprobs=2, **params)
    plain = reference(llm, ps, **params)  # the engine's own logprobs, without prompt logprobs
    assert [r.token_ids for r in refs] == [r.token_ids for r in plain]
    for prompt in (ps, [words(p) for p in ps]):
        r = client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            logprobs=2,
            echo=True,
            extra_body={"ignore_eos": True},
        )
        for c, p, ref in zip(r.choices, ps, refs):
            lp = {f: getattr(c.logprobs, f) for f in LOGPROBS_FIELDS}
            check_echo_logprobs(lp, p, ref, 2, c.text)
        # streamed: the first chunk holds the prompt's text and logprobs
        chunks = list(
            client.completions.create(
                model=NAME,
                prompt=prompt[0],
                max_tokens=4,
                temperature=0,
                logprobs=2,
                echo=True,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        first = chunks[0].choices[0]
        k = len(ps[0])
        assert first.text.startswith(words(ps[0])) and len(first.logprobs.tokens) > k
        assert first.logprobs.text_offset[:k] == r.choices[0].logprobs.text_offset[:k]
        whole = r.choices[0].logprobs
        for field in ("tokens", "token_logprobs", "top_logprobs"):
            streamed = [x for c in chunks for x in getattr(c.choices[0].logprobs, field)]
            assert streamed == getattr(whole, field), field
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_lm_eval_loglikelihood_requests(server, llm):
    """lm-evaluation-harness's local-completions loglikelihood: a batch of context +
    continuation prompts (token ids, or strings with tokenized_requests=False), max_tokens 1,
    logprobs 1, echo, temperature 0; it reads token_logprobs[ctxlen:-1] and whether each equals
    its top_logprobs' max (is_greedy). Against LLM.generate's prompt_logprobs."""
    (context,) = prompts(1, seed=13, length=(9, 10))
    greedy = reference(llm, [context], max_tokens=3, temperature=0.0, ignore_eos=True)[0]
    continuations = [greedy.token_ids, [7, 300, 12], [context[0]]]
    requests = [(context, c) for c in continuations] + [(context[:4], context[4:])]
    tokens = [ctx + cont for ctx, cont in requests]
    ctxlens = [len(ctx) for ctx, _ in requests]
    refs = reference(llm, tokens, max_tokens=1, temperature=0.0, prompt_logprobs=1)
    want = []
    for toks, ctxlen, ref in zip(tokens, ctxlens, refs):
        lps = [ref.prompt_logprobs[i] for i in range(ctxlen, len(toks))]
        logprob = sum(lp[t] for lp, t in zip(lps, toks[ctxlen:]))
        want.append((logprob, all(lp[t] == max(lp.values()) for lp, t in zip(lps, toks[ctxlen:]))))
    assert [g for _, g in want] == [True, False, False, False]  # the greedy continuation
    for prompt in (tokens, [words(t) for t in tokens]):
        out = post_json(
            server,
            {
                "model": NAME,
                "prompt": prompt,
                "temperature": 0,
                "max_tokens": 1,
                "logprobs": 1,
                "seed": 1234,
                "echo": True,
            },
        )
        got = []  # lm_eval.models.openai_completions.LocalCompletionsAPI.parse_logprobs
        for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
            token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = all(t == max(top.values()) for t, top in zip(token_logprobs, top_logprobs))
            got.append((sum(token_logprobs), is_greedy))
        assert [g for _, g in got] == [g for _, g in want]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in want], abs=1e-4)
        for choice, toks, ref in zip(out["choices"], tokens, refs):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(toks) + 1 and lp["token_logprobs"][0] is None
            assert lp["token_logprobs"][1:-1] == pytest.approx(
                [ref.prompt_logprobs[i][toks[i]] for i in range(1, len(toks))], abs=1e-5
            )


def test_vllm_prompt_logprobs_field(server, llm):
    """vLLM's `prompt_logprobs: n` on /v1/completions: each choice's prompt_logprobs is null,
    then {"<id>": {logprob, rank, decoded_token}}: the prompt token's own entry first (its rank
    where it is among the top), then the top n by rank. Refused with stream: true, as in vLLM."""
    ps = prompts(2, seed=14)
    (ref,) = reference(llm, [ps[0]], max_tokens=2, temperature=0.0, prompt_logprobs=3)
    for extra, echoed in (({}, False), ({"echo": True, "logprobs": 1}, True)):
        out = post_json(
            server,
            {"prompt": ps[0], "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2, **extra},
        )
        choice = out["choices"][0]
        assert choice["text"].startswith(words(ps[0])) == echoed
        plps = choice["prompt_logprobs"]
        assert len(plps) == len(ps[0]) and plps[0] is None
        for i, (entry, lp) in enumerate(zip(plps[1:], ref.prompt_logprobs[1:]), 1):
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])
            ids = [ps[0][i]] + [t for t, _ in ranked[:2] if t != ps[0][i]]
            assert list(entry) == [str(t) for t in ids]
            for t in ids:
                # the server took the top 2: a rank beyond them it does not know
                rank = next((r + 1 for r, (a, _) in enumerate(ranked[:2]) if a == t), None)
                assert entry[str(t)]["logprob"] == pytest.approx(lp[t], abs=1e-5)
                assert (entry[str(t)]["rank"], entry[str(t)]["decoded_token"]) == (rank, word(t))
        if echoed:  # the echo's top_logprobs keep their own n
            assert all(len(t) == 1 for t in choice["logprobs"]["top_logprobs"][1:])
    with pytest.raises(urllib.error.HTTPError) as e:
        post_json(server, {"prompt": ps[0], "prompt_logprobs": 1, "stream": True})
    error = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and error["param"] == "prompt_logprobs"
    assert "not available with stream: true" in error["message"]


def first_words(client, prompt, n, **extra):
    """The greedy completion's words (ignore_eos) and its usage."""
    r = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )
    return r.choices[0].text.split(), r.usage.completion_tokens


def test_logit_bias_steers_every_greedy_token(client):
    (prompt,) = prompts(1, seed=8)
    plain, count = first_words(client, prompt, 6)
    assert count == 6 and len(plain) == 6  # no special token (w0) among them
    target = next(i for i in range(5, 300) if f"w{i}" not in plain)
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text.split() == [f"w{target}"] * 6
    assert r.usage.completion_tokens == 6
    banned, _ = first_words(client, prompt, 6, logit_bias={str(plain[0][1:]): -100})
    assert banned[0] != plain[0]  # -100: the greedy first token never comes
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": words(prompt)}],
        max_tokens=4,
        temperature=0,
        logit_bias={str(target): 100},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text.split() == [f"w{target}"] * 4


def test_min_tokens_holds_off_a_stop_id(client):
    """The tiny model has no EOS: its first greedy token, made a stop id, ends a request at
    once, unless min_tokens keeps it from being sampled."""
    (prompt,) = prompts(1, seed=9)
    plain, _ = first_words(client, prompt, 8)
    assert len(plain) == 8  # no special token (w0) among them
    first = int(plain[0][1:])
    body = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    r = client.completions.create(**body, extra_body={"stop_token_ids": [first]})
    assert (r.choices[0].text, r.usage.completion_tokens) == ("", 1)
    assert r.choices[0].finish_reason == "stop"
    for chat in (False, True):
        extra = {"stop_token_ids": [first], "min_tokens": 4}
        if chat:
            r = client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": words(prompt)}],
                max_tokens=8,
                temperature=0,
                extra_body=extra,
            )
            text = r.choices[0].message.content
        else:
            r = client.completions.create(**body, extra_body=extra)
            text = r.choices[0].text
        assert r.usage.completion_tokens >= 4, r
        assert len(text.split()) >= 4 and f"w{first}" not in text.split(), text
        if r.usage.completion_tokens < 8:
            assert r.choices[0].finish_reason == "stop"


def test_include_stop_str_in_output_and_skip_special_tokens(client):
    (prompt,) = prompts(1, seed=10)
    plain, _ = first_words(client, prompt, 8)
    assert len(plain) == 8  # no special token (w0) among them
    body = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    # a stop id's text: left out by default, kept when asked
    first = int(plain[0][1:])
    for include, text in ((False, ""), (True, plain[0])):
        r = client.completions.create(
            **body,
            extra_body={"stop_token_ids": [first], "include_stop_str_in_output": include},
        )
        assert (r.choices[0].text.strip(), r.choices[0].finish_reason) == (text, "stop")
    # a stop string: the text up to it, and with it when asked (streamed the same)
    stop = plain[2]
    cut = client.completions.create(**body, stop=[stop]).choices[0]
    kept = client.completions.create(
        **body, stop=[stop], extra_body={"include_stop_str_in_output": True}
    ).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text.endswith(stop) and cut.text == kept.text[: -len(stop)], (cut, kept)
    streamed = client.completions.create(
        **body, stop=[stop], stream=True, extra_body={"include_stop_str_in_output": True}
    )
    assert "".join(c.choices[0].text for c in streamed) == kept.text
    # w0 is the tokenizer's unk and pad token: special, left out of the text unless asked
    pad = {"logit_bias": {"0": 100}}
    assert first_words(client, prompt, 3, **pad) == ([], 3)
    assert first_words(client, prompt, 3, **pad, skip_special_tokens=False) == (["w0"] * 3, 3)
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "w5"}],
        max_tokens=3,
        temperature=0,
        extra_body={**pad, "skip_special_tokens": False, "ignore_eos": True},
    )
    assert chat.choices[0].message.content.split() == ["w0"] * 3


def test_auth_model_and_queue_errors(client, server):
    base = f"http://127.0.0.1:{server.http_port}/v1"
    with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model=NAME, prompt=[5], max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    no_key = urllib.request.Request(f"{base}/completions", method="POST", data=b'{"prompt": [5]}')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(no_key, timeout=10)
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=[5], max_tokens=2)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]
    # --max-queue 24, 16 requests a step: 40 requests in one call overflow the queue.
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=NAME, prompt=[[5, 6]] * 40, max_tokens=2)
    assert "--max-queue" in e.value.body["message"]
    wait_for_log(server, r"request cmpl-\w+-\d+: abort", 24)  # the 24 admitted: aborted
    wait_all_pages_free(server)


def test_unknown_routes_and_methods_are_errors_in_openai_shape(server):
    base = f"http://127.0.0.1:{server.http_port}"
    for path, method, status in (
        ("/v1/embeddings", "POST", 404),
        ("/v1/completions", "GET", 405),
        ("/health", "POST", 405),
    ):
        request = urllib.request.Request(base + path, method=method, data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == status, path
        error = json.loads(e.value.read())["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert path in error["message"] and error["code"] == (
            "not_found" if status == 404 else "method_not_allowed"
        ), error


def wait_for_log(server, pattern, count=1, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, server.log())) < count:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def post_raw(server, body: dict | bytes, length: int | None = None) -> socket.socket:
    """A connection on which `body` was posted to /v1/completions (no reply read yet), under
    a content-length of `length` (default: the body's)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEY}\r\n".encode()
        + f"content-length: {len(data) if length is None else length}\r\n\r\n".encode()
        + data
    )
    return s


def long_request(seed: int, **fields) -> dict:
    (prompt,) = prompts(1, seed=seed)
    return dict(model=NAME, prompt=prompt, max_tokens=230, temperature=0, ignore_eos=True, **fields)


def test_a_deeply_nested_body_is_400(server):
    body = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with post_raw(server, body) as s:
        reply = b""
        while b"nests too deeply" not in reply and (piece := s.recv(4096)):
            reply += piece
    assert reply.startswith(b"HTTP/1.1 400") and b"nests too deeply" in reply, reply


def test_a_body_too_large_is_413_before_it_is_read(server):
    with post_raw(server, b'{"prompt": "', length=10**9) as s:
        reply = b""  # headers and body may come in two segments
        while b"body_too_large" not in reply and (piece := s.recv(4096)):
            reply += piece
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply, reply


def test_disconnect_mid_stream_frees_pages(server):
    with post_raw(server, long_request(3, stream=True)) as s:
        got = b""
        while got.count(b"data: ") < 3 and (piece := s.recv(4096)):
            got += piece
        assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") >= 3, got
        info = stats(server)
        assert info.kv_pages_free < info.kv_pages_total  # the request holds pages now
    wait_all_pages_free(server)
    wait_for_log(server, r"request cmpl-\w+-0: abort, \d+ tokens in \(\d+ cached\), [1-9]")


def test_disconnect_before_the_answer_frees_pages(server):
    """A client that goes away while its whole (non-streamed) answer is made aborts it."""
    with post_raw(server, long_request(4)):
        deadline = time.monotonic() + 30
        while (info := stats(server)).kv_pages_free == info.kv_pages_total:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
    wait_all_pages_free(server)
    wait_for_log(server, r"request cmpl-\w+-0: abort, \d+ tokens in \(\d+ cached\), [1-9]")


def test_a_stream_whose_client_leaves_while_queued_is_aborted_at_once(server):
    """The 200 of a stream waits for its first output; a client gone before it is not left
    queued until then (its prefill would be made for nobody)."""
    with post_raw(server, long_request(6, stream=True, n=16)) as busy:  # every seat taken
        assert busy.recv(12) == b"HTTP/1.1 200"
        post_raw(server, long_request(7, stream=True)).close()
        wait_for_log(server, r"request cmpl-\w+-0: abort, [1-9]\d* tokens in \(0 cached\), 0 out")
    wait_all_pages_free(server)


def test_draining_is_503_and_the_streams_in_flight_finish(client, server, llm):
    """Last in the module: SIGTERM stops its server (the fixture checks exit code 0)."""
    (prompt,) = prompts(1, seed=5, length=(8, 9))
    (ref,) = reference(llm, [prompt], max_tokens=240, temperature=0.0, ignore_eos=True)
    # 16 samples of 240 tokens: the drain lasts a good many steps after SIGTERM.
    stream = client.completions.create(
        model=NAME,
        prompt=prompt,
        n=16,
        max_tokens=240,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [next(iter(stream))]
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=NAME, prompt=[5], max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "draining"
    chunks += list(stream)
    texts = [
        "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(16)
    ]
    assert texts == [ref.text] * 16
    assert sum(c.choices[0].finish_reason == "length" for c in chunks) == 16
    assert server.proc.wait(60) == 0, server.log()


def test_prompt_logprobs_a_call_may_ask_are_bounded(llm, monkeypatch):
    """Prompt tokens x (top-n + 1) over a body's requests (n samples each take their own) are
    at most MAX_PROMPT_LOGPROB_ENTRIES: a 400 naming the field asked."""
    from types import SimpleNamespace as NS

    from jaxinfer.serving import loop
    from jaxinfer.serving.http_server import FieldError, OpenAIFront

    monkeypatch.setattr(loop, "MAX_PROMPT_LOGPROB_ENTRIES", 100)
    front = OpenAIFront(NS(engine=llm.engine), NAME)
    body = {"prompt": [5] * 10, "max_tokens": 1, "echo": True, "logprobs": 4}
    assert front._plan({**body, "n": 2}, False).params[0].prompt_logprobs == 4  # 2 x 10 x 5
    with pytest.raises(FieldError, match="are 120 entries, more than 100") as e:
        front._plan({**body, "n": 2, "logprobs": 5}, False)
    assert e.value.param == "echo"
    with pytest.raises(FieldError) as e:
        front._plan({"prompt": [[5] * 10] * 3, "max_tokens": 1, "prompt_logprobs": 3}, False)
    assert e.value.param == "prompt_logprobs"
    plain = front._plan({"prompt": [[5] * 10] * 3, "max_tokens": 1, "logprobs": 20}, False)
    assert plain.params[0].prompt_logprobs is None  # echo alone takes no prompt logprobs
