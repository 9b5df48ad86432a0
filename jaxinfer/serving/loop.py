"""The engine loop: one thread owns the `Engine`; any number of front ends (gRPC, HTTP) share it.

    loop = EngineLoop(engine, max_queue=1024, observer=metrics.observe)
    loop.start()
    stream = loop.submit(prompt, SamplingParams(...))  # returns at once; QueueFull / Closed
    for out in stream: ...                             # RequestOutputs, the last one finished
    async for outs in stream.batches(): ...            # the same from asyncio, all pending at once
    loop.abort(stream)                                 # the client went away: pages freed now
    loop.stats()                                       # running / waiting / KV pages, for ModelInfo
    loop.refused(request_id, "invalid")                # a front refused it: counted all the same
    loop.close(); loop.drain(grace_s); loop.stop()     # refuse new requests, finish, end the thread

Only the loop thread calls `engine.add_request`, `step` and `abort`; other threads put commands on
its queue, and it blocks on that queue when no request is left, so an idle server does not spin.
After every step it puts each output on its request's stream and wakes the readers: one wake-up
per asyncio event loop per step, however many of its requests moved.

A stream ends with a finished RequestOutput, or raises: `ValueError` for a request the engine
refused (its message says why), `EngineError` when the engine failed while running it, `Closed`
when the loop stopped before it finished. A failing step never ends the loop: the requests in it
fail and the next requests are served.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from jaxinfer.engine import Engine, RequestOutput
from jaxinfer.sampling import SamplingParams

log = logging.getLogger("jaxinfer.serving")


# A caller's name for a request, echoed in its responses and logs: both fronts bound it.
MAX_REQUEST_ID_CHARS = 256
# Prompt logprobs one call may ask for, prompt tokens x (top-n + 1) over its requests: each is a
# dict entry on the engine's host (~110 bytes) and ~12 bytes of a gRPC answer (12 MB at most).
MAX_PROMPT_LOGPROB_ENTRIES = 1 << 20


def check_prompt_logprobs(num_tokens: int, top: int | None) -> None:
    """ValueError where `num_tokens` prompt tokens' logprobs, top `top` each, are too many."""
    if top is None:
        return
    entries = num_tokens * (top + 1)
    if entries > MAX_PROMPT_LOGPROB_ENTRIES:
        raise ValueError(
            f"prompt logprobs of {num_tokens} prompt tokens, top {top} each, are {entries} "
            f"entries, more than {MAX_PROMPT_LOGPROB_ENTRIES} a call: ask fewer tokens or a "
            "smaller top-n"
        )


class QueueFull(Exception):
    """More requests are waiting for their first token than `max_queue` allows."""


class Closed(Exception):
    """The loop takes no new requests (draining or stopped)."""


class EngineError(RuntimeError):
    """The engine failed while running the request."""


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """A snapshot of the engine's state, taken by the loop thread after every step or command."""

    running: int = 0  # requests holding KV pages
    waiting: int = 0  # requests submitted and not running (queued, or preempted)
    kv_pages_total: int = 0
    kv_pages_free: int = 0
    preemptions: int = 0  # since start
    steps: int = 0  # since start


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """How one request ended, for the log and the metrics (times in seconds, None if no token).

    outcome: the finish reason ("stop", "length", "abort") or "invalid" (refused by the engine),
    "error" (engine failure), "rejected" (queue full), "unavailable" (loop closed).
    """

    request_id: str
    outcome: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None


class RequestStream:
    """One request's outputs, put by the loop thread, read by one consumer (thread or task)."""

    def __init__(self, request_id: str, engine_id: str):
        self.request_id = request_id  # the caller's name for it
        self.engine_id = engine_id  # unique inside the engine, whatever the callers chose
        self.submit_time = time.perf_counter()
        self.done = False  # the consumer took the last item
        self._items: collections.deque = collections.deque()  # RequestOutput | BaseException
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        # Loop-thread bookkeeping.
        self._counted = True  # still counted against max_queue
        self._last: RequestOutput | None = None  # the last output put
        self._prompt_len = 0  # of an admitted prompt of ids: recorded if it ends before an output

    # -- the loop thread -----------------------------------------------------------------------

    def _put(self, item) -> tuple | None:
        """Adds an item; returns the asyncio waiter to wake, if a task waits."""
        with self._lock:
            self._items.append(item)
            self._ready.notify()
            waiter, self._waiter = self._waiter, None
        return waiter

    # -- the consumer --------------------------------------------------------------------------

    def _take(self, items: list) -> list[RequestOutput]:
        """Outputs up to the end; an error among them is raised once those before it are
        taken (by the next call: they were made before it, and are the caller's)."""
        for i, item in enumerate(items):
            if isinstance(item, BaseException):
                if i:
                    with self._lock:
                        self._items.extendleft(reversed(items[i:]))
                    return items[:i]
                self.done = True
                raise item
            if item.finished:
                self.done = True
                return items[: i + 1]
        return items

    def __iter__(self) -> Iterator[RequestOutput]:
        """Blocks for each output in turn, to the finished one."""
        while not self.done:
            with self._lock:
                self._ready.wait_for(lambda: self._items)
                items = list(self._items)
                self._items.clear()
            yield from self._take(items)

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """Yields every output pending at each wake-up (in order), to the finished one."""
        loop = asyncio.get_running_loop()
        while not self.done:
            with self._lock:
                items = list(self._items)
                self._items.clear()
                if not items:
                    future = loop.create_future()
                    self._waiter = (loop, future)
            if items:
                yield self._take(items)
            else:
                await future

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for outputs in self.batches():
            for out in outputs:
                yield out


