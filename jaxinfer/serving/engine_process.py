"""The engine in its own process: `RemoteEngine` stands in for `Engine` behind `EngineLoop`.

    engine = RemoteEngine(options.served_engine, (load, load_args, config))  # once it is ready
    loop = EngineLoop(engine)                                        # the fronts as ever
    ...
    engine.close()                                                   # ends the child

Why: the engine's host work per step (~10 ms of Python) and the fronts' threads (gRPC, HTTP)
share one GIL in one process; at saturation the fronts then get little more than half of the
offline throughput. In a child process (multiprocessing "spawn") the engine has a GIL of its own.

The child builds the model and the Engine from a picklable spec (a function and its arguments),
sends "ready" with what the fronts read of the engine (tokenizer, configs, limits), then loops:
take every pending command ("add", "abort", "stop"; it blocks for one only when idle), step while
requests are unfinished, and send ONE message per iteration that did anything: the outputs
(requests it refused among them, as outputs of finish_reason "invalid") and the engine's counts.
An output crosses as what it adds (`_Delta`: new token ids, text delta, new logprobs, the prompt
ids once, the prompt's logprobs once): the parent keeps each request's tokens, text and logprobs
so far and rebuilds the engine's cumulative `RequestOutput`, so the bytes per step do not grow
with the outputs' length.
The parent reads those messages on a thread of their own; `step()` returns the outputs of all
that came since the last call. A dead child makes `step()` and `add_request()` raise
(`EngineProcessDied`), so EngineLoop fails the requests in flight and keeps answering. So does a
hung one: a child that sends nothing for `step_timeout` seconds while requests are in flight is
killed (a step, even one that compiles a program on first use, takes far less).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from jaxinfer.engine import RequestOutput
from jaxinfer.sampling import SamplingParams
from jaxinfer.serving.options import ENGINE_STEP_TIMEOUT

log = logging.getLogger("jaxinfer.serving")

INVALID = "invalid"  # finish_reason of a request the engine refused (its `error` says why)


class EngineProcessDied(RuntimeError):
    """The engine's process exited (or its pipe broke)."""


@dataclasses.dataclass
class RemoteModel:
    """What the fronts read of `engine.model`."""

    tokenizer: Any  # the model's tokenizer (pickled across), or None
    config: Any  # ModelConfig
    dtype: Any  # numpy / jnp dtype
    tensor_parallel_size: int


# -- the child ---------------------------------------------------------------------------------


def _child(conn, build: Callable, build_args: tuple, log_level: int) -> None:
    """The engine process: build, say "ready" (or why not), serve commands until "stop".

    It ignores SIGINT / SIGTERM (a terminal's Ctrl-C, or a service manager, signals the whole
    group): the parent drains its requests first, then says "stop"; if the parent dies, the
    pipe's end stops this process too."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s"
    )
    try:
        engine, path = build(*build_args)
    except ValueError as e:  # a bad path or option: one line for the user
        conn.send(("error", ValueError, str(e)))
        return
    except BaseException:  # noqa: BLE001 - told to the parent, which raises it
        conn.send(("error", RuntimeError, traceback.format_exc()))
        return
    model = engine.model
    info = dict(
        path=path,
        model=RemoteModel(model.tokenizer, model.config, model.dtype, model.tensor_parallel_size),
        config=engine.config,
        max_model_len=engine.max_model_len,
        num_pages=engine.num_pages,
        stats=engine.serving_stats(),
    )
    conn.send(("ready", info))
    try:
        _serve(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent went away


class _Delta(NamedTuple):
    """What one RequestOutput adds to its request's last (see the module docstring)."""

    request_id: str
    prompt_token_ids: list[int] | None  # with the request's first output only
    new_token_ids: list[int]
    text_delta: str
    new_logprobs: list[dict[int, float]] | None  # None: the request asked for none
    finished: bool
    finish_reason: str | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int
    error: str | None
    # the prompt's logprobs, with the first output that has them (the parent keeps them)
    prompt_logprobs: list | None = None


def _deltas(
    outputs: list[RequestOutput], sent: set[str], sent_prompt_lps: set[str] | None = None
) -> list[_Delta]:
    """The outputs as deltas; `sent`: requests whose prompt ids the parent has, and
    `sent_prompt_lps` those whose prompt logprobs it has (both kept here)."""
    deltas = []
    sent_prompt_lps = set() if sent_prompt_lps is None else sent_prompt_lps
    for out in outputs:
        rid, first = out.request_id, out.request_id not in sent
        if out.finished:
            sent.discard(rid)
        elif first:
            sent.add(rid)
        prompt_lps = out.prompt_logprobs if rid not in sent_prompt_lps else None
        if out.finished:
            sent_prompt_lps.discard(rid)
        elif prompt_lps is not None:
            sent_prompt_lps.add(rid)
        new = out.new_token_ids
        lps = out.logprobs
        deltas.append(
            _Delta(
                rid,
                out.prompt_token_ids if first else None,
                new,
                out.text_delta,
                None if lps is None else lps[len(out.token_ids) - len(new) :],
                out.finished,
                out.finish_reason,
                out.arrival_time,
                out.first_token_time,
                out.finish_time,
                out.num_cached_tokens,
                out.error,
                prompt_lps,
            )
        )
    return deltas


