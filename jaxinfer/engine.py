"""The continuous-batching engine: `Engine` (add_request / step / abort) and `LLM` (offline batch).

One step reads top to bottom:

    plan = scheduler.schedule()             which sequences, which tokens, which pages
    handle = runner.dispatch(plan, rows)    one jitted step over the page pools (donated), queued
    resolve the step before (if any):       wait for its samples; the device runs `plan` meanwhile
        scheduler.resolve(prev, sampled)    tokens in place, stop ids / length, free pages
        detokenize, stop strings -> outputs text deltas that never split a character or show a stop string
    scheduler.commit(plan)                  tokens computed; placeholders for the samples in flight

so the host plans and post-processes while the device computes (asynchronous scheduling). A
request that a step finishes may have one more token computed by the step already queued; that
token is dropped. `async_scheduling=False` resolves each step before the next is dispatched. A
step with penalties reads its rows' token histories, the last tokens of each the samples in
flight, taken on the device like the step's own input tokens. A program whose sampler branches
on the device (mode "filter": the rows that sort their whole rows) is queued by the runner's
worker thread, since XLA's host waits for each branch's predicate while it queues; a fault while
it is queued ends its requests at the next step.

When every running request decodes and none could be admitted, one program runs up to
`num_decode_steps` (k) decode steps (scheduler.py, runner.py): the host plans, builds, queues and
reads back once per k tokens (single steps instead when most of its rows would reach max_tokens
within it). Stop ids and length limits apply on the device; stop strings, logprobs, penalties
(their counts kept up to date step by step in the program), `logit_bias` and `min_tokens` (its
bans end at their step inside the program) and seeded samples are those of single steps, and
an output then carries every token the program made for its request (the text deltas joined
are the same). The cost: a request that arrives (or is aborted) meanwhile waits for the program
in flight, up to k steps. A program takes up to 16 bias entries a request (logit_bias entries,
and min_tokens' bans of its stop ids and EOS until it has them): while a request with more
runs, every program takes one step, whose own small programs, compiled with the rest, add any
number to the logits before the sampler. A step with a prompt chunk of
a request that wants its prompt's logprobs holds at most scheduler.ALL_LOGITS_TOKENS tokens: its
forward keeps every token's logits ([T, V] float32). Where start-up compiles the programs
(`warmup`), every such step runs in that many tokens' bucket, one program that start-up
compiles and the pool's sizing counts. Such a request skips the prefix cache, whose cached
tokens would have no logits.

Inside the engine a request is its id and its sequence's arrival number: an id may be reused
as soon as its request ends (abort, stop), while a step planned for the old one is in flight;
that step's entries still apply to the old request only.

A fault inside a step (the runner raises: a device error, out of memory, a bug) does not escape
`step()`: the requests of the failed step (and of the step in flight with it) end with
finish_reason "error" and the message in `RequestOutput.error`, their pages are freed, the fault
is logged, and the engine goes on serving. If the failed step had consumed the donated page pools,
they are rebuilt, the prefix cache is forgotten, and any other running request recomputes its
tokens (its output unchanged).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention
from jaxinfer.distributed import agree_min, check_mesh, local_devices
from jaxinfer.kv_cache import init_pages
from jaxinfer.model import Model
from jaxinfer.platform import (
    device_memory_bytes,
    free_memory_bytes,
    largest_free_block_bytes,
    log_device,
    logger,
    use_compilation_cache,
)
from jaxinfer.runner import RowInfo, Runner, fits_decode
from jaxinfer.sampling import Entries, SamplingParams, bias_entries
from jaxinfer.scheduler import PLACEHOLDER, Scheduler, SchedulerConfig, SequenceStatus
from jaxinfer.scheduler import Sequence as Seq
from jaxinfer.sharding import (
    MOE_MODES,
    kv_bytes_per_token_per_device,
    kv_pool_heads,
    kv_sharding,
    shard_model,
)
from jaxinfer.tokenizer import IncrementalDetokenizer
from jaxinfer.validate import as_bool, as_int, as_sequence, as_text, as_token_ids

# Device memory left free beyond what the compiled programs report needing when the pool is
# sized from free memory: the allocator's fragmentation and what XLA's analysis leaves out.
WORKING_MEMORY_MARGIN = 1 << 30
# A GPU whose allocator may hold this much serves at the sizes every engine figure was measured
# at (`device_defaults`): an 80 GB card at JAX's default 75%, an H200; smaller cards keep
# smaller sizes.
LARGE_DEVICE_BYTES = 40 << 30


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits (like vLLM's). A field left None takes the default of the device the engine
    runs on (`device_defaults`); `num_pages` None sizes the pool from free memory."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None: the model's context (at most 2,048 on a CPU)
    page_size: int = 16
    num_pages: int | None = None
    # The pool's share of the free memory; with a warm-up, also no more than leaves the compiled
    # programs' working memory (and WORKING_MEMORY_MARGIN) free.
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    attention_impl: str | None = None  # None: the platform default
    seed: int = 0  # seeds of requests that bring none are drawn from it, in arrival order
    warmup: bool | None = None  # compile every bucket at start-up (None: on a GPU, not on a CPU)
    # the smallest token bucket above 1 (`runner.token_buckets`; None: 16 on a GPU, 1 on a CPU)
    smallest_bucket: int | None = None
    async_scheduling: bool = True  # plan step N+1 while step N runs on the device
    # JAX's persistent compilation cache: a restart loads the compiled steps instead of compiling.
    # None: $JAXINFER_COMPILATION_CACHE or ~/.cache/jaxinfer/xla; "" turns it off.
    compilation_cache_dir: str | None = None
    # Split the model over this many devices (tensor parallel; None: as the model was loaded).
    # A model loaded on one device is placed over the first N devices.
    tensor_parallel_size: int | None = None
    # Experts over those devices: "expert" or "ffn" (sharding.py; None: as the model was loaded,
    # "expert" for a model this config loads).
    moe_parallel: str | None = None
    # Decode steps in one program when every running request decodes (1: one step a program;
    # None: 8 on a GPU, 1 on a CPU). Each step of the program is compiled: k > 1 compiles longer.
    num_decode_steps: int | None = None

    def __post_init__(self):
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
        if self.page_size not in (16, 32, 64, 128):
            raise ValueError(f"page_size must be 16, 32, 64 or 128, got {self.page_size!r}")
        if self.num_decode_steps is not None:
            as_int("num_decode_steps", self.num_decode_steps, 1, 64)
        sizes = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_pages")
        for name in (*sizes, "smallest_bucket", "tensor_parallel_size"):
            if getattr(self, name) is not None:  # None: the device's default
                as_int(name, getattr(self, name), 1)
        as_int("seed", self.seed, 0)
        for name in ("enable_prefix_caching", "async_scheduling", "warmup"):
            if getattr(self, name) is not None:  # "false" would be true
                as_bool(name, getattr(self, name))
        if self.attention_impl is not None:  # before a model is loaded for it
            attention.check_impl(self.attention_impl)
            if self.attention_impl not in ENGINE_IMPLS:
                raise ValueError(
                    f"attention_impl {self.attention_impl!r} serves forward() and generate() "
                    f"only (a dense prefill): the engine's paged steps take one of {ENGINE_IMPLS}"
                )
        if self.moe_parallel not in (None, *MOE_MODES):
            raise ValueError(f"moe_parallel must be one of {MOE_MODES}, got {self.moe_parallel!r}")

    def for_device(
        self, backend: str, model_context: int, device_bytes: int | None = None
    ) -> EngineConfig:
        """This config with every None size filled in for `backend` ("cpu", "gpu", ...) with
        `device_bytes` of memory (`device_defaults`)."""
        filled = {
            k: v
            for k, v in device_defaults(backend, model_context, device_bytes).items()
            if getattr(self, k) is None
        }
        return dataclasses.replace(self, **filled)


def device_defaults(backend: str, model_context: int, device_bytes: int | None = None) -> dict:
    """Sizes that fit the device. A GPU serves many sequences and compiles every bucket at
    start-up. Where its allocator may hold `device_bytes` >= LARGE_DEVICE_BYTES it gets 512
    seats and 8,192-token steps, the sizes of the engine's measured figures (vLLM likewise sizes
    its batches by the card); a smaller or unknown one 64 seats and 2,048-token steps, fewer
    programs to compile and less working memory beside the pool. A GPU runs 8 decode steps a
    program (the host's work per step would otherwise set the pace: on an H200, 1,000 requests
    of 128/128 at 512 seats made 17,303 out tok/s against 14,016). A CPU serves a few
    sequences over a shorter context (the XLA attention reads every row's whole block table),
    compiles each program on first use (tens of seconds each there), with every power of two
    as a bucket so a few decodes are not padded to 16, and runs one decode step a program (its
    steps take longer than the host's work)."""
    if backend == "cpu":
        return dict(
            max_num_seqs=8,
            max_num_batched_tokens=256,
            max_model_len=min(model_context, 2048),
            warmup=False,
            smallest_bucket=1,
            num_decode_steps=1,
        )
    large = device_bytes is not None and device_bytes >= LARGE_DEVICE_BYTES
    return dict(
        max_num_seqs=512 if large else 64,
        max_num_batched_tokens=8192 if large else 2048,
        max_model_len=model_context,
        warmup=True,
        smallest_bucket=16,
        num_decode_steps=8,
    )


@dataclasses.dataclass
class RequestOutput:
    """A request's state after a step: cumulative tokens/text, and what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    logprobs: list[dict[int, float]] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    text_delta: str = ""
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: str | None = None  # with finish_reason "error": what went wrong in the step
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then each one's
    # {its id: logprob, the top ids: theirs} (as vLLM); None until the whole prompt is computed
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclasses.dataclass
class _Request:
    seq: Seq
    params: SamplingParams
    seed: int
    detok: IncrementalDetokenizer | None
    arrival: float
    prompt_ids: list[int]
    text: str = ""  # all text so far (stop strings cut off)
    emitted: int = 0  # characters of `text` already streamed
    stop_from: int = 0  # characters of `text` no stop string may end in (min_tokens' text)
    sent_tokens: int = 0
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # [None, then one dict per prompt token so far]
    bias: Entries | None = None  # its sampler's LogitBias entries (logit_bias, min_tokens)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    def row(self) -> RowInfo:
        """What the runner needs to know of this request for one step."""
        return RowInfo(
            self.params,
            self.seed,
            self.seq.num_output_tokens,
            self.seq.token_ids,
            self.seq.num_prompt_tokens,
            self.seq.stop_token_ids,
            self.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.seq.num_prompt_tokens,
            self.bias,
        )


class Engine:
    """Serves many requests at once over a paged KV cache; see the module docstring for a step."""

    def __init__(self, model: Model, config: EngineConfig | None = None, **options):
        import jax

        log_device()
        cfg = model.config
        config = config or EngineConfig(**options)
        model = _placed(model, config)  # the sizes below depend on none of the split's fields
        check_mesh(model.parallel.mesh)  # several processes: a mesh over all of them
        config = config.for_device(  # sizes that fit the least of this process's mesh cards
            jax.default_backend(),
            cfg.max_position_embeddings,
            device_memory_bytes(_held_devices(model)),
        )
        self.model, self.config = model, config
        use_compilation_cache(config.compilation_cache_dir)
        self.max_model_len = config.max_model_len
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context "
                f"{cfg.max_position_embeddings}"
            )
        # A CPU copies a 16-bit pool at every write (XLA widens 16-bit floats there), so its
        # pool is f32: written in place, and exact.
        self.kv_dtype = jnp.dtype(jnp.float32) if _on_cpu() else jnp.dtype(model.dtype)
        self.num_pages = self._num_pages()
        impl = config.attention_impl or _engine_impl(model.impl)
        self.runner = Runner(
            model.decoder(impl),
            model.params,
            self._new_pages(abstract=config.warmup),  # a warm-up compiles before the pool is made
            page_size=config.page_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            smallest_bucket=config.smallest_bucket,
            mesh=model.parallel.mesh,
            bucket_tables=impl != "pallas" and not config.warmup,
            one_all_logits_bucket=config.warmup,
            decode_steps=config.num_decode_steps,
        )
        self.requests: dict[str, _Request] = {}
        # Requests whose steps run one a program while they have bias entries: more of them
        # than a multi-step decode takes (`_single_steps`)
        self._wide: set[str] = set()
        self._aborted: list[RequestOutput] = []
        self._in_flight = None  # (plan, runner handle) committed but not resolved
        self._closed = False
        self._seeds = np.random.default_rng(config.seed)
        self.stats = {
            "steps": 0,
            "computed_tokens": 0,
            "cached_tokens": 0,
            "max_pages_used": 0,
            "preemptions": 0,
            "runner_s": 0.0,
            "decode_steps": 0,  # programs of decodes only
            "model_steps": 0,  # forwards: a multi-step decode runs up to k of them
            # Multi-step decode programs: row-steps run (padded rows x k) and tokens the rows
            # were planned to make; the gap is padding rows and rows done before the k-th step.
            "decode_row_steps": 0,
            "decode_planned_tokens": 0,
            "decode_wait_s": 0.0,  # of runner_s, the waits for decode-only programs
        }
        self._log_sizes()
        if config.warmup:
            self._compile_and_fit()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                page_size=config.page_size,
                num_pages=self.num_pages,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        # Leave everything built so far (params, pools, compiled steps) out of the cyclic GC's
        # scans: measured on the CPU at 256 sequences, a step's host work fell from 4.1 to 2.7 ms.
        gc.collect()
        gc.freeze()

    def _new_pages(self, abstract: bool = False) -> tuple:
        """The zeroed page pools of `num_pages` pages, or (`abstract`) only their shapes."""
        cfg, parallel = self.model.config, self.model.parallel
        return init_pages(
            cfg.num_layers,
            kv_pool_heads(cfg, parallel.size),
            cfg.head_dim,
            self.num_pages,
            self.config.page_size,
            self.kv_dtype,
            kv_sharding(parallel),
            abstract=abstract,
        )

    def _compile_and_fit(self) -> None:
        """Compiles every program over the pool's shapes, sizes the pool again with the memory
        the programs need beside it, then makes the pool and runs each program once. A smaller
        pool is compiled for once more, and measured again: XLA's autotuning may pick other
        kernels, with other workspaces, in another compile. Without this a pool sized from free
        memory alone can leave too little for a large step: Mixtral-8x7B's 8,192-token forward
        needs ~5 GiB of temporaries, more than the tenth of an H200's free memory the pool left,
        and the free memory after its weights were made was in pieces."""
        need = self.runner.compile_programs()
        for compiles in (1, 2, 3):  # the pool only shrinks; the last compile's need is checked
            num_pages = agree_min(self._local_num_pages(need))
            if num_pages >= self.num_pages:
                break
            if compiles == 3:
                raise RuntimeError(
                    f"the KV cache did not fit beside the programs' working memory "
                    f"({_gib(need)}) in {compiles} compiles: set num_pages"
                )
            logger.info(
                "KV cache: %d pages, not %d: the programs need %s of working memory beside "
                "the pool; compiling them for it",
                num_pages,
                self.num_pages,
                _gib(need),
            )
            self.num_pages = num_pages
            self.runner.pages = self._new_pages(abstract=True)
            need = self.runner.compile_programs()
        logger.info("KV cache: the programs need %s of working memory beside the pool", _gib(need))
        self.runner.pages = self._new_pages()
        self.runner.run_programs()

    def _page_bytes(self) -> int:
        """Bytes of one page on each device (a mesh splits the kv heads)."""
        per_token = kv_bytes_per_token_per_device(
            self.model.config, self.kv_dtype, self.model.parallel.size
        )
        return per_token * self.config.page_size

    def _num_pages(self) -> int:
        """The pool's pages: `num_pages` if it fits in free memory (else a ValueError, before any
        allocation), or `kv_cache_memory_fraction` of the free memory; on a CPU, whose memory the
        rest of the machine shares, at most enough for every seat at full length. Several
        processes each measure their own devices and take the least pool of them all."""
        return agree_min(self._local_num_pages())

    def _local_num_pages(self, need: int = 0) -> int:
        """This process's pool: as `_num_pages` says, with `need` bytes (the compiled programs'
        working memory, once known) left free beside it, and a margin when sized here. Once
        `need` is known the fraction is not taken again: the pool sized by it before the
        compile stays unless it does not fit beside the programs (a few MB the engine made
        meanwhile would otherwise cost a page, and compiling every program again)."""
        c, per_page = self.config, self._page_bytes()
        devices = _held_devices(self.model)
        free = free_memory_bytes(devices)
        programs = f" and the programs need {_gib(need)} beside it" if need else ""
        if c.num_pages is not None:
            if free is not None and c.num_pages * per_page + need > free:
                raise ValueError(
                    f"num_pages={c.num_pages} needs {_gib(c.num_pages * per_page)} of KV cache "
                    f"({per_page:,} bytes a page){programs}, but {_gib(free)} is free: use "
                    f"num_pages <= {max(0, free - need) // per_page} (or leave it unset to size "
                    "the pool from free memory)"
                )
            return c.num_pages
        seats = c.max_num_seqs * math.ceil(self.max_model_len / c.page_size)
        if free is None:
            return seats
        if need:  # the pool and the largest program's temporaries in the largest free block
            block = largest_free_block_bytes(devices)
            room = (free if block is None else block) - need - WORKING_MEMORY_MARGIN
        else:
            room = int(free * c.kv_cache_memory_fraction)
        fit = room // per_page
        if fit < 1:
            raise ValueError(
                f"no room for a KV cache: {_gib(free)} is free{programs}; lower "
                "max_num_batched_tokens or max_num_seqs (smaller steps need less memory)"
            )
        return min(fit, seats) if _on_cpu() else fit

    def _log_sizes(self) -> None:
        c = self.config
        logger.info(
            "KV cache: %d pages of %d tokens (%s, %d tokens); %d seats, %d tokens a step, "
            "context %d; programs %s",
            self.num_pages,
            c.page_size,
            _gib(self.num_pages * self._page_bytes()),
            self.num_pages * c.page_size,
            c.max_num_seqs,
            c.max_num_batched_tokens,
            self.max_model_len,
            "compiled now" if c.warmup else "compiled on first use",
        )

    # -- requests ------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the KV page pools, most of the device memory the engine holds; the engine takes
        no requests or steps after it. Dropping an engine frees nothing: at start-up it moves
        itself out of Python's cyclic GC (`gc.freeze`, for the host's speed), so the reference
        cycles between its parts outlive it. Also `with Engine(...) as engine:`."""
        self._settle()
        for x in jax.tree.leaves(self.runner.pages):
            x.delete()
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed (Engine.close freed its KV pages)")

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
    ) -> None:
        """Queues a request; raises ValueError for bad input or one that could never fit.

        Args:
          request_id: a string no unfinished request uses; it may be reused once that one ends.
          prompt: text (the model needs a tokenizer) or token ids (a list or 1-D numpy array).
          sampling_params: None for the defaults.
        """
        self._check_open()
        self._queue(self._prepare(request_id, prompt, sampling_params))

    def _prepare(self, request_id, prompt, sampling_params) -> _Request:
        """Every check of `add_request`, and the request it would queue; changes nothing."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}"
            )
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {request_id!r:.80}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self._prompt_ids(prompt)
        as_token_ids(
            "stop_token_ids",
            params.stop_token_ids,
            allow_empty=True,
            vocab_size=self.model.config.vocab_size,
        )
        vocab = self.model.config.vocab_size
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab})")
        if params.stop and self.model.tokenizer is None:
            raise ValueError(
                f"stop={params.stop!r:.80}: stop strings need the model's tokenizer, and this "
                "model has none (stop_token_ids work without one)"
            )
        stop_ids = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(self.model.config.eos_token_ids)
        )
        seq = Seq(request_id, ids, params.max_tokens, stop_ids)
        # its prompt's logprobs need every prompt token computed: no cached prefix
        seq.all_prompt_logits = params.prompt_logprobs is not None
        self.scheduler.check(seq)  # refuses what could never fit
        tokenizer = self.model.tokenizer
        detok = (
            IncrementalDetokenizer(tokenizer, params.skip_special_tokens, prompt_ids=ids)
            if tokenizer
            else None
        )
        return _Request(
            seq,
            params,
            -1,
            detok,
            0.0,
            ids,
            logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            # min_tokens bans EOS even with ignore_eos, as vLLM
            bias=bias_entries(params, stop_ids | set(self.model.config.eos_token_ids)),
        )

    def _queue(self, req: _Request, seed: int | None = None) -> None:
        """Queues a request made by `_prepare` (checked against the engine as it is now); its
        seed: `seed`, else the request's own, else the next of the engine's seed stream."""
        params = req.params
        self.scheduler.add(req.seq)
        if seed is None:
            seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
        req.seed = seed
        req.arrival = time.perf_counter()
        self.requests[req.seq.request_id] = req
        if not fits_decode(req.row()):
            self._wide.add(req.seq.request_id)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            as_text("prompt", prompt)
            if self.model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            ids = list(self.model.tokenizer(prompt)["input_ids"])
            vocab = self.model.config.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:  # an embedding lookup out of range gives NaN, not an error
                raise ValueError(
                    f"the prompt's text tokenizes to id {bad}, outside the model's vocabulary "
                    f"[0, {vocab}): the tokenizer does not match the model"
                )
            return ids
        return as_token_ids("prompt", prompt, vocab_size=self.model.config.vocab_size)

    def abort(self, request_id: str) -> None:
        """Stops a request at once and frees its pages; its last output says "abort"."""
        req = self._pop(request_id)
        if req is None:
            return
        self.scheduler.abort(request_id)
        req.finish_time = time.perf_counter()
        self._aborted.append(self._output(req, finished=True))

    def _pop(self, request_id: str) -> _Request | None:
        """Takes an ended request out of the engine's books."""
        self._wide.discard(request_id)
        return self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted) or self._in_flight is not None

    def serving_stats(self) -> dict[str, int]:
        """The counts a server publishes: running (requests holding KV pages), kv_pages_free,
        kv_pages_total, preemptions and steps (since start)."""
        return dict(
            running=len(self.scheduler.running),
            kv_pages_free=self.scheduler.allocator.num_free_pages,
            kv_pages_total=self.num_pages,
            preemptions=self.stats["preemptions"],
            steps=self.stats["steps"],
        )

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns an output for every request that moved (or ended).

        A fault inside the step is not raised: its requests end with finish_reason "error"
        (see the module docstring).
        """
        self._check_open()
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule(1 if self._single_steps() else self.config.num_decode_steps)
        try:
            self._run(plan, outputs)
        except Exception as error:  # noqa: BLE001 - whatever it is, the other requests go on
            self._fail(plan, error, outputs)
        return outputs

    def _single_steps(self) -> bool:
        """Whether this step's programs take one step: a running request has more live bias
        entries (logit_bias, min_tokens' bans until it has them) than a multi-step decode takes
        (`runner.fits_decode`); a single step's programs add any number (`Runner.step`)."""
        for rid in [r for r in self._wide if fits_decode(self.requests[r].row())]:
            self._wide.discard(rid)  # min_tokens reached: its bans are over
        # Running ones only: a waiting one joins in a step that admits it, and no multi-step
        # program is planned while one could be admitted (scheduler.py)
        running = SequenceStatus.RUNNING
        return any(self.requests[r].seq.status is running for r in self._wide)

    def _run(self, plan, outputs: list[RequestOutput]) -> None:
        if plan.seqs:
            reqs = [self.requests[s.request_id] for s in plan.seqs]
            if not self.config.async_scheduling:
                self.resolve(outputs)
            rows = [r.row() for r in reqs]
            handle = self.runner.dispatch(plan, rows)
            self._count(plan, handle.multi_step)
        self.resolve(outputs)  # the step before, while this one runs
        if plan.seqs:
            self.scheduler.commit(plan)
            self._in_flight = (plan, handle)
            if not self.config.async_scheduling:
                self.resolve(outputs)

    def resolve(self, outputs: list[RequestOutput] | None = None) -> list[RequestOutput]:
        """Waits for the step in flight (if any) and appends its outputs to `outputs` (a new list
        when None), which it returns; after it nothing is in flight (the next
        `scheduler.schedule()` plans real tokens only)."""
        outputs = [] if outputs is None else outputs
        if self._in_flight is None:
            return outputs
        plan, handle = self._in_flight
        t0 = time.perf_counter()
        samples = self.runner.collect(handle)
        waited = time.perf_counter() - t0  # time spent waiting for the device
        self.stats["runner_s"] += waited
        self.stats["decode_wait_s"] += waited if plan.decode_only else 0.0
        self._take_prompt_logprobs(plan, self.runner.collect_prompt(handle))
        tokens = samples.tokens.T.tolist()  # [n][S]: each row's samples
        where = {s.request_id: (i, s.start_pos + len(s.token_ids)) for i, s in enumerate(plan.seqs)}
        sampled = {s.request_id: tokens[i] for i, s in enumerate(plan.seqs) if s.sample}
        for seq in self.scheduler.resolve(plan, sampled):
            i, at = where[seq.request_id]
            outputs.append(self._advance(self.requests[seq.request_id], samples, i, at))
        self._in_flight = None  # only now: a fault before this ends the step's requests
        return outputs

    def _take_prompt_logprobs(self, plan, prompt) -> None:
        """Appends each prompt token's logprobs the step computed to its request's list (a
        recompute after preemption computes them again: those already taken are skipped)."""
        at = 0
        for s in plan.seqs:
            req, n = self.requests.get(s.request_id), len(s.token_ids)
            lps = req.prompt_logprobs if req is not None and req.seq.arrival == s.arrival else None
            if prompt is not None and lps is not None:
                want = req.params.prompt_logprobs
                # packed token j (position p) predicts prompt token p + 1; none is skipped
                # (no cached prefix), those already taken are; one list per array and chunk
                j0 = max(0, len(lps) - 1 - s.start_pos)
                j1 = min(n, req.seq.num_prompt_tokens - 1 - s.start_pos)
                rows = slice(at + j0, at + j1)
                targets = req.seq.token_ids[s.start_pos + j0 + 1 : s.start_pos + j1 + 1]
                for target, value, top, values in zip(
                    targets,
                    prompt.target[rows].tolist(),
                    prompt.top_ids[rows, :want].tolist(),
                    prompt.top_logprobs[rows, :want].tolist(),
                ):
                    # its own first, then the top (-1: no token)
                    lps.append({target: value, **{t: v for t, v in zip(top, values) if t >= 0}})
            at += n

    def _fail(self, plan, error: Exception, outputs: list[RequestOutput]) -> None:
        """Ends the requests of a failed step (and of the step in flight) with "error"."""
        logger.error(
            "engine step failed; its requests end with finish_reason 'error'", exc_info=error
        )
        message = f"{type(error).__name__}: {error}"
        items = list(plan.seqs) + (list(self._in_flight[0].seqs) if self._in_flight else [])
        self._in_flight = None
        now = time.perf_counter()
        for item in items:
            req = self.requests.get(item.request_id)
            if req is None or req.seq.arrival != item.arrival:  # ended already, or a newer one
                continue
            self._pop(item.request_id)
            self.scheduler.finish(item.request_id, "error")
            req.seq.finish_reason, req.error, req.finish_time = "error", message, now
            outputs.append(self._output(req, finished=True))
        self._settle()
        if any(x.is_deleted() for x in jax.tree.leaves(self.runner.pages)):
            logger.warning(
                "the failed step consumed the KV page pools: rebuilt; running requests "
                "recompute their tokens"
            )
            self.runner.pages = self._new_pages()
            self.scheduler.drop_all_pages()

    def _settle(self) -> None:
        """Waits for the program the runner's worker thread may still be queuing (it holds the
        pages); its error, if any, belongs to the step in flight, which fails with it."""
        try:
            self.runner.settle()
        except Exception:  # noqa: BLE001 - the step in flight's requests end with it
            logger.debug("the program in flight failed while queued", exc_info=True)

    def _count(self, plan, multi_step: bool) -> None:
        self.stats["steps"] += 1
        self.stats["computed_tokens"] += plan.num_computed_tokens
        self.stats["preemptions"] += len(plan.preempted)
        self.stats["decode_steps"] += plan.decode_only
        self.stats["model_steps"] += max(s.num_steps for s in plan.seqs)
        if multi_step:  # a multi-step decode program: k steps of every row, live or not
            k = self.runner.decode_steps
            self.stats["decode_row_steps"] += k * self.runner.bucket(plan.num_tokens)[1]
            self.stats["decode_planned_tokens"] += sum(s.num_steps for s in plan.seqs)
        used = self.num_pages - self.scheduler.allocator.num_free_pages
        self.stats["max_pages_used"] = max(self.stats["max_pages_used"], used)

    def _advance(self, req: _Request, samples, i: int, at: int) -> RequestOutput:
        """Takes in the tokens the step resolved for row i, from `seq.token_ids[at]` on
        (samples [S, n, ...]): logprobs, text, stop strings, which drop the tokens after them."""
        now = time.perf_counter()
        req.first_token_time = req.first_token_time or now
        seq = req.seq
        # A stop token id (EOS among them) that ended the request stays in its ids but adds no
        # text, as in vLLM: its text is not the answer's (a "\n" given as a stop id, say),
        # unless include_stop_str_in_output asks for it.
        stop_id = seq.is_finished and seq.finish_reason == "stop"
        stop_id = stop_id and seq.token_ids[-1] in seq.stop_token_ids
        stop_id = stop_id and not req.params.include_stop_str_in_output
        last = len(seq.token_ids) - 1
        for j, token in enumerate(seq.token_ids[at:]):
            if req.logprobs is not None:
                n = req.params.logprobs
                ids, values = samples.top_ids[j, i, :n].tolist(), samples.top_logprobs[j, i, :n]
                top = {t: v for t, v in zip(ids, values.tolist()) if t >= 0}  # -1: no token
                req.logprobs.append({token: float(samples.logprob[j, i]), **top})
            if req.detok is not None and not (stop_id and at + j == last):
                req.text += req.detok.push(token)
                if at + j + 1 - seq.num_prompt_tokens <= req.params.min_tokens:
                    req.stop_from = len(req.text)  # min_tokens: no stop string ends in it (vLLM)
                elif self._check_stop_strings(req):
                    del seq.token_ids[at + j + 1 :]
                    break
        else:  # no stop string ended it: at its end, the text held back is let out
            if seq.is_finished and req.detok is not None:
                req.text += req.detok.flush()
                self._check_stop_strings(req)
        if seq.is_finished:
            req.finish_time = now
            self._pop(seq.request_id)
            self.stats["cached_tokens"] += seq.num_cached_tokens
        return self._output(req, finished=seq.is_finished)

    def _check_stop_strings(self, req: _Request) -> bool:
        """Ends the request with "stop" if its text now holds a stop string (cut there)."""
        stops = req.params.stop
        if not stops:
            return False
        longest = max(map(len, stops))
        # a match may begin in text held back last time; it must end after min_tokens' text
        start = max(0, req.emitted - longest)
        found = ((req.text.find(s, max(start, req.stop_from - len(s) + 1)), s) for s in stops)
        hits = [(i, len(s)) for i, s in found if i >= 0]
        if not hits:
            return False
        at, length = min(hits)
        req.text = req.text[: at + length if req.params.include_stop_str_in_output else at]
        if req.seq.is_finished:
            req.seq.finish_reason = "stop"
        else:
            self.scheduler.finish(req.seq.request_id, "stop")
        return True

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        seq = req.seq
        # Text that may begin a stop string is held back, unless the stop string would be kept
        hold = 0
        if not (finished or req.params.include_stop_str_in_output):
            hold = _stop_prefix_len(req.text, req.params.stop, req.emitted)
        upto = max(req.emitted, len(req.text) - hold)
        delta, req.emitted = req.text[req.emitted : upto], upto
        output_ids = seq.output_token_ids  # a fresh list: the caller may keep it
        while output_ids and output_ids[-1] == PLACEHOLDER:  # ended (abort, error) with samples
            output_ids.pop()  # in flight: those tokens are dropped
        new_ids, req.sent_tokens = output_ids[req.sent_tokens :], len(output_ids)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=req.prompt_ids,
            token_ids=output_ids,
            text=req.text[: req.emitted],
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            arrival_time=req.arrival,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
            new_token_ids=new_ids,
            text_delta=delta,
            num_cached_tokens=seq.num_cached_tokens,
            error=req.error,
            prompt_logprobs=_whole_prompt(req),
        )