def _wake(futures: list) -> None:
    for future in futures:
        if not future.done():  # its task may have been cancelled
            future.set_result(None)


class EngineLoop:
    """Runs one `Engine` on its own thread for many concurrent callers (see the module docstring).

    Args:
      engine: the engine (or a `RemoteEngine`, jaxinfer/serving/engine_process.py); nothing
        else may call it once `start()` has been called.
      max_queue: most requests submitted but without a first token yet; past it `submit` raises
        QueueFull. None: no limit.
      observer: called on the loop thread with a RequestRecord when each request ends (and on
        the caller's thread for requests refused at `submit`); must be quick.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int | None = None,
        observer: Callable[[RequestRecord], None] | None = None,
    ):
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.observer = observer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, RequestStream] = {}  # engine id -> stream; loop thread only
        self._ids = itertools.count()  # names of requests the callers did not name
        self._engine_ids = itertools.count()  # makes each engine id unique
        self._lock = threading.Lock()  # guards the two counts and _closed
        self._queued = 0  # submitted, no first token yet
        self._unfinished = 0  # submitted, not ended
        self._closed = False
        self._faulted = False  # the last step raised: step again only for new requests
        self._waiters: list = []  # asyncio tasks to wake; loop thread only
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stats = LoopStats()
        self._publish_stats()

    # -- the callers' API (any thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queues a request for the engine; returns its stream at once.

        Raises:
          QueueFull: `max_queue` requests are waiting for their first token already.
          Closed: the loop is draining or stopped.
        Bad input is not raised here but by the stream (ValueError), once the engine checked it.
        """
        name = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(name, f"{name}#{next(self._engine_ids)}")
        with self._lock:  # after close() returns, no request gets into the inbox
            refusal = self._refusal()
            if refusal is None:
                self._queued += 1
                self._unfinished += 1
                self._inbox.put(("add", stream, prompt, params))
                return stream
        self.refused(name, "unavailable" if refusal is Closed else "rejected")
        raise refusal(
            "the server is shutting down"
            if refusal is Closed
            else f"{self.max_queue} requests are already waiting (--max-queue)"
        )

    def refused(self, request_id: str, outcome: str) -> None:
        """Records a request refused before it reached the loop (e.g. "invalid" at the front)."""
        self._observe(RequestRecord(request_id or "-", outcome))

    def _refusal(self) -> type[Exception] | None:
        if self._closed:
            return Closed
        if self.max_queue is not None and self._queued >= self.max_queue:
            return QueueFull
        return None

    def abort(self, stream: RequestStream) -> None:
        """Ends the request now if it is still running (its pages are freed); else does nothing."""
        if not stream.done:
            self._inbox.put(("abort", stream))

    def stats(self) -> LoopStats:
        if getattr(self.engine, "stats_any_thread", False):
            self._publish_stats()  # an engine process's counts move while this loop idles
        return self._stats

    def close(self) -> None:
        """Refuses new requests (Closed); those already submitted run on."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        """True once `close` (or drain, stop) was called: new requests are refused."""
        return self._closed

    @property
    def failure(self) -> str | None:
        """Why no request can be served any more (an engine process that died), else None. A
        failed step is not one: the loop serves the next requests."""
        return getattr(self.engine, "dead", None)

    def drain(self, timeout: float) -> bool:
        """Closes, then waits up to `timeout` seconds for every request to end; True if all did."""
        self.close()
        deadline = time.monotonic() + timeout
        while self.num_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.num_unfinished()

    def num_unfinished(self) -> int:
        """Requests submitted and not yet ended."""
        return self._unfinished

    def stop(self, timeout: float = 30.0) -> None:
        """Closes, fails what is still running with Closed, and ends the thread."""
        self.close()
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    # -- the loop thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._take_commands(block=not self._should_step()):
                break
            if self._should_step():
                self._step()
            self._wake()
            self._publish_stats()
        closed = Closed("the server stopped before the request finished")
        self._fail_all(closed)
        while not self._inbox.empty():  # requests never added: refuse them too
            command = self._inbox.get_nowait()
            if command[0] == "add":
                self._end(command[1], closed, "unavailable")
        self._wake()
        self._publish_stats()

    def _should_step(self) -> bool:
        return bool(self._live) or (self.engine.has_unfinished_requests() and not self._faulted)

    def _take_commands(self, block: bool) -> bool:
        """Runs the queued commands (waiting for one if `block`); False on "stop"."""
        commands = [self._inbox.get()] if block else []
        while not self._inbox.empty():
            commands.append(self._inbox.get_nowait())
        for command in commands:
            if command[0] == "stop":
                return False
            getattr(self, f"_{command[0]}")(*command[1:])
        if commands:
            self._wake()  # requests the engine refused
            self._publish_stats()  # pages freed by an abort show at once
        return True

    def _add(self, stream: RequestStream, prompt, params) -> None:
        try:
            self.engine.add_request(stream.engine_id, prompt, params)
        except ValueError as e:  # named as its caller named it
            self._end(stream, ValueError(self._named(stream, str(e))), "invalid")
            return
        except Exception as e:  # noqa: BLE001 - the engine's fault, not the request's
            log.exception("engine.add_request failed for %s", stream.request_id)
            self._end(stream, EngineError(f"the engine failed to add the request: {e}"), "error")
            return
        self._live[stream.engine_id] = stream
        stream._prompt_len = 0 if isinstance(prompt, str) else len(prompt)
        self._faulted = False

    @staticmethod
    def _named(stream: RequestStream, message: str) -> str:
        """The engine's message with the request named as its caller named it."""
        return message.replace(repr(stream.engine_id), repr(stream.request_id))

    def _abort(self, stream: RequestStream) -> None:
        if self._live.pop(stream.engine_id, None) is None:
            return  # ended already
        try:
            self.engine.abort(stream.engine_id)
        except Exception:  # noqa: BLE001 - an engine process that died: the loop goes on
            log.exception("engine.abort failed for %s", stream.request_id)
        self._forget(stream)
        self._observe(self._record(stream, None, "abort"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
            log.exception("engine step failed; failing %d request(s) in flight", len(self._live))
            self._faulted = True
            self._fail_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
            return
        for out in outputs:
            stream = self._live.get(out.request_id)
            if stream is None:
                continue  # aborted by its caller, or failed already
            if out.finish_reason == "invalid":  # refused by an engine in another process
                self._end(stream, ValueError(self._named(stream, out.error)), "invalid")
            elif out.finish_reason == "error":  # the engine failed this request alone
                error = getattr(out, "error", None) or "the engine failed"
                log.error("engine error in request %s: %s", stream.request_id, error)
                self._end(stream, EngineError(error), "error", out)
            elif out.finished:
                self._end(stream, out, out.finish_reason or "stop", out)
            else:
                self._first_token(stream)
                stream._last = out
                self._put(stream, out)

    def _fail_all(self, error: Exception) -> None:
        for stream in list(self._live.values()):
            try:
                self.engine.abort(stream.engine_id)  # frees its pages, if the engine still can
            except Exception:  # noqa: BLE001
                log.exception("engine.abort failed for %s", stream.request_id)
            self._end(stream, error, "error" if isinstance(error, EngineError) else "unavailable")

    def _end(self, stream: RequestStream, item, outcome: str, out: RequestOutput | None = None):
        """Puts the stream's last item, forgets it, records it."""
        self._live.pop(stream.engine_id, None)
        self._forget(stream)
        self._observe(self._record(stream, out, outcome))
        self._put(stream, item)

    def _put(self, stream: RequestStream, item) -> None:
        waiter = stream._put(item)
        if waiter is not None:
            self._waiters.append(waiter)

    def _wake(self) -> None:
        """Wakes the asyncio tasks whose streams got items: one call per event loop."""
        waiters, self._waiters = self._waiters, []
        _wake_all(waiters)

    def _first_token(self, stream: RequestStream) -> None:
        if stream._counted:
            stream._counted = False
            with self._lock:
                self._queued -= 1

    def _forget(self, stream: RequestStream) -> None:
        self._first_token(stream)
        with self._lock:
            self._unfinished -= 1

    def _record(
        self, stream: RequestStream, out: RequestOutput | None, outcome: str
    ) -> RequestRecord:
        now = time.perf_counter()
        out = out or stream._last
        first = out.first_token_time if out else None
        return RequestRecord(
            stream.request_id,
            outcome,
            prompt_tokens=len(out.prompt_token_ids) if out else stream._prompt_len,
            output_tokens=len(out.token_ids) if out else 0,
            cached_tokens=out.num_cached_tokens if out else 0,
            ttft_s=first - stream.submit_time if first else None,
            total_s=now - stream.submit_time,
        )

    def _observe(self, record: RequestRecord) -> None:
        if self.observer is None:
            return
        try:
            self.observer(record)
        except Exception:  # noqa: BLE001 - metrics must never take the loop down
            log.exception("request observer failed")

    def _publish_stats(self) -> None:
        counts = self.engine.serving_stats()  # running, kv_pages_*, preemptions, steps
        waiting = max(self._unfinished - counts["running"], 0)
        self._stats = LoopStats(waiting=waiting, **counts)


def _wake_all(waiters: list) -> None:
    by_loop: dict = {}
    for waiter in waiters:
        if waiter is not None:
            by_loop.setdefault(waiter[0], []).append(waiter[1])
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake, futures)
        except RuntimeError:  # that event loop is closed: nobody waits any more
            pass
