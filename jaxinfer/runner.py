"""StepPlan -> padded, bucketed batch arrays -> two jitted programs per step -> samples.

The programs are the model forward (page pools donated; packed tokens -> logits of each row) and the
sampler, compiled per static mode (greedy / sample / filter, picked on the host), so that no
`lax.cond` makes the host wait for the device. Where a row has logit bias entries (logit_bias,
min_tokens) or penalties, programs between them adjust the logits the rows draw from (the logprobs
stay the model's): the bias, and the penalties from each row's `penalty_state` [B, V], which a
program makes from the rows' token histories; start-up compiles these too. The step's T packed
tokens are padded to a token bucket (powers of two up to the step budget) and its sequences to B =
min(T, max_num_seqs) rows, so each bucket compiles once. Padding tokens write to no slot and belong
to no sequence; padding rows compute nothing and sample greedily.

`dispatch` returns as soon as the step is queued on the device; `collect` waits for its samples. A
PLACEHOLDER token in a plan (a sample of the step dispatched just before, not yet on the host) is
read inside the jitted step from that step's sampled tokens, which stay on the device.

With `decode_steps` k > 1, a decode-only plan whose rows take more than one step (and have at
most DECODE_BIAS_WIDTH logit bias entries each) runs as one program of k decode steps, a `lax.scan`
of k iterations: forward, sample, and the samples are the next step's tokens, at the next
positions, written to the slots the block tables give. Its rows draw with their bias entries and
penalties: the program takes their LogitBias (each entry live at each step by its `until`) and
penalty state (zeros where no row has penalties, which leaves the logits bit for bit) and adds
each step's samples to the state, so a biased or penalized row's tokens are those of single
steps. Row i is live for its entry's `num_steps` steps and until it samples one of its stop ids
(at most MAX_STOP_IDS of them are checked on the device; the host checks them all); a row that is
not live writes no K/V, and whether it stopped carries over to the next program like its last
sample does. The loop's trip count is static, so XLA runs it on a
GPU without reading anything back (a `while_loop` that stopped once every row had stopped made the
host wait on a predicate each step: 0.8 ms of idle device a step at batch 1); unrolled, the k copies
made a cold engine start 2.7x longer and ran 20% slower at batch 1 (H200). One program per row
bucket and sampler mode; on a GPU those of CUBLAS_DECODE_ROWS rows or more have their matmuls
compiled for cuBLAS (`cublas_decode_rows`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Int

from jaxinfer import scheduler
from jaxinfer.attention import PagedMeta
from jaxinfer.sampling import (
    BIAS_WIDTHS,
    SAMPLE_MODES,
    TOP_K_ONLY,
    Entries,
    LogitBias,
    PromptLogprobs,
    SampleOutput,
    SamplingArrays,
    SamplingParams,
    add_bias_entries,
    apply_logit_bias,
    apply_penalty_state,
    count_sample,
    logit_bias_arrays,
    penalty_state,
    prompt_logprobs,
    sample_adjusted,
    sampler_mode,
    sampling_arrays,
)
from jaxinfer.scheduler import PLACEHOLDER, StepPlan
from jaxinfer.sharding import MODEL, one_device, put_tree


class StepBatch(NamedTuple):
    """Everything the jitted step reads besides params and pages."""

    tokens: Int[Array, "T"]
    token_src: Int[Array, "T"]  # >= 0: take the token from the previous step's sample of that row
    positions: Int[Array, "T"]
    meta: PagedMeta
    sample_idx: Int[Array, "B"]  # which packed token's logits row b samples from
    sampling: SamplingArrays
    # Prompt + output ids for penalties (-1: none; <= -2: a sample of the program before, still
    # on the device, `TokenHistories`); None when no row uses them.
    history: Int[Array, "B S"] | None
    history_is_output: Bool[Array, "B S"] | None
    bias: LogitBias | None = None  # logit_bias and min_tokens entries; None when no row has one
    # The next prompt token of each packed token whose row wants prompt logprobs (-1: none);
    # None when no row does (the forward then computes logits at the sample positions only)
    lp_targets: Int[Array, "T"] | None = None


class RowInfo(NamedTuple):
    """Host-side facts about one scheduled sequence that the batch needs."""

    params: SamplingParams
    seed: int
    num_output_tokens: int  # before this step's sample
    token_ids: Sequence[int]  # prompt + output so far (for penalties)
    num_prompt_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # sampling one ends it (multi-step decodes)
    prompt_logprobs: bool = False  # its prompt tokens' logprobs are wanted
    bias: Entries | None = None  # its LogitBias entries (`sampling.bias_entries`)


class Dispatched(NamedTuple):
    """A step queued on the device: its sequences (the plan's rows), its samples (device
    arrays, each field [S, B, ...]) and whether it runs as a multi-step decode program. A step
    queued by the runner's worker thread has instead a future of (samples, prompt)."""

    num_seqs: int
    out: SampleOutput | concurrent.futures.Future
    multi_step: bool
    prompt: PromptLogprobs | None = None  # [T, ...] of the step's packed tokens, if asked


class DecodeSteps(NamedTuple):
    """What a multi-step decode program reads besides the step's batch."""

    num_steps: Int[Array, "B"]  # steps row b is live for (0: a padding row)
    stop_ids: Int[Array, "B MAX_STOP_IDS"]  # -1 = none


MAX_STOP_IDS = 8  # stop ids per row checked on the device (the host checks every one)
# LogitBias entries a multi-step decode takes per row (the narrowest width); a row with more live
# (a long logit_bias, or min_tokens over many stop ids) makes single steps while it has them.
DECODE_BIAS_WIDTH = BIAS_WIDTHS[0]
MIN_HISTORY_WIDTH = 128  # the narrowest penalties history (`history_widths`)