class _Progress:
    """The parent's copy of one request's prompt, tokens, text and logprobs so far."""

    __slots__ = ("prompt", "tokens", "text", "logprobs", "prompt_logprobs")

    def __init__(self, prompt: list[int]):
        self.prompt, self.tokens, self.text, self.logprobs = prompt, [], "", None
        self.prompt_logprobs = None

    def apply(self, d: _Delta) -> RequestOutput:
        self.tokens += d.new_token_ids
        self.text += d.text_delta
        if d.new_logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs += d.new_logprobs
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        return RequestOutput(
            request_id=d.request_id,
            prompt_token_ids=self.prompt,
            token_ids=list(self.tokens),
            text=self.text,
            finished=d.finished,
            finish_reason=d.finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            arrival_time=d.arrival_time,
            first_token_time=d.first_token_time,
            finish_time=d.finish_time,
            new_token_ids=d.new_token_ids,
            text_delta=d.text_delta,
            num_cached_tokens=d.num_cached_tokens,
            error=d.error,
            prompt_logprobs=self.prompt_logprobs,
        )


def _serve(conn, engine) -> None:
    """Commands in, one message of deltas and counts out per busy iteration, until "stop"."""
    sent_prompt: set[str] = set()  # requests whose prompt_token_ids the parent has
    sent_prompt_lps: set[str] = set()  # requests whose prompt logprobs the parent has
    faulted = False  # the last step raised: step again only once a request is added
    while True:
        busy = engine.has_unfinished_requests() and not faulted
        commands = [] if busy else [conn.recv()]
        while conn.poll():
            commands.append(conn.recv())
        outputs: list[RequestOutput] = []
        for command in commands:
            if command[0] == "stop":
                return
            if command[0] == "add":
                faulted = False
                _add(engine, command[1:], outputs)
            else:
                engine.abort(command[1])
        failure = None
        if engine.has_unfinished_requests() and not faulted:
            try:
                outputs += engine.step()
            except Exception as e:  # noqa: BLE001 - the parent fails the requests in flight
                log.exception("engine step failed")
                failure, faulted = f"{type(e).__name__}: {e}", True
        deltas = _deltas(outputs, sent_prompt, sent_prompt_lps)
        conn.send(("step", deltas, engine.serving_stats(), failure))


def _add(engine, command: tuple, outputs: list) -> None:
    """Adds a request; a refusal becomes its last output ("invalid", or "error" if not its
    fault)."""
    request_id, prompt, params = command
    try:
        engine.add_request(request_id, prompt, params)
    except Exception as e:  # noqa: BLE001 - told to the parent as this request's end
        reason = INVALID if isinstance(e, ValueError) else "error"
        if reason == "error":
            e = f"the engine failed to add the request: {e}"
        outputs.append(_ended(request_id, reason, str(e)))


def _ended(request_id: str, reason: str, error: str) -> RequestOutput:
    """The last output of a request the engine never ran."""
    return RequestOutput(
        request_id, [], [], "", True, reason, None, time.perf_counter(), None, None, error=error
    )


# -- the parent --------------------------------------------------------------------------------


