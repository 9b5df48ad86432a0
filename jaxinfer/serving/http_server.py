"""The OpenAI-compatible HTTP front (Starlette on uvicorn) over the same engine loop as gRPC.

    python scripts/serve.py --http-port 8000            # gRPC on --port too; --no-grpc: HTTP only

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=8)

Routes: POST /v1/completions, POST /v1/chat/completions (the model's chat template), both with
`stream: true` as server-sent events ending in `data: [DONE]`; GET /v1/models; GET /health;
GET /metrics when metrics are on. Each prompt times `n` is one engine request; its choices are
numbered prompt * n + sample. A body is parsed here into SamplingParams, whose checks give the
400 messages, as the engine's do for what it refuses; a field of OpenAI's API (or vLLM's) that
the server does not implement is a 400 unless its value asks for nothing (`_UNSUPPORTED`), and
so is what the model's chat template refuses. /health is 503 while draining and once the engine
process has died.

`echo` (completions only, as OpenAI's and vLLM's): each choice's text begins with its prompt's
text (a text prompt as given, token ids decoded), in a stream in each choice's first chunk; with
`logprobs: n` too, its `logprobs` object begins with the prompt's tokens (the first one's
logprob and top_logprobs null, each other's from the engine's `prompt_logprobs`), and
`text_offset` adds up the tokens' texts from 0, the prompt's then the completion's, as vLLM's
does (where a text prompt's tokenizer adds a BOS, whose text the echoed prompt does not have,
they run ahead of the echoed text by that much). vLLM's `prompt_logprobs: n` (unary completions
only, as in vLLM) adds each choice's `prompt_logprobs`: null, then per prompt token {"<id>":
{"logprob", "rank", "decoded_token"}}, the token's own entry first, then the top n; a rank is
null where the engine does not know it (the prompt token's own, outside the top n).

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad values,
401 a missing or wrong bearer token (--api-key; /health and /metrics stay open), 404 an unknown
model, 413 a body over MAX_BODY_BYTES, 429 --max-queue full, 503 draining, 500 the engine failed.
A client that goes away mid-stream cancels its response, whose `finally` aborts its requests:
their pages are freed; one that goes away while a whole answer is made aborts it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxinfer.engine import RequestOutput
from jaxinfer.sampling import MAX_LOGPROBS, SamplingParams
from jaxinfer.scheduler import pool_tokens
from jaxinfer.serving.loop import MAX_REQUEST_ID_CHARS as MAX_ID
from jaxinfer.serving.loop import (
    Closed,
    EngineError,
    EngineLoop,
    QueueFull,
    RequestStream,
    check_prompt_logprobs,
)
from jaxinfer.serving.options import StartError
from jaxinfer.tokenizer import apply_chat_template, encode_prompt
from jaxinfer.validate import all_ints, as_bool, as_int, as_token_ids

# Body fields that go to SamplingParams under their own names (vLLM's extras included).
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "stop_token_ids",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
)


MAX_N = 128  # samples a prompt, as OpenAI's API allows
MAX_BODY_BYTES = 32 << 20  # a request body (a 128k-token prompt as JSON ids is ~1 MB)
MAX_CHOICES = 4096  # engine requests one call may make (prompts x n)

# Request fields of OpenAI's API (and vLLM's extras) this server does not implement, each with
# the values that ask for nothing: any other value is refused, never ignored.
_UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "use_beam_search": (None, False),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logits_processors": (None, []),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "parallel_tool_calls": (None, True, False),
    "reasoning_effort": (None,),
    "priority": (None, 0),
    "truncate_prompt_tokens": (None,),
    "verbosity": (None,),
    "prompt_cache_retention": (None,),
    "spaces_between_special_tokens": (None, True),
    "return_tokens_as_token_ids": (None, False),
}
# Fields of /v1/completions alone: a chat refuses them unless they ask for nothing (vLLM's chat
# `echo` repeats the last message, which this server does not do)
_COMPLETION_ONLY = {"echo": (None, False), "prompt_logprobs": (None,)}
# add_special_tokens asks for nothing at what each endpoint does: a completion's text gets
# them (BOS), a chat's template writes its own
_ADD_SPECIAL_TOKENS = {False: (None, True), True: (None, False)}  # by chat

# Every field a body may have (besides _SAMPLING and _UNSUPPORTED); any other is refused, so
# that a misspelt one (max_new_tokens) is not silently left at its default. The _TAGS name a
# request for its caller (short strings) and change nothing; metadata too.
_TAGS = ("user", "safety_identifier", "prompt_cache_key", "request_id")
_FIELDS = {"model", "n", "stream", "stream_options", "stop", "seed", "logprobs", "max_tokens"}
_FIELDS |= {"metadata", "add_special_tokens", "logit_bias", *_TAGS}
_COMPLETION_FIELDS = _FIELDS | {"prompt", *_COMPLETION_ONLY}
_CHAT_FIELDS = _FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
MAX_TAG_CHARS = MAX_ID
_THREAD_BYTES = 1 << 20  # bodies above this are decoded and checked off the event loop


class FieldError(ValueError):
    """A bad body field: its 400 names it as the error's param."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def refuse_unknown(body: dict, chat: bool) -> None:
    """FieldError naming the fields `body` has that this server does not know, or a tag that
    is not a short string."""
    known = (_CHAT_FIELDS if chat else _COMPLETION_FIELDS).union(
        _SAMPLING, _UNSUPPORTED, _COMPLETION_ONLY
    )
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise FieldError(
            unknown[0],
            f"unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k[:80]) for k in unknown[:8])}: not a field of OpenAI's "
            f"{'chat completions' if chat else 'completions'} API nor one of vLLM's this "
            "server knows",
        )
    for tag in _TAGS:
        value = body.get(tag)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TAG_CHARS):
            raise FieldError(tag, f"{tag} must be a string of at most {MAX_TAG_CHARS} characters")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise FieldError("stream_options", "stream_options is only allowed with stream: true")