def _whole_prompt(req: _Request) -> list | None:
    """The request's prompt logprobs once every prompt token has them, else None."""
    lps = req.prompt_logprobs
    return lps if lps is not None and len(lps) == req.seq.num_prompt_tokens else None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


# cuDNN's attention is dense: no paged steps (forward() and generate() take it for prefill).
ENGINE_IMPLS = ("pallas", "xla", "reference")


def _engine_impl(model_impl: str) -> str:
    """The engine's attention when its config names none: the model's, unless the engine cannot
    run that one."""
    if model_impl in ENGINE_IMPLS:
        return model_impl
    fallback = attention.default_impl()
    logger.info(
        "the model's attention impl %r has no paged steps: the engine runs %r", model_impl, fallback
    )
    return fallback


def _held_devices(model: Model) -> list | None:
    """The devices of `model`'s mesh that this process holds; None without a mesh (the
    engine's default device)."""
    mesh = model.parallel.mesh
    return None if mesh is None else local_devices(mesh.devices.flat)


def _placed(model: Model, config: EngineConfig) -> Model:
    """`model` split as `config` asks (a field left None keeps the model's own layout)."""
    size = config.tensor_parallel_size or model.parallel.size
    moe = config.moe_parallel or model.parallel.moe
    if (size, moe) == (model.parallel.size, model.parallel.moe):
        return model
    # the same size keeps the model's devices (a data-parallel replica's own one, say)
    mesh = model.parallel.mesh if size == model.parallel.size else None
    return shard_model(model, None if mesh else size, mesh=mesh, moe=moe)