def token_buckets(max_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """1, then powers of two from `smallest` up to and including `max_tokens`. A lone sequence
    has a bucket of its own: padded to 16 rows, its decode ran the paged decode kernel split for
    16 sequences (5 ranges of its context where alone it gets 66), and the engine's batch-1 step
    was 0.3 ms slower (Llama-3-8B, H200)."""
    sizes = [smallest]
    while sizes[-1] < max_tokens:
        sizes.append(min(sizes[-1] * 2, max_tokens))
    return tuple(sorted({1, *([s for s in sizes if s <= max_tokens] or [max_tokens])}))


def history_widths(max_model_len: int) -> tuple[int, ...]:
    """The widths S of a step's penalties history [B, S]: powers of two from MIN_HISTORY_WIDTH
    and, last, max_model_len (no sequence is longer). A step takes the narrowest that holds its
    longest penalized sequence: the host builds and copies, and the device scatters, S ids a
    row, so rows of ~700 tokens at full width (8,192) cost ~12x what they need."""
    widths = []
    while (w := MIN_HISTORY_WIDTH << len(widths)) < max_model_len:
        widths.append(w)
    return (*widths, max_model_len)


CUBLAS_DECODE_ROWS = 128
# XLA's compiler options for the programs whose matmuls go to cuBLAS, not its Triton GEMMs.
CUBLAS_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
PLAIN_DECODE_ROWS = 128


def cublas_decode_rows() -> int | None:
    """The fewest rows of a multi-step decode program whose matmuls go to cuBLAS (None: none).
    On an H200 a 128-row Llama-3-8B decode step ran 10.34 ms with cuBLAS against 10.60 with XLA's
    Triton GEMMs, which split K and sum the partials in kernels of their own; at one row cuBLAS
    was slower (5.47 against 4.24 ms). GPU only; $JAXINFER_DECODE_CUBLAS = 0 or 1 decides
    instead (for measuring one against the other)."""
    forced = os.environ.get("JAXINFER_DECODE_CUBLAS")
    if forced == "0" or (forced != "1" and jax.default_backend() != "gpu"):
        return None
    return CUBLAS_DECODE_ROWS


def plain_decode_rows() -> int | None:
    """The fewest rows of a multi-step decode program that has a twin adjusting no logits, run
    when no row has bias entries or penalties (None: no twins). On an H100 the sampler's fusion
    with the bias entries' selects and the penalty state took 70 us a step at 128 rows against
    24 in the twin, and 128x128:1000 (512 rows) made 1.4% more out tok/s with twins; twins of
    every row bucket made a cold start 22-28 s longer (bench/README, "Multi-step decodes that
    adjust no logits"). The selects grow with the rows and a step's weight reads do not: in a
    program of fewer rows they are too small a share for a twin's compile.
    $JAXINFER_PLAIN_DECODE_ROWS = N decides instead (0: none)."""
    forced = os.environ.get("JAXINFER_PLAIN_DECODE_ROWS")
    if forced is None:
        return PLAIN_DECODE_ROWS
    if not forced.isdecimal():  # what int() reads, and no sign
        raise ValueError(f"$JAXINFER_PLAIN_DECODE_ROWS must be an integer >= 0, got {forced!r}")
    return int(forced) or None


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def live_bias(r: RowInfo) -> Entries | None:
    """The row's LogitBias entries (`sampling.bias_entries`) live at its next token: min_tokens'
    bans end once it has them. None where none is."""
    if r.bias is None:
        return None
    keep = r.bias[2] > r.num_output_tokens  # until
    if keep.all():
        return r.bias
    return tuple(x[keep] for x in r.bias) if keep.any() else None


def fits_decode(r: RowInfo) -> bool:
    """Whether the row's live entries fit a multi-step decode (DECODE_BIAS_WIDTH)."""
    bias = live_bias(r)
    return bias is None or len(bias[0]) <= DECODE_BIAS_WIDTH


class Runner:
    """Owns the device page pools and the jitted programs; turns plans into sampled tokens."""

    def __init__(
        self,
        decoder,
        params: Any,
        pages: tuple,
        *,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        smallest_bucket: int = 16,
        mesh=None,
        bucket_tables: bool = False,
        one_all_logits_bucket: bool = False,
        decode_steps: int = 1,
    ):
        self.decoder, self.params, self.pages = decoder, params, pages
        self.decode_steps = decode_steps  # k: iterations of a multi-step decode (1: none)
        # The mesh the params and pages are split over, if any; every batch array is then whole
        # on each of its devices (`replicated`; without a mesh: committed to the one device).
        self.mesh = mesh
        self.replicated = one_device() if mesh is None else NamedSharding(mesh, PartitionSpec())
        self.page_size, self.max_num_seqs = page_size, max_num_seqs
        self.max_model_len = max_model_len
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        # Block tables as wide as the step's longest sequence needs (a power of two of pages)
        # rather than the whole context: the XLA attention gathers every page a table lists.
        # Each width is another program, so only where programs compile on first use.
        self.bucket_tables = bucket_tables
        self.buckets = token_buckets(max_num_batched_tokens, smallest_bucket)
        self.num_compiles = 0  # traces of the forward and the sampler: each is one compilation
        # Two programs per step: the model (pages donated) and the sampler, whose static mode
        # (greedy / sample / filter) replaces on-device conds that would stall the host; mode
        # filter's branches remain, queued from a worker thread (`dispatch`).
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1,))
        # Its samples whole on every device, so each process reads them from its own.
        replicated = {} if mesh is None else {"out_shardings": self.replicated}
        self._sample = jax.jit(self._sample_fn, static_argnums=(3,), **replicated)
        # A step whose rows have logit_bias / min_tokens entries or penalties adjusts the logits
        # in programs of their own before the sampler (one per row bucket, and bias or history
        # width): few and small, so start-up compiles them all. Penalties go through each row's
        # `penalty_state` [B, V], made from its history by a program of its own; a multi-step
        # decode takes it too (zeros where no row has penalties) and adds its samples to it.
        self._add_bias = jax.jit(self._add_bias_fn)
        self._penalty_state = jax.jit(self._penalty_state_fn)
        self._no_penalty_state = jax.jit(
            self._no_penalty_state_fn,
            static_argnums=(0,),
            out_shardings=self._logits_sharding(decoder.cfg.vocab_size),
        )
        self._penalize = jax.jit(self._penalize_fn)
        # 2 x (output count) + 1 must fit: int16 up to 16,383 tokens, half the bytes a step reads
        self.state_dtype = jnp.int16 if 2 * max_model_len < 2**15 else jnp.int32
        decode_jit = functools.partial(
            jax.jit, self._decode_fn, donate_argnums=(1,), static_argnums=(7,)
        )
        self._decode = decode_jit()
        # Multi-step decodes of at least this many rows whose rows have no bias entries and no
        # penalties run a twin program that adjusts no logits (`plain_decode_rows`; None: none).
        self.plain_rows = plain_decode_rows()
        # Decode programs of many rows with XLA's matmuls by cuBLAS rather than its Triton GEMMs
        # (see `cublas_decode_rows`); None: every program as XLA chooses.
        self.cublas_rows = cublas_decode_rows()
        self._decode_cublas = (
            decode_jit(compiler_options=CUBLAS_OPTIONS) if self.cublas_rows is not None else None
        )
        # The last dispatched step's sampled tokens [max_num_seqs] (on the device), whether each
        # row stopped in it (multi-step decodes only), and its rows; the last multi-step
        # decode's samples [k, max_num_seqs] (each step's), and whether the last step was one.
        self.prev_tokens = jnp.zeros(max_num_seqs, jnp.int32, device=self.replicated)
        self._no_stops = jnp.zeros(max_num_seqs, bool, device=self.replicated)
        self.prev_stopped = self._no_stops
        self.prev_outs = jnp.zeros((decode_steps, max_num_seqs), jnp.int32, device=self.replicated)
        self._prev_rows: dict[str, int] = {}
        self._prev_multi = False
        self._histories = TokenHistories(max_model_len, max_num_seqs)
        self.last_prompt: PromptLogprobs | None = None  # the last single step's, if asked
        # Where start-up compiles the programs: prompt-logprobs steps run in the one bucket
        # whose program it compiles (`all_logits_bucket`); without, each in its own (programs
        # compiled on first use, as on a CPU: a short prompt's step stays short).
        self.one_all_logits_bucket = one_all_logits_bucket
        # Mode "filter"'s sampler branches on the device, and XLA's host waits for each branch's
        # predicate while it queues the program: such programs are queued by a worker thread,
        # so that the host plans the next step meanwhile (`dispatch`).
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._queueing: concurrent.futures.Future | None = None

    def _forward_fn(self, params, pages, prev_tokens, batch: StepBatch):
        """Packed tokens -> logits [B, V] at each row's sample position; pages written. With
        `lp_targets`, also the PromptLogprobs of every packed token (its logits [T, V] taken
        whole: a program of its own)."""
        self.num_compiles += 1  # runs at trace time only
        tokens = _step_tokens(prev_tokens, batch)
        if batch.lp_targets is None:
            return self._logits(
                params, pages, tokens, batch.positions, batch.meta, batch.sample_idx
            )
        pages, logits = self._logits(params, pages, tokens, batch.positions, batch.meta, None)
        prompt = prompt_logprobs(logits, batch.lp_targets, self.mesh)
        if self.mesh is not None:  # whole on every device (see `collect_prompt`)
            prompt = jax.lax.with_sharding_constraint(prompt, self.replicated)
        return pages, self._logits_layout(logits[batch.sample_idx]), prompt

    def _logits(self, params, pages, tokens, positions, meta, sample_idx):
        logits, pages = self.decoder.apply(
            {"params": params},
            tokens[None],
            positions[None],
            pages,
            logits_at=sample_idx,
            paged=meta,
        )
        # [B, V] at sample_idx; [T, V] of every token without it
        return pages, self._logits_layout(logits[:, 0] if sample_idx is not None else logits[0])

    def _decode_fn(
        self,
        params,
        pages,
        prev_tokens,
        prev_stopped,
        batch: StepBatch,
        d: DecodeSteps,
        penalties: Int[Array, "B V"] | None,
        mode,
    ):
        """k decode steps of a decode-only batch (T == B: token b is row b's): returns the pages,
        the samples of every step (SampleOutput, each field [k, B, ...]; a row's samples after
        it stopped are not its), each row's last sample and whether it stopped, [max_num_seqs]
        each, and the samples' tokens [k, max_num_seqs]. Rows draw from their logits with the
        batch's bias entries [B, DECODE_BIAS_WIDTH] added (each live by its `until` at each
        step) and then `penalties` (`penalty_state`) applied, and each step's live samples are
        added to it. Without bias entries (`batch.bias` and `penalties` None: `plain_decode_rows`)
        the rows draw from the logits as they are: the same samples, without the 16 selects
        over [B, V] and the state's reads and writes."""
        self.num_compiles += 1  # runs at trace time only
        size, src = self.page_size, batch.token_src
        tokens = _step_tokens(prev_tokens, batch)  # [B]
        stopped = (src >= 0) & prev_stopped[jnp.maximum(src, 0)]  # stopped in the program before
        meta, steps = batch.meta, d.num_steps

        def one_step(carry, i):
            pages, tokens, last, stopped, penalties = carry
            live = (i < steps) & ~stopped  # [B]
            # A row past its steps stays at its last position: its table covers it.
            pos = batch.positions + jnp.minimum(i, jnp.maximum(steps - 1, 0))
            page = jnp.take_along_axis(meta.block_tables, (pos // size)[:, None], axis=1)[:, 0]
            step_meta = meta.replace(
                slot_mapping=jnp.where(live, page * size + pos % size, -1),
                kv_lens=jnp.where(steps > 0, pos + 1, 0),
            )
            pages, logits = self._logits(params, pages, tokens, pos, step_meta, batch.sample_idx)
            sampling = batch.sampling._replace(step=batch.sampling.step + i)
            raw = logits.astype(jnp.float32)
            adjusted = raw
            if penalties is not None:
                adjusted = add_bias_entries(raw, batch.bias, sampling.step)
                adjusted = apply_penalty_state(adjusted, sampling, penalties)
            adjusted = self._logits_layout(adjusted)
            out = sample_adjusted(raw, adjusted, sampling, mode=mode, mesh=self.mesh)
            hit = jnp.any(out.tokens[:, None] == d.stop_ids, axis=1)
            stopped = stopped | (live & hit)
            last = jnp.where(live, out.tokens, last)
            if penalties is not None:
                penalties = count_sample(penalties, out.tokens, live)
            return (pages, out.tokens, last, stopped, penalties), out

        (pages, tokens, last, stopped, _), outs = jax.lax.scan(
            one_step,
            (pages, tokens, tokens, stopped, penalties),
            jnp.arange(self.decode_steps),
        )
        b = tokens.shape[0]
        pad = self.max_num_seqs - b
        last, stopped = jnp.pad(last, (0, pad)), jnp.pad(stopped, (0, pad))
        samples = jnp.pad(outs.tokens, ((0, 0), (0, pad)))
        if self.mesh is not None:  # whole on every device (see `collect`)
            outs, last, stopped, samples = jax.lax.with_sharding_constraint(
                (outs, last, stopped, samples), self.replicated
            )
        return pages, outs, last, stopped, samples

    def _logits_layout(self, logits):
        """Over a mesh, logits stay split by vocab (the sampler reduces them where they are);
        pinned so that the sampler's programs compiled at start-up see the layout they get."""
        if self.mesh is None:
            return logits
        return jax.lax.with_sharding_constraint(logits, self._logits_sharding(logits.shape[-1]))

    def _logits_sharding(self, vocab: int) -> jax.sharding.Sharding:
        if self.mesh is None:
            return self.replicated
        split = vocab % self.mesh.shape[MODEL] == 0
        return NamedSharding(self.mesh, PartitionSpec(None, MODEL if split else None))

    def _sample_fn(self, logits, adjusted, sampling: SamplingArrays, mode: str):
        """Samples from `adjusted` (the logits themselves where no row adjusts them); the
        logprobs are the logits'."""
        self.num_compiles += 1  # runs at trace time only
        out = sample_adjusted(logits, adjusted, sampling, mode=mode, mesh=self.mesh)
        next_tokens = (
            jnp.zeros(self.max_num_seqs, jnp.int32).at[: out.tokens.shape[0]].set(out.tokens)
        )
        # Each field [1, B, ...], as a multi-step decode's [k, B, ...]: in the program rather than
        # as an op per field after it (each a dispatch, and a compile on first use).
        return jax.tree.map(lambda x: x[None], out), next_tokens

    def _add_bias_fn(self, logits, bias: LogitBias, step):
        self.num_compiles += 1  # runs at trace time only
        biased = apply_logit_bias(logits.astype(jnp.float32), bias, step, self.mesh)
        return self._logits_layout(biased)

    def _penalty_state_fn(self, history, history_is_output, prev_tokens, prev_outs):
        """The rows' `penalty_state` [B, V], with the samples of the program before
        (`TokenHistories`' entries <= -2) taken from `prev_tokens` [max_num_seqs] and
        `prev_outs` [k, max_num_seqs]: a step with penalties is queued before the one in flight
        is resolved."""
        self.num_compiles += 1  # runs at trace time only
        in_flight = jnp.concatenate([prev_tokens, prev_outs.reshape(-1)])
        history = jnp.where(history <= -2, in_flight[jnp.maximum(-2 - history, 0)], history)
        vocab = self.decoder.cfg.vocab_size
        state = penalty_state(history, history_is_output, vocab, self.state_dtype)
        return self._logits_layout(state)

    def _penalize_fn(self, logits, sampling, penalties):
        self.num_compiles += 1  # runs at trace time only
        out = apply_penalty_state(logits.astype(jnp.float32), sampling, penalties)
        return self._logits_layout(out)

    def step(self, batch: StepBatch, mode: str) -> SampleOutput:
        """Queues the model, the programs that adjust its logits (if any row has entries or
        penalties) and the sampler on the device; pages and prev_tokens move on. The samples'
        fields are [1, B, ...]."""
        self.pages, logits, *prompt = self._forward(
            self.params, self.pages, self.prev_tokens, _forward_only(batch)
        )
        self.last_prompt = prompt[0] if prompt else None
        adjusted = logits
        if batch.bias is not None:
            adjusted = self._add_bias(adjusted, batch.bias, batch.sampling.step)
        if batch.history is not None:
            adjusted = self._penalize(adjusted, batch.sampling, self._penalties(batch))
        out, self.prev_tokens = self._sample(logits, adjusted, batch.sampling, mode)
        self.prev_stopped = self._no_stops
        return out

    def decode(self, batch: StepBatch, d: DecodeSteps, mode: str) -> SampleOutput:
        """Queues a multi-step decode; its samples are [k, B, ...]. A batch without bias entries
        (`_bias`: then no row has penalties either) runs the program that adjusts no logits."""
        b = batch.sample_idx.shape[0]
        if batch.bias is None:
            penalties = None
        elif batch.history is None:
            penalties = self._no_penalty_state(b)
        else:
            penalties = self._penalties(batch)
        decode = self._decode_program(b)
        batch = batch._replace(history=None, history_is_output=None)  # in `penalties` now
        self.pages, out, self.prev_tokens, self.prev_stopped, self.prev_outs = decode(
            self.params, self.pages, self.prev_tokens, self.prev_stopped, batch, d, penalties, mode
        )
        return out

    def _penalties(self, batch: StepBatch) -> jax.Array:
        """Queues the program that makes the batch's penalty state from its history."""
        history = (batch.history, batch.history_is_output)
        return self._penalty_state(*history, self.prev_tokens, self.prev_outs)

    def _no_penalty_state_fn(self, b: int):
        """Zeros [b, V]: a multi-step decode's penalty state where no row has penalties. Made
        for each program (at 512 rows 131 MB written, ~35 us on an H200, once per k steps)
        rather than kept: arrays made after the pool's first sizing take pages from it, and a
        smaller pool compiles every program that takes it again (~26 s of a cold start)."""
        self.num_compiles += 1  # runs at trace time only
        return jnp.zeros((b, self.decoder.cfg.vocab_size), self.state_dtype)

    def _decode_program(self, rows: int):
        """The jitted multi-step decode for a batch of `rows` rows."""
        if self.cublas_rows is not None and rows >= self.cublas_rows:
            return self._decode_cublas
        return self._decode

    def multi_step(self, plan: StepPlan, rows: Sequence[RowInfo]) -> bool:
        """Whether `plan` runs as a multi-step decode program: decodes only, every row's bias
        entries within DECODE_BIAS_WIDTH, and some row with more than one step (a plan of single
        steps runs as one step: the program would run all k steps for one live one)."""
        return (
            self.decode_steps > 1
            and plan.decode_only
            and any(s.num_steps > 1 for s in plan.seqs)
            and all(map(fits_decode, rows))
        )

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        """(T, B) of the smallest bucket holding `num_tokens` tokens."""
        t = next(b for b in self.buckets if b >= num_tokens)
        return t, min(t, self.max_num_seqs)

    def all_logits_bucket(self) -> tuple[int, int]:
        """(T, B) of every step that computes prompt logprobs: the bucket of the most tokens
        such a step holds (scheduler.ALL_LOGITS_TOKENS), so that one program serves them all,
        compiled at start-up and counted in the pool's sizing (its [T, V] float32 logits are
        the largest working memory of a small step)."""
        return self.bucket(min(scheduler.ALL_LOGITS_TOKENS, self.buckets[-1]))

    def dispatch(self, plan: StepPlan, rows: Sequence[RowInfo]) -> Dispatched:
        """Queues the plan's step on the device and returns at once: a handle for `collect`.

        A program with on-device branches (sampler mode "filter") is queued by the worker
        thread, after the program it queued before (`settle`); the others here, after it too."""
        multi = self.multi_step(plan, rows)
        mode = self.sampler_mode([r.params for r in rows])
        queue = self._prepare(plan, rows, multi, mode)
        self._prev_rows = {s.request_id: i for i, s in enumerate(plan.seqs)}
        self._prev_multi = multi
        self.settle()  # in queue order: each program takes the pages the one before returns
        if mode != "filter":
            out = queue()
            return Dispatched(plan.num_seqs, out, multi, None if multi else self.last_prompt)

        def queue_it():
            out = queue()
            return out, None if multi else self.last_prompt

        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, "jaxinfer-queue")
        self._queueing = self._worker.submit(queue_it)
        return Dispatched(plan.num_seqs, self._queueing, multi)

    def settle(self) -> None:
        """Waits until the worker thread has queued the program it holds; raises its error."""
        queueing, self._queueing = self._queueing, None
        if queueing is not None:
            queueing.result()

    def _queued(self, handle: Dispatched) -> tuple[SampleOutput, PromptLogprobs | None]:
        if not isinstance(handle.out, concurrent.futures.Future):
            return handle.out, handle.prompt
        if handle.out is self._queueing:
            self._queueing = None  # its error, if any, is raised here and not again
        return handle.out.result()

    def prepare(self, plan: StepPlan, rows: Sequence[RowInfo]) -> Callable[[], SampleOutput]:
        """Builds the plan's batch; returns a function that queues its program (one step, or a
        multi-step decode) and returns the samples, each field [S, B, ...]."""
        mode = self.sampler_mode([r.params for r in rows])
        return self._prepare(plan, rows, self.multi_step(plan, rows), mode)

    def _prepare(self, plan, rows, multi: bool, mode: str) -> Callable[[], SampleOutput]:
        if multi:
            batch = self.build(plan, rows, square=True)
            steps = self._decode_steps(plan, rows, batch.sample_idx.shape[0])
            return lambda: self.decode(batch, steps, mode)
        batch = self.build(plan, rows)
        return lambda: self.step(batch, mode)

    def _decode_steps(self, plan: StepPlan | None, rows: Sequence[RowInfo], b: int) -> DecodeSteps:
        """Each row's steps and stop ids, padded to b rows (no plan: b padding rows)."""
        steps = np.zeros(b, np.int32)
        stops = np.full((b, MAX_STOP_IDS), -1, np.int32)
        for i, (s, r) in enumerate(zip(plan.seqs if plan else (), rows)):
            steps[i] = s.num_steps
            ids = sorted(r.stop_token_ids)[:MAX_STOP_IDS]
            stops[i, : len(ids)] = ids
        return DecodeSteps(*put_tree((steps, stops), self.replicated))

    def sampler_mode(self, params: Sequence[SamplingParams]) -> str:
        """The sampler program a batch needs (`sampling.sampler_mode`)."""
        return sampler_mode(params)

    def sampler_modes(self) -> tuple[str, ...]:
        return (*SAMPLE_MODES, TOP_K_ONLY)

    def collect(self, handle: Dispatched) -> SampleOutput:
        """Waits for a dispatched step; its sequences' samples on the host, each field [S, n, ...]
        (S: 1, or k of a multi-step decode; rows in plan order). The samples are whole on each
        device: each process reads its first device's copy."""
        n, out = handle.num_seqs, self._queued(handle)[0]
        local = [x.addressable_data(0) for x in out]
        return SampleOutput(*(x[:, :n] for x in jax.device_get(local)))  # one transfer

    def collect_prompt(self, handle: Dispatched) -> PromptLogprobs | None:
        """The step's PromptLogprobs on the host (numpy, [T, ...]), None where none was asked;
        after `collect`, so it waits for nothing."""
        prompt = self._queued(handle)[1]
        if prompt is None:
            return None
        return PromptLogprobs(*jax.device_get([x.addressable_data(0) for x in prompt]))

    def compile_programs(self, progress: bool = True) -> int:
        """Compiles every program start-up needs: the forward of each token bucket and its
        decode-only form where T == B, the multi-step decodes, the sampler of each row bucket B in
        every mode and the programs that adjust B rows' logits (logit bias of each width, the
        penalty state of each history width, and the penalties). `pages` may still be abstract
        (`jax.ShapeDtypeStruct`): the pool can be sized after. Returns the most device memory
        one program needs besides its inputs (XLA's temporaries and the outputs that reuse no
        donated input), plus a penalty state's.

        Tracing holds the GIL, so programs are traced one by one; XLA then compiles them in
        parallel threads (on an H200's host: 101 s of compiles in 28 s). `progress` draws a bar
        on stderr."""
        programs = self.warmup_programs()
        bar = _progress_bar(len(programs), "compiling programs") if progress else None
        lowered = [fn.lower(*args) for fn, args in programs]
        # Parallel compiles were measured on a GPU host; a CPU (2 cores in CI) compiles serially.
        parallel = jax.default_backend() != "cpu"
        workers = max(1, min(len(lowered), os.cpu_count() or 1)) if parallel else 1

        def compile_one(program):
            compiled = program.compile()
            if bar is not None:
                bar.update(1)
            return working_bytes(compiled)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            need = max(pool.map(compile_one, lowered), default=0)
        if bar is not None:
            bar.close()
        # A penalty state lives from its program through the step's, outside both programs'
        # working memory; counted whole on each device.
        rows = min(self.buckets[-1], self.max_num_seqs)
        return need + rows * self.decoder.cfg.vocab_size * jnp.dtype(self.state_dtype).itemsize

    def run_programs(self) -> None:
        """Runs every start-up program once on an all-padding batch (the pool must be real by
        now); the calls find the programs `compile_programs` compiled."""
        for fn, args in self.warmup_programs():
            if fn in (self._forward, self._decode, self._decode_cublas):
                self.pages = fn(args[0], self.pages, *args[2:])[0]
            else:
                fn(*args)
        jax.block_until_ready(self.pages)

    def warmup_programs(self) -> list[tuple[Any, tuple]]:
        """(jitted function, example arguments) of every program that start-up compiles."""
        programs = []
        multi = self.decode_steps > 1  # decode-only steps run as multi-step decodes
        row_buckets = sorted({min(t, self.max_num_seqs) for t in self.buckets})
        for t in self.buckets:
            for decode in (False, True) if t <= self.max_num_seqs and not multi else (False,):
                batch = _forward_only(self._padding_batch(t, decode))
                programs.append((self._forward, (self.params, self.pages, self.prev_tokens, batch)))
        t = self.all_logits_bucket()[0]  # the forward of prompt-logprobs steps
        targets = jnp.full(t, -1, jnp.int32, device=self.replicated)
        batch = _forward_only(self._padding_batch(t, False))._replace(lp_targets=targets)
        programs.append((self._forward, (self.params, self.pages, self.prev_tokens, batch)))
        vocab = self.decoder.cfg.vocab_size
        states = {  # an example penalty state of each row bucket
            b: jnp.zeros((b, vocab), self.state_dtype, device=self._logits_sharding(vocab))
            for b in row_buckets
        }
        for b in row_buckets if multi else ():
            programs.append((self._no_penalty_state, (b,)))
            batch, d = self._padding_batch(b, True), self._decode_steps(None, (), b)
            args = (self.params, self.pages, self.prev_tokens, self.prev_stopped, batch, d)
            plain = (*args[:4], batch._replace(bias=None), d, None)
            for mode in self.sampler_modes():
                programs.append((self._decode_program(b), (*args, states[b], mode)))
                if self._plain(b):
                    programs.append((self._decode_program(b), (*plain, mode)))
        for b in row_buckets:
            logits = jnp.zeros((b, vocab), jnp.float32, device=self._logits_sharding(vocab))
            batch = self._padding_batch(b, False)  # its [b] sampler inputs
            for mode in self.sampler_modes():
                programs.append((self._sample, (logits, logits, batch.sampling, mode)))
            for width in BIAS_WIDTHS:
                bias = LogitBias(
                    *put_tree(logit_bias_arrays([_no_entries(width)], b), self.replicated)
                )
                programs.append((self._add_bias, (logits, bias, batch.sampling.step)))
            for width in self._histories.widths:
                history = put_tree(_no_history(b, width), self.replicated)
                args = (*history, self.prev_tokens, self.prev_outs)
                programs.append((self._penalty_state, args))
            programs.append((self._penalize, (logits, batch.sampling, states[b])))
        return programs

    def build(self, plan: StepPlan, rows: Sequence[RowInfo], square: bool = False) -> StepBatch:
        """The step's batch; `square`: a decode-only plan as T == B (a multi-step decode)."""
        all_logits = not square and any(map(_computes_prompt_logprobs, plan.seqs, rows))
        one = all_logits and self.one_all_logits_bucket
        t, b = self.all_logits_bucket() if one else self.bucket(plan.num_tokens)
        t = b if square else t
        tokens, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
        slots, src = np.full(t, -1, np.int32), np.full(t, -1, np.int32)
        tables = np.zeros((b, self.table_width(plan)), np.int32)
        kv_lens, cu = np.zeros(b, np.int32), np.zeros(b + 1, np.int32)
        sample_idx = np.zeros(b, np.int32)
        at = 0
        for i, s in enumerate(plan.seqs):
            n = len(s.token_ids)
            tokens[at : at + n] = s.token_ids
            if s.token_ids[-1] == PLACEHOLDER:  # only ever the last: the previous step's sample
                src[at + n - 1] = self._prev_rows[s.request_id]
            positions[at : at + n] = np.arange(s.start_pos, s.start_pos + n)
            slots[at : at + n] = s.slot_mapping
            tables[i, : len(s.block_table)] = s.block_table
            kv_lens[i], at = s.start_pos + n, at + n
            cu[i + 1], sample_idx[i] = at, at - 1
        cu[plan.num_seqs + 1 :] = at  # padding rows own no tokens
        # Decode-only steps of the multi-step decode have their own program.
        decode = t == b and plan.decode_only and (square or self.decode_steps == 1)
        sampling = sampling_arrays(
            [r.params for r in rows],
            [r.seed for r in rows],
            [r.num_output_tokens for r in rows],
            pad_to=b,
        )
        bias = self._bias(rows, b, square)
        host = (tokens, src, positions, (slots, tables, kv_lens, cu), sample_idx, sampling, bias)
        # One transfer (over a mesh: the same arrays to every device).
        tokens, src, positions, meta, sample_idx, sampling, bias = put_tree(host, self.replicated)
        history, is_output = self._history(plan, rows, b)
        return StepBatch(
            tokens,
            src,
            positions,
            PagedMeta(*meta, decode=decode),
            sample_idx,
            sampling,
            history,
            is_output,
            bias,
            self._lp_targets(plan, rows, t) if all_logits else None,
        )

    def table_width(self, plan: StepPlan) -> int:
        """W of the step's block tables: the context's pages, or with `bucket_tables` the
        power of two that holds the longest table of the plan."""
        if not self.bucket_tables:
            return self.max_pages_per_seq
        need = max((len(s.block_table) for s in plan.seqs), default=1)
        return min(self.max_pages_per_seq, 1 << max(need - 1, 0).bit_length())

    def _history(self, plan: StepPlan, rows: Sequence[RowInfo], b: int):
        """Prompt + output ids [B, S] when any row uses penalties, else (None, None)
        (`TokenHistories`), on the device."""
        arrays = self._histories.arrays(plan, rows, b, self._prev_rows, self._prev_multi)
        return (None, None) if arrays is None else put_tree(arrays, self.replicated)

    def _lp_targets(self, plan: StepPlan, rows: Sequence[RowInfo], t: int):
        """[T] next prompt token of each packed token of a row that wants prompt logprobs (-1:
        none), on the device."""
        targets, at = np.full(t, -1, np.int32), 0
        for s, r in zip(plan.seqs, rows):
            n = len(s.token_ids)
            if _computes_prompt_logprobs(s, r):
                ids = r.token_ids[s.start_pos + 1 : min(s.start_pos + n + 1, r.num_prompt_tokens)]
                targets[at : at + len(ids)] = ids
            at += n
        return put_tree(targets, self.replicated)

    def _plain(self, rows: int) -> bool:
        """Whether the multi-step decode program of `rows` rows has a twin that adjusts no
        logits."""
        return self.plain_rows is not None and rows >= self.plain_rows

    def _bias(self, rows: Sequence[RowInfo], b: int, square: bool) -> LogitBias | None:
        """The rows' LogitBias [B, N] (host arrays) when any row has an entry this step, else
        None; a multi-step decode's (`square`) [B, DECODE_BIAS_WIDTH] also where no row has one,
        unless B has a plain twin and no row has penalties (the twin adjusts no logits)."""
        entries = [live_bias(r) for r in rows]
        adjusts = square and (not self._plain(b) or any(uses_penalties(r.params) for r in rows))
        if all(e is None for e in entries) and not adjusts:
            return None
        return logit_bias_arrays(entries, b)

    def _padding_batch(self, t: int, decode: bool) -> StepBatch:
        b = min(t, self.max_num_seqs)
        zeros = lambda n: jnp.zeros(n, jnp.int32, device=self.replicated)
        meta = PagedMeta(
            jnp.full(t, -1, jnp.int32, device=self.replicated),
            jnp.zeros((b, self.max_pages_per_seq), jnp.int32, device=self.replicated),
            zeros(b),
            zeros(b + 1),
            decode=decode,
        )
        sampling = put_tree(sampling_arrays([], [], [], pad_to=b), self.replicated)
        src = jnp.full(t, -1, jnp.int32, device=self.replicated)
        # a decode's: no entries (a multi-step decode reads them)
        bias = put_tree(logit_bias_arrays([], b), self.replicated) if decode else None
        return StepBatch(zeros(t), src, zeros(t), meta, zeros(b), sampling, None, None, bias)


class TokenHistories:
    """The host arrays of a step's penalties: each row's prompt + output ids and which are
    output, [B, S] (-1: none), S the narrowest of `history_widths` that holds the step's longest
    penalized sequence. The samples of the program in flight (PLACEHOLDERs, the last of the
    ids) are on the device: after a single step, its row r's one sample is -2 - r (the runner's
    `prev_tokens`); after a multi-step decode, the row's j-th sample is -2 - R (1 + j) - r (its
    `prev_outs`, R = max_num_seqs). `Runner._penalty_state_fn` reads them there.

    Each penalized sequence's ids are kept as int32 from step to step (by request id and
    arrival, for this step's rows only): a step copies the tokens resolved since, not the whole
    list (512 rows of 1,000 / 4,000 tokens: 2.7 / 3.8 against 11.3 / 37.5 ms of host a step
    on a 2-core CPU, `scripts/bench_history.py`). Resolved tokens never change."""

    def __init__(self, max_model_len: int, max_num_seqs: int):
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.widths = history_widths(max_model_len)
        self._known: dict[tuple[str, int], tuple[np.ndarray, int]] = {}

    def arrays(
        self, plan: StepPlan, rows: Sequence[RowInfo], b: int, prev_rows: dict, prev_multi: bool
    ):
        """(ids, is_output) of the plan's rows, or None where no row uses penalties;
        `prev_rows`: the rows of the program in flight, `prev_multi`: whether it is a
        multi-step decode."""
        known, self._known = self._known, {}  # those of this step's rows stay
        penalized = [
            (i, s, r) for i, (s, r) in enumerate(zip(plan.seqs, rows)) if uses_penalties(r.params)
        ]
        if not penalized:
            return None
        longest = max(len(r.token_ids) for _, _, r in penalized)
        ids, is_output = _no_history(b, next(w for w in self.widths if w >= longest))
        for i, s, r in penalized:
            n, key = len(r.token_ids), (s.request_id, s.arrival)
            kept, pending = self._ids(known.get(key), r.token_ids, key)
            row = ids[i]
            row[:n] = kept
            if pending:
                row[n - pending : n] = self._in_flight(prev_rows[s.request_id], pending, prev_multi)
            is_output[i, r.num_prompt_tokens : n] = True
        return ids, is_output

    def _in_flight(self, r: int, count: int, multi: bool) -> np.ndarray:
        """The entries of row r's `count` samples in flight (see the class)."""
        if not multi:
            assert count == 1, "a single step samples one token a row"
            return np.array([-2 - r])
        return -2 - self.max_num_seqs * (1 + np.arange(count)) - r

    def _ids(self, known, token_ids: Sequence[int], key) -> tuple[np.ndarray, int]:
        """token_ids as int32 from `known` (the array and count of resolved ids of the step
        before, if any) plus those since (the PLACEHOLDERs at the end copied as they are,
        resolved in a later step), and how many PLACEHOLDERs end them."""
        buf, have = known if known is not None else (np.empty(self.max_model_len, np.int32), 0)
        n = len(token_ids)
        have = min(have, n)
        buf[have:n] = token_ids[have:n]
        pending = n - have
        while pending and buf[n - pending] != PLACEHOLDER:
            pending -= 1
        self._known[key] = (buf, n - pending)
        return buf[:n], pending


def _no_history(b: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Host (ids, is_output) [b, width] of rows with no history."""
    return np.full((b, width), -1, np.int32), np.zeros((b, width), bool)


def _no_entries(width: int) -> Entries:
    """A row's LogitBias entries that fill `width` and add nothing."""
    return np.full(width, -1, np.int32), np.zeros(width, np.float32), np.zeros(width, np.int32)


def _computes_prompt_logprobs(seq, row: RowInfo) -> bool:
    """Whether a scheduled sequence's chunk computes a prompt token's logprob: its request wants
    them and the chunk has a next prompt token."""
    return row.prompt_logprobs and seq.start_pos + 1 < row.num_prompt_tokens


def working_bytes(compiled) -> int:
    """Device memory a compiled program takes while it runs besides its inputs: its temporaries
    and the outputs that do not reuse a donated input (per device; 0 where XLA can't say)."""
    try:
        m = compiled.memory_analysis()
    except NotImplementedError:
        return 0
    if m is None:
        return 0
    return int(m.temp_size_in_bytes + max(0, m.output_size_in_bytes - m.alias_size_in_bytes))


def _step_tokens(prev_tokens: Int[Array, "R"], batch: StepBatch) -> Int[Array, "T"]:
    """The batch's tokens, a PLACEHOLDER's taken from the previous step's samples (token_src)."""
    src = batch.token_src
    return jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], batch.tokens)


def _forward_only(batch: StepBatch) -> StepBatch:
    """The forward's part of a batch: the sampler's arrays left out of its program."""
    return batch._replace(sampling=None, history=None, history_is_output=None, bias=None)


def _progress_bar(total: int, desc: str):
    """A bar on stderr, quiet where jaxinfer's log is (JAXINFER_LOG_LEVEL above INFO)."""
    from tqdm.auto import tqdm

    from jaxinfer.platform import logger

    return tqdm(
        total=total,
        desc=f"jaxinfer: {desc}",
        unit="prog",
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not logger.isEnabledFor(logging.INFO),
    )