class RemoteEngine:
    """An Engine in a child process, behind the calls EngineLoop makes (see the module docstring).

    Args:
      build: called in the child as `build(*build_args)`; returns (Engine, model path). Both must
        pickle (module-level functions), e.g. `options.served_engine` with (load, load_args, config).
      start_timeout: seconds to wait for "ready" (loading and warm-up), None: no limit.
      step_timeout: seconds `step()` waits for the child's next message while requests are in
        flight; past it the child is taken for hung and killed, and `step()` raises
        EngineProcessDied. None: no limit.

    Raises ValueError (the child's message) when the child could not build the engine for a bad
    option or path, RuntimeError (its traceback) for anything else.
    """

    stats_any_thread = True  # serving_stats() may be read from any thread (EngineLoop.stats)

    def __init__(
        self,
        build: Callable,
        build_args: tuple,
        start_timeout: float | None = None,
        step_timeout: float | None = ENGINE_STEP_TIMEOUT,
    ):
        if step_timeout is not None and not 0 < step_timeout < math.inf:
            raise ValueError(f"step_timeout must be a number of seconds > 0, got {step_timeout}")
        self.step_timeout = step_timeout
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child,
            args=(child, build, build_args, logging.getLogger().getEffectiveLevel()),
            name="jaxinfer-engine",
            daemon=True,
        )
        self._proc.start()
        child.close()  # the child's end lives only in the child: its death is our EOF
        try:
            info = self._ready(start_timeout)
        except BaseException:  # Ctrl-C during a minutes-long load too: the child ignores SIGINT
            self._proc.kill()  # still loading, it would not read a "stop"
            self._proc.join(5)
            self._conn.close()
            raise
        self.path: str = info["path"]
        self.model: RemoteModel = info["model"]
        self.config = info["config"]  # EngineConfig
        self.max_model_len: int = info["max_model_len"]
        self.num_pages: int = info["num_pages"]
        self._stats: dict = info["stats"]
        self._send_lock = threading.Lock()
        self._init_inbox()
        self._reader = threading.Thread(target=self._read, name="engine-pipe", daemon=True)
        self._reader.start()

    def _init_inbox(self) -> None:
        """The parent's state of the child's messages and of the requests in flight."""
        self._messages: queue.SimpleQueue = queue.SimpleQueue()  # ("step", ...) | ("died", why)
        self._unfinished: set[str] = set()  # added, not ended or aborted
        self._progress: dict[str, _Progress] = {}  # request id -> its outputs so far
        self._died: str | None = None
        self._failure: Exception | None = None  # raised by the step() after its outputs
        self._backlog: list[tuple] = []  # messages after a failure, read by the next step()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _ready(self, timeout: float | None) -> dict:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the engine process was not ready within {timeout}s")
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(
                f"the engine process exited while starting (exit code {self._proc.exitcode})"
            ) from None
        if message[0] == "error":
            self._proc.join(5)
            raise message[1](message[2])
        return message[1]

    def _read(self) -> None:
        """The reader thread: every message from the child onto `_messages`, then its death."""
        try:
            while True:
                message = self._conn.recv()
                self._stats = message[2]  # at once: an abort's freed pages show while idle
                self._messages.put(message)
        except (EOFError, OSError) as e:
            self._messages.put(("died", f"the engine process exited ({type(e).__name__})"))

    @property
    def dead(self) -> str | None:
        """Why the engine process can serve no more (it exited, or its pipe broke), else None."""
        if self._died is None and not self._proc.is_alive():
            return f"the engine process exited (exit code {self._proc.exitcode})"
        return self._died

    # -- what EngineLoop calls (its thread) ----------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> None:
        """Sends the request; never blocks on the engine. Its refusal comes back from step()."""
        self._send(("add", request_id, prompt, params))
        self._unfinished.add(request_id)

    def abort(self, request_id: str) -> None:
        """Forgets the request here and tells the child (which frees its pages)."""
        self._unfinished.discard(request_id)
        self._progress.pop(request_id, None)
        self._send(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[RequestOutput]:
        """Blocks for the child's next message, takes any more already here; their outputs.

        A failed step (or the child's death) raises, but not before the outputs that came
        ahead of it are returned: requests that ended before the failure keep their ends. Then
        the next call raises it, if requests are still unfinished (else nobody was failed)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        messages, self._backlog = self._backlog or [self._next_message()], []
        while not self._messages.empty():
            messages.append(self._messages.get_nowait())
        outputs: list[RequestOutput] = []
        for i, message in enumerate(messages):
            new, failure = self._receive(message)
            outputs += new
            if failure is not None:
                self._backlog = messages[i + 1 :]  # after the failure: for the next calls
                if not outputs:
                    raise failure
                if self._unfinished:
                    self._failure = failure
                break
        return outputs

    def _next_message(self) -> tuple:
        """The child's next message; after `step_timeout` seconds of silence, its death."""
        try:
            return self._messages.get(timeout=self.step_timeout)
        except queue.Empty:
            pass
        why = (
            f"the engine process sent nothing for {self.step_timeout:g} s with "
            f"{len(self._unfinished)} request(s) in flight (hung); it was killed"
        )
        log.error(why)
        self._proc.kill()
        return ("died", why)

    def serving_stats(self) -> dict:
        """The child's last counts (running, kv_pages_free, kv_pages_total, preemptions, steps)."""
        return self._stats

    # -- the rest ------------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        if self._died is not None:
            raise EngineProcessDied(self._died)
        try:
            with self._send_lock:
                self._conn.send(command)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            self._died = f"the engine process is gone ({type(e).__name__})"
            raise EngineProcessDied(self._died) from None

    def _receive(self, message: tuple) -> tuple[list[RequestOutput], Exception | None]:
        """A message's outputs (rebuilt from its deltas) and its failure: the child's death or a
        failed step."""
        if message[0] == "died":
            self._died = self._died or message[1]  # the first cause, not the EOF it led to
            self._messages.put(message)  # every later step() raises too
            return [], EngineProcessDied(message[1])
        _, deltas, _, failure = message
        return self._rebuild(deltas), None if failure is None else RuntimeError(failure)

    def _rebuild(self, deltas: list[_Delta]) -> list[RequestOutput]:
        outputs = []
        for d in deltas:
            rid = d.request_id
            progress = self._progress.get(rid)
            if progress is None or d.prompt_token_ids is not None:  # its first (or aborted here)
                progress = self._progress[rid] = _Progress(d.prompt_token_ids or [])
            outputs.append(progress.apply(d))
            if d.finished:
                self._unfinished.discard(rid)
                self._progress.pop(rid, None)
        return outputs

    def close(self, timeout: float = 30.0) -> None:
        """Stops the child ("stop", then SIGKILL if it does not exit within `timeout`)."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()  # it ignores SIGTERM
            self._proc.join(5)
        self._conn.close()