def _stop_prefix_len(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Length of the longest end of `text` that begins some stop string: held back, it may yet
    match. Ends beginning before `start` (the text let out already) are not tried: each call lets
    out only text that begins no stop string, and appending to it cannot change that."""
    hold = 0
    for stop in stops:  # the first start in the tail that stop begins with is the longest end
        i = text.find(stop[0], max(start, len(text) - len(stop) + 1))
        # (the last character first: a one-character test before a copy of the tail)
        while i >= 0 and not (stop[len(text) - i - 1] == text[-1] and stop.startswith(text[i:])):
            i = text.find(stop[0], i + 1)
        if i >= 0:
            hold = max(hold, len(text) - i)
    return hold


class LLM:
    """Offline batch generation: `LLM(path).generate(prompts, params)` -> outputs in input order.

    `LLM(path, tensor_parallel_size=N)` splits the model over the first N devices;
    `data_parallel_size=R` runs R independent engines (replicas), each over its own N devices,
    and spreads the prompts among them (the better use of devices when the model fits in N).
    EngineConfig's other fields are keyword options too.
    """

    def __init__(
        self,
        model_path=None,
        *,
        model: Model | None = None,
        dtype=None,
        data_parallel_size: int = 1,
        **engine_options,
    ):
        from jaxinfer.sharding import replica_meshes

        if model is not None and (model_path is not None or dtype is not None):
            raise ValueError(
                "give model_path (with dtype) or a loaded model, not both: "
                f"model_path={model_path!r:.80}, dtype={dtype!r}, model=Model"
            )
        config = EngineConfig(**engine_options)
        size = config.tensor_parallel_size or (model.parallel.size if model else 1)
        data_parallel_size = as_int("data_parallel_size", data_parallel_size, 1)  # True is not 1
        meshes = replica_meshes(size, data_parallel_size) if data_parallel_size != 1 else [None]
        if model is None:  # loaded straight onto its devices (the first replica's)
            from jaxinfer.checkpoint import load_model

            model = load_model(
                model_path,
                dtype=dtype,
                tensor_parallel_size=size,
                mesh=meshes[0],
                moe=config.moe_parallel or "expert",
            )
        replicas = (
            [model]
            if meshes == [None]
            else [
                shard_model(model, mesh=mesh, moe=config.moe_parallel or model.parallel.moe)
                for mesh in meshes
            ]
        )
        self.engines = [Engine(m, config) for m in replicas]
        self.engine = self.engines[0]
        self._seeds = np.random.default_rng(config.seed)  # one stream, whatever the replicas

    def generate(
        self, prompts: str | Sequence, sampling_params=None, *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Runs all prompts (strings or token-id lists) to completion; one or per-prompt params.

        Every prompt and parameter is checked before any request is queued, so a bad one raises
        ValueError and leaves the engines as they were; if anything fails later (an interrupt),
        this call's requests are aborted before the error propagates.
        """
        prompts = _prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        ids = [f"llm-{next(_counter)}" for _ in prompts]
        reqs = []
        for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
            try:
                reqs.append(self.engine._prepare(rid, prompt, p))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        try:
            load = [0] * len(self.engines)
            for req in reqs:  # each to the replica with the least work queued by this call
                r = load.index(min(load))
                load[r] += len(req.prompt_ids) + req.params.max_tokens
                seed = req.params.seed
                self.engines[r]._queue(req, seed if seed is not None else self._draw_seed())
            return self._run(ids, use_tqdm)
        except BaseException:
            for engine in self.engines:
                for rid in ids:
                    engine.abort(rid)
            raise

    def _draw_seed(self) -> int:
        return int(self._seeds.integers(2**31))

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending, final = set(ids), {}
        bar = _progress(len(ids)) if use_tqdm else None
        while pending:
            for engine in self.engines:  # each step is queued on its devices, then the next
                if not engine.has_unfinished_requests():
                    continue
                for out in engine.step():
                    if out.finished and out.request_id in pending:  # not another caller's
                        pending.discard(out.request_id)
                        final[out.request_id] = out
                        bar and bar.update(1)
        bar and bar.close()
        return [final[rid] for rid in ids]


_counter = itertools.count()


def _prompt_list(prompts) -> list:
    """One prompt (text, token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)  # [B, T]: B prompts of T tokens
    prompts = as_sequence("prompts", prompts)
    if not prompts:
        raise ValueError("prompts is empty: give one prompt or a list of them")
    if isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # one prompt of token ids
    return prompts


def _per_prompt(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * n
    params = as_sequence("sampling_params", sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    return tqdm(total=total, desc="generate", unit="req", disable=total < 2)