def refuse_unsupported(body: dict, chat: bool) -> None:
    """FieldError naming the first field `body` sets that this server does not implement (on a
    chat: the completions' own fields too)."""
    fields = (*_UNSUPPORTED.items(), ("add_special_tokens", _ADD_SPECIAL_TOKENS[chat]))
    for name, no_op in (*fields, *(_COMPLETION_ONLY.items() if chat else ())):
        value = body.get(name)
        if name == "best_of" and value is not None and value == body.get("n"):
            continue  # the best of n samples, all returned: the n samples
        if not any(value == v and type(value) is type(v) for v in no_op):
            where = (
                "/v1/chat/completions (a field of /v1/completions only)"
                if name in _COMPLETION_ONLY
                else "this server"
            )
            raise FieldError(name, f"{name}={json.dumps(value)[:80]} is not supported by {where}")


class ApiError(Exception):
    """An error response: HTTP status, OpenAI error type and code, the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _api_error(e: Exception, body: dict | None = None) -> ApiError:
    """The response of an exception out of parsing, `submit` or a stream; a 400 names as its
    param the body's field its message begins with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValueError):  # SamplingParams' and the checks' messages begin with it
        field = re.match(r"[a-z_]+", str(e))
        param = field[0] if field and body and field[0] in body else None
        return ApiError(400, str(e), param=getattr(e, "param", param))
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, Closed):
        return ApiError(503, str(e), "service_unavailable_error", code="draining")
    if isinstance(e, EngineError):
        return ApiError(500, str(e), "internal_error")
    raise e


# ---------------------------------------------------------------------------------------------
# Requests: a body -> prompts and SamplingParams.


def sampling_params(
    body: dict,
    max_tokens: int | None,
    logprobs: int | None,
    sample: int,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's SamplingParams of an OpenAI body (unset fields: the engine's defaults).

    `sample` is the index among the `n` samples of a prompt: a body's `seed` seeds sample j with
    seed + j, so that the n samples differ and each is reproducible. `prompt_logprobs`: the top-n
    the engine takes of each prompt token (echo with logprobs, vLLM's prompt_logprobs).
    """
    fields = {k: body[k] for k in _SAMPLING if body.get(k) is not None}  # top_k -1: off
    if body.get("stop") is not None:
        fields["stop"] = body["stop"]  # a string or a list of them
    if body.get("logit_bias") is not None:
        if not isinstance(body["logit_bias"], dict):  # an object, as OpenAI's API has it
            raise FieldError(
                "logit_bias",
                "logit_bias must be an object of token id -> bias, got "
                f"{json.dumps(body['logit_bias'])[:80]}",
            )
        fields["logit_bias"] = body["logit_bias"]  # {"50256": -100}: ids as strings
    if body.get("seed") is not None:
        fields["seed"] = as_int("seed", body["seed"], 0) + sample
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if logprobs is not None:
        fields["logprobs"] = logprobs
    if prompt_logprobs is not None:
        fields["prompt_logprobs"] = prompt_logprobs
    return SamplingParams(**fields)


def _reseeded(params: SamplingParams, j: int) -> SamplingParams:
    """`params` with seed + j, its other (checked) fields as they are: not checked again."""
    if j == 0:
        return params
    out = copy.copy(params)  # no __init__: no checks
    object.__setattr__(out, "seed", params.seed + j)
    return out


def _has_text(prompt) -> bool:
    """A completions prompt with text to tokenize (not token ids alone)."""
    # the first item decides: a list mixing text and ids is refused on either path
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str)
    )


def _prompt_count(prompt) -> int:
    """How many prompts `prompt` holds (one string, one list of ids, or a list of those)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise FieldError(
            "prompt" if n == 1 else "n",
            f"{prompts} prompts x n={n} would make {prompts * n} requests "
            f"(at most {MAX_CHOICES} a call)",
        )


def completion_prompts(prompt) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all_ints(prompt):  # non-empty here
            return [as_token_ids("prompt", prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [as_token_ids(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
    raise ValueError(
        "prompt must be a string, a list of strings, a list of token ids or a list "
        f"of token-id lists, got {json.dumps(prompt)[:80]}"
    )


def chat_prompt(tokenizer, messages) -> list[int]:
    """Token ids of `messages` under the model's chat template, ready for the assistant's turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "\n".join(str(p.get("text", "")) for p in content)  # as vLLM joins
        if not isinstance(content, (str, type(None))):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        turn = {"role": m["role"], "content": content or ""}
        # what a template that knows tools reads (one that does not ignores them)
        for key, kind in (("name", str), ("tool_call_id", str), ("tool_calls", list)):
            if m.get(key) is None:
                continue
            if not isinstance(m[key], kind) or (
                kind is list and not all(isinstance(c, dict) for c in m[key])
            ):
                what = "a string" if kind is str else "a list of objects"
                raise ValueError(f"messages[{i}].{key} must be {what}")
            turn[key] = m[key]
        turns.append(turn)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: use /v1/completions with token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
    return apply_chat_template(tokenizer, turns)


def _optional_int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    return None if body.get(name) is None else as_int(name, body[name], low, high)


# ---------------------------------------------------------------------------------------------
# Responses: outputs -> OpenAI's objects.


class _Choice:
    """What one engine request has said so far, in the shape of one choice."""

    def __init__(
        self,
        index: int,
        prompt: int,
        stream: RequestStream,
        chat: bool,
        echo: str | None = None,
        prompt_logprobs: tuple[int, int] | None = None,
    ):
        self.index, self.prompt, self.stream, self.chat = index, prompt, stream, chat
        self.echo = echo  # the prompt's text its text begins with (echo), or None
        # vLLM's prompt_logprobs: (the top-n asked, the top-n the engine took), or None
        self.prompt_logprobs = prompt_logprobs
        self.text_len = 0  # characters sent so far (completions' text_offset)
        self.shift = 0  # the completion's text_offset past text_len (echo with logprobs)
        self.last: RequestOutput | None = None


def _delta(outputs: list[RequestOutput]) -> tuple[str, list[int], list[dict] | None]:
    """What consecutive outputs added: text, token ids, and those tokens' logprob dicts."""
    last = outputs[-1]
    text = "".join(o.text_delta for o in outputs)
    ids = [t for o in outputs for t in o.new_token_ids]
    lps = last.logprobs[len(last.logprobs) - len(ids) :] if last.logprobs is not None else None
    return text, ids, lps


class Formatter:
    """Builds OpenAI's response objects; token strings come from the tokenizer (or token_id:N)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        s = self._pieces.get(token)
        if s is None:
            s = (
                self.tokenizer.decode([token])
                if self.tokenizer is not None
                else f"token_id:{token}"
            )
            self._pieces[token] = s
        return s

    def logprobs(self, choice: _Choice, text_len: int, ids: list[int], lps, n: int) -> dict:
        """The `logprobs` object of `ids` (with `lps`, the engine's dicts), top `n` each."""
        tops = [_top(lp, n) for lp in lps]
        if choice.chat:

            def entry(t, v):
                s = self.piece(t)
                return {"token": s, "logprob": v, "bytes": list(s.encode())}

            return {
                "content": [
                    {**entry(t, lp[t]), "top_logprobs": [entry(a, b) for a, b in top]}
                    for t, lp, top in zip(ids, lps, tops)
                ]
            }
        tokens = [self.piece(t) for t in ids]
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
            "top_logprobs": [{self.piece(a): b for a, b in top} for top in tops],
            "text_offset": _offsets(tokens, text_len),
        }

    def prompt_logprobs(self, ids: list[int], lps: list | None, n: int) -> dict:
        """The completions `logprobs` object of the prompt's tokens (echo), offsets from 0:
        the first token's logprob and top_logprobs are null (nothing comes before it), as are
        every token's if the engine has none (`lps` None: a request ended before its prompt
        was computed)."""
        lps = lps if lps is not None else [None] * len(ids)
        tokens = [self.piece(t) for t in ids]
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(ids, lps)],
            "top_logprobs": [
                None if lp is None else {self.piece(a): b for a, b in _top(lp, n)} for lp in lps
            ],
            "text_offset": _offsets(tokens, 0),
        }

    def vllm_prompt_logprobs(self, ids: list[int], lps: list | None, n: int, taken: int):
        """vLLM's `prompt_logprobs` of a choice: null, then per prompt token {"<id>": {logprob,
        rank, decoded_token}}, the token's own entry first, then the top `n` in rank order. The
        engine took the top `taken` >= n: a token outside them has a rank it does not know
        (null)."""
        if lps is None:
            return None
        out: list = [None]
        for t, lp in zip(ids[1:], lps[1:]):
            own_in_top = len(lp) <= taken  # else: the top `taken`, and the token below them
            ranked = sorted(((a, b) for a, b in lp.items() if own_in_top or a != t), key=_value)
            rank = {a: i + 1 for i, (a, _) in enumerate(ranked)}
            entry = {str(t): self._vllm_logprob(t, lp[t], rank.get(t))}
            for a, b in ranked[:n]:
                entry.setdefault(str(a), self._vllm_logprob(a, b, rank[a]))
            out.append(entry)
        return out

    def _vllm_logprob(self, token: int, logprob: float, rank: int | None) -> dict:
        decoded = self.piece(token) if self.tokenizer is not None else None
        return {"logprob": logprob, "rank": rank, "decoded_token": decoded}

    def choice(
        self,
        choice: _Choice,
        outputs: list[RequestOutput],
        whole: bool,
        num_logprobs: int | None,
        first: bool = False,
    ) -> dict:
        """One choice (whole: the full answer; else a stream chunk's delta). With echo, the
        whole answer and a stream's first chunk begin with the prompt (its text, and its tokens'
        logprobs if asked)."""
        last = outputs[-1]
        if whole:
            text, ids, lps = last.text, last.token_ids, last.logprobs
        else:
            text, ids, lps = _delta(outputs)
        echo = choice.echo if whole or first else None
        out = {"index": choice.index}
        if choice.chat:
            key = "message" if whole else "delta"
            out[key] = (
                {"role": "assistant", "content": text}
                if whole or first
                else ({"content": text} if text else {})
            )
        else:
            text = text if echo is None else echo + text
            out["text"] = text
        logprobs = None
        if num_logprobs is not None and lps is not None:
            head = None
            if echo is not None:  # the prompt's tokens first, from offset 0
                prompt = last.prompt_token_ids
                head = self.prompt_logprobs(prompt, last.prompt_logprobs, num_logprobs)
                # As vLLM: offsets add up the tokens' texts, the prompt's then the completion's
                # (a text prompt's BOS has a text the echoed prompt does not: they then run
                # ahead of the text by that much, never back)
                choice.shift = sum(map(len, head["tokens"])) - len(echo)
            start = choice.text_len + (len(echo) if echo is not None else 0) + choice.shift
            logprobs = self.logprobs(choice, start, ids, lps, num_logprobs)
            if head is not None:
                logprobs = {k: head[k] + logprobs[k] for k in head}
        out["logprobs"] = logprobs
        out["finish_reason"] = last.finish_reason if last.finished else None
        if choice.prompt_logprobs is not None and whole:
            out["prompt_logprobs"] = self.vllm_prompt_logprobs(
                last.prompt_token_ids, last.prompt_logprobs, *choice.prompt_logprobs
            )
        choice.text_len += len(text)
        choice.last = last
        return out


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Each token's text_offset: `start`, then each token's text after the one before."""
    return list(itertools.accumulate(map(len, tokens), initial=start))[: len(tokens)]


def _value(item: tuple[int, float]) -> float:
    return -item[1]


def _top(lp: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely of an engine logprobs dict (the token's own entry and the top n, n + 1
    entries when it is not among them: the n largest are the top n)."""
    return sorted(lp.items(), key=_value)[:n]


def usage(choices: list[_Choice]) -> dict:
    """Exact token counts: each prompt once, every choice's tokens."""
    prompts = {c.prompt: len(c.last.prompt_token_ids) for c in choices if c.last is not None}
    completion = sum(len(c.last.token_ids) for c in choices if c.last is not None)
    return {
        "prompt_tokens": sum(prompts.values()),
        "completion_tokens": completion,
        "total_tokens": sum(prompts.values()) + completion,
    }


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# The app.


class _Plan(NamedTuple):
    """What a body asks of the engine, and of the answer's shape."""

    prompts: list[list[int]]  # token ids
    params: list[SamplingParams]  # one per sample index
    n: int
    logprobs: int | None  # the completions' top-n (None: no logprobs)
    echo: list[str] | None  # each prompt's text, its choices' text begins with (None: no echo)
    prompt_logprobs: tuple[int, int] | None  # vLLM's: (the top-n asked, the engine's top-n)


class OpenAIFront:
    """The routes' logic over one EngineLoop (see the module docstring)."""

    def __init__(
        self,
        loop: EngineLoop,
        model_name: str,
        api_key: str | None = None,
        metrics_text: Callable[[], bytes] | None = None,
    ):
        self.loop, self.model_name = loop, model_name
        self.tokenizer = loop.engine.model.tokenizer
        self.fmt = Formatter(self.tokenizer)
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics_text = metrics_text
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> tuple[dict, bool]:
        """(the body, whether it is large: checked off the event loop)."""
        self.check_auth(request)
        raw = await _read_body(request)
        large = len(raw) > _THREAD_BYTES
        try:
            body = await asyncio.to_thread(json.loads, raw) if large else json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: it nests too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return body, large

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "jaxinfer",
                    "max_model_len": self.loop.engine.max_model_len,
                }
            ],
        }

    # -- completions and chat ------------------------------------------------------------------

    def _plan(self, body: dict, chat: bool) -> _Plan:
        """The engine requests of a body (see _Plan); ValueError."""
        refuse_unknown(body, chat)
        refuse_unsupported(body, chat)
        n = _optional_int(body, "n", 1, MAX_N) or 1
        echo, prompt_logprobs, taken = False, None, None
        max_tokens = _optional_int(
            body,
            "max_completion_tokens"
            if chat and body.get("max_completion_tokens") is not None
            else "max_tokens",
            1,
        )
        if chat:
            prompts = [chat_prompt(self.tokenizer, body.get("messages"))]
            if max_tokens is None:  # the rest of the context, as vLLM does
                max_tokens = max(self._longest() - len(prompts[0]), 1)
            logprobs = None
            if body.get("logprobs") is not None and as_bool("logprobs", body["logprobs"]):
                logprobs = _optional_int(body, "top_logprobs", 0, MAX_LOGPROBS) or 0
            elif body.get("top_logprobs") is not None:
                raise ValueError("top_logprobs needs logprobs: true")
        else:
            if "prompt" not in body:
                raise FieldError("prompt", "prompt is required")
            _check_choices(_prompt_count(body["prompt"]), n)  # before a long list is converted
            prompts = completion_prompts(body["prompt"])
            logprobs = _optional_int(body, "logprobs", 0, MAX_LOGPROBS)
            echo = body.get("echo") is not None and as_bool("echo", body["echo"])
            prompt_logprobs = _optional_int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
            if prompt_logprobs is not None and body.get("stream") not in (None, False):
                raise FieldError(
                    "prompt_logprobs",
                    "prompt_logprobs is not available with stream: true (as in vLLM); "
                    "echo: true with logprobs streams the prompt's logprobs",
                )
            # the engine takes the prompt's logprobs only where they are returned: echo with
            # logprobs, or vLLM's field (such a request skips the prefix cache)
            wanted = [x for x in (logprobs if echo else None, prompt_logprobs) if x is not None]
            taken = max(wanted) if wanted else None
        # The echoed text: a text prompt as given, token ids decoded (special tokens kept), as
        # vLLM does; no tokenizer: no text, as the completions have none.
        texts = [(p if isinstance(p, str) else self._decode(p)) for p in prompts] if echo else None
        # Text is tokenized here, off the engine's thread, which then only checks the ids.
        prompts = [p if isinstance(p, list) else encode_prompt(self.tokenizer, p) for p in prompts]
        # Checked once (a 300-entry logit_bias, n = 128: 60 ms of checks on the event loop);
        # sample j differs only in its seed, seed + j where a seed is given
        try:
            check_prompt_logprobs(n * sum(map(len, prompts)), taken)
        except ValueError as e:
            field = "prompt_logprobs" if prompt_logprobs is not None else "echo"
            raise FieldError(field, str(e)) from None
        first = sampling_params(body, max_tokens, logprobs, 0, taken)
        params = [first if first.seed is None else _reseeded(first, j) for j in range(n)]
        asked = None if prompt_logprobs is None else (prompt_logprobs, taken)
        return _Plan(prompts, params, n, logprobs, texts, asked)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _longest(self) -> int:
        """The most tokens (prompt + output) one request may have: the context, or what the
        whole KV pool holds where that is less (the last token needs no page)."""
        engine = self.loop.engine
        return min(engine.max_model_len, pool_tokens(engine.num_pages, engine.config.page_size))

    def _submit(self, plan: _Plan, chat: bool, request_id: str) -> list[_Choice]:
        """One engine request per prompt and sample; on a refusal, aborts those already in."""
        choices: list[_Choice] = []
        try:
            for i, prompt in enumerate(plan.prompts):
                echo = plan.echo[i] if plan.echo is not None else None
                for j, p in enumerate(plan.params):
                    index = i * len(plan.params) + j
                    stream = self.loop.submit(prompt, p, f"{request_id}-{index}")
                    choices.append(_Choice(index, i, stream, chat, echo, plan.prompt_logprobs))
        except (QueueFull, Closed):
            self._abort(choices)
            raise
        return choices

    def _abort(self, choices: list[_Choice]) -> None:
        for c in choices:
            self.loop.abort(c.stream)

    async def create(self, request: Request, chat: bool) -> Response:
        """POST /v1/completions or /v1/chat/completions."""
        body: dict = {}
        try:
            body, large = await self.body(request)
            try:  # text is tokenized in a worker thread: neither this event loop nor the
                # engine's; token ids are checked at once (a thread's round trip, times a burst
                # of requests, delayed the first ones' admission), unless there are many
                if chat or large or _has_text(body.get("prompt")) or body.get("echo") is True:
                    plan = await asyncio.to_thread(self._plan, body, chat)  # echo: decodes
                else:
                    plan = self._plan(body, chat)
                logprobs = plan.logprobs
                stream = body.get("stream") is not None and as_bool("stream", body["stream"])
                include_usage = _include_usage(body.get("stream_options"))
            except ValueError:
                user = body.get("user")
                self.loop.refused(user if isinstance(user, str) and user else "-", "invalid")
                raise
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            choices = self._submit(plan, chat, rid)
        except Exception as e:  # noqa: BLE001 - _api_error re-raises what it does not know
            return _api_error(e, body).response()
        head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if not stream:
            return await self._whole(request, choices, head, logprobs, body)
        try:  # the first outputs (or the engine's refusal) before the 200 goes out
            firsts = await _unless_gone(request, _all(_first(c.stream) for c in choices))
        except Exception as e:  # noqa: BLE001
            self._abort(choices)
            return _api_error(e, body).response()  # the engine's refusal names the field
        if firsts is _GONE:  # while queued: nobody reads the stream
            self._abort(choices)
            return Response(status_code=499)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        return StreamingResponse(
            self._events(choices, firsts, head, logprobs, include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _whole(
        self,
        request: Request,
        choices: list[_Choice],
        head: dict,
        logprobs: int | None,
        body: dict,
    ) -> Response:
        try:
            finals = await _unless_gone(request, _all(_last(c.stream) for c in choices))
        except Exception as e:  # noqa: BLE001
            return _api_error(e, body).response()  # the engine's refusal names the field
        finally:  # the client went away or one failed: free the others' pages
            self._abort(choices)
        if finals is _GONE:  # nobody reads an answer
            return Response(status_code=499)
        answer = {
            **head,
            "choices": [
                self.fmt.choice(c, [out], True, logprobs) for c, out in zip(choices, finals)
            ],
            "usage": usage(choices),
        }
        return JSONResponse(answer)

    async def _events(
        self,
        choices: list[_Choice],
        firsts: list,
        head: dict,
        logprobs: int | None,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """The SSE body: one chunk per choice per wake-up, then usage if asked, then [DONE]."""
        try:
            async for i, batch in _merge(firsts):
                c = choices[i]
                chunk = self.fmt.choice(c, batch, False, logprobs, first=c.last is None)
                yield _sse(
                    {**head, "choices": [chunk], **({"usage": None} if include_usage else {})}
                )
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage(choices)})
        except (ValueError, EngineError, Closed) as e:
            yield _sse(_api_error(e).body())
        finally:  # a client that disconnected lands here too: free the pages now
            self._abort(choices)
        yield b"data: [DONE]\n\n"


def _include_usage(options) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ValueError(f"stream_options must be an object, got {json.dumps(options)[:80]}")
    return options.get("include_usage") is not None and as_bool(
        "stream_options.include_usage", options["include_usage"]
    )


async def _all(coroutines) -> list:
    """The coroutines' results; the first to raise cancels the others (their streams were
    aborted, so they would wait for ever)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES before it is all in memory."""
    too_large = ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_GONE = object()  # what _unless_gone returns when the client went away first


async def _unless_gone(request: Request, work: Awaitable):
    """`work`'s result, or _GONE (`work` cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else _GONE
    finally:
        task.cancel()
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away. The body was read, so the next ASGI message is
    the disconnect (Starlette watches for it only while a streamed response is sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(stream: RequestStream) -> tuple[AsyncIterator, list[RequestOutput]]:
    """(the stream's batch iterator, its first batch): raises what the stream raises first."""
    batches = stream.batches()
    return batches, await anext(batches)


async def _last(stream: RequestStream) -> RequestOutput:
    last = None
    async for batch in stream.batches():
        last = batch[-1]
    return last


async def _merge(firsts: list) -> AsyncIterator[tuple[int, list]]:
    """(choice position, output batch) of every stream as the batches come; `firsts` holds each
    stream's (batch iterator, first batch), yielded first."""
    for i, (_, batch) in enumerate(firsts):
        yield i, batch
    if len(firsts) == 1:  # one request (most calls): no queue, no task
        async for batch in firsts[0][0]:
            yield 0, batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, batches: AsyncIterator) -> None:
        try:
            async for batch in batches:
                await queue.put((i, batch, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [
        asyncio.create_task(pump(i, b))
        for i, (b, first) in enumerate(firsts)
        if not first[-1].finished
    ]
    try:
        left = len(tasks)
        while left:
            i, batch, error = await queue.get()
            if error is not None:
                raise error
            if batch is None:
                left -= 1
            else:
                yield i, batch
    finally:
        for t in tasks:
            t.cancel()


def create_app(front: OpenAIFront) -> Starlette:
    """The Starlette app of `front`'s routes (Starlette alone: FastAPI's per-request dependency
    and middleware layers cost a burst of requests ~0.1 ms each on the event loop)."""

    async def completions(request: Request) -> Response:
        return await front.create(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await front.create(request, chat=True)

    async def models(request: Request) -> Response:
        try:
            front.check_auth(request)
        except ApiError as e:
            return e.response()
        return JSONResponse(front.models())

    async def health(request: Request) -> Response:
        if front.loop.closed:
            return ApiError(
                503, "the server is shutting down", "service_unavailable_error", code="draining"
            ).response()
        if failure := front.loop.failure:  # for ever: a supervisor should restart the server
            return ApiError(503, failure, "internal_error", code="engine_dead").response()
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(front.metrics_text(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's 404 / 405 in OpenAI's shape (only routing raises HTTPException here)."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = ApiError(exc.status_code, message, code=code).response()
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if front.metrics_text is not None:
        routes.append(Route("/metrics", metrics, methods=["GET"]))

    async def server_error(request: Request, exc: Exception) -> Response:
        """Any other failure: a 500 in OpenAI's shape (Starlette then re-raises the exception,
        and uvicorn logs its traceback)."""
        return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error").response()

    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error}
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own handler drains every front."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(
    front: OpenAIFront,
    host: str,
    port: int,
    log_level: str = "warning",
    tls: tuple[str, str] | None = None,
) -> tuple[uvicorn.Server, asyncio.Task]:
    """Starts uvicorn on host:port in the running event loop; returns it and its task.

    Args:
      tls: (certificate file, key file) to serve HTTPS; None serves plain HTTP.
    """
    config = uvicorn.Config(
        create_app(front),
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # uvicorn logs why (the port is taken, say) and exits
            try:
                task.result()
            except SystemExit:
                pass
            raise StartError(f"HTTP cannot listen on {host}:{port} (see the log above)")
        await asyncio.sleep(0.02)
    return server, task
