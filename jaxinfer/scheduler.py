"""Continuous-batching scheduler over a paged KV cache (plain Python, no JAX).

One engine step is `plan = scheduler.schedule()` -> the runner computes `plan` and samples ->
`scheduler.update(plan, sampled)`, where update = `commit(plan)` (tokens computed, a placeholder
for each sample) + `resolve(plan, sampled)` (placeholders replaced, stops and lengths applied).
With asynchronous scheduling the engine plans step N+1 while step N runs: N is committed but not
resolved, so N+1 computes N's placeholders, whose values the runner takes from N's samples on the
device. A sequence that N finishes may still be in N+1; that token is dropped. Each step:

1. Running sequences with one token left to compute (decodes) get one token each, oldest first.
2. Running sequences still prefilling get a chunk of the remaining token budget (chunked
   prefill: a long prompt shares steps with decodes and continues next step).
3. Waiting sequences are admitted in arrival order while seats, budget and pages allow. A prompt
   starting with cached full pages takes them and starts computing after them. A seat whose
   sequence reaches max_tokens in the step in flight is free for this plan: that sequence ends
   when the step resolves whatever it samples (its pages stay taken until then).

A sequence is scheduled only once its pages for the step are reserved. When pages run out, the
most recently arrived running sequence not yet scheduled this step is preempted: it loses its
pages and returns to the front of the waiting queue; later it recomputes prompt + output so far
(prefix-cache hits included) and goes on, so its output is what it would have been anyway.

A sequence needs no prefill/decode flag: it computes `token_ids[num_computed_tokens:]`, and a
step that reaches the end of its tokens samples the next one.

Decode steps in one program (`schedule(decode_steps=k)`): when every live running sequence is a
decode and no waiting request could be admitted now (none waits, or every seat is taken by a
sequence that goes on after the step in flight), each gets pages for up to k tokens and an entry
with `num_steps` = min(k, tokens left to max_tokens): the runner computes its token, samples,
computes that sample, and so on, num_steps times, without the host. The program runs k steps of
every row, so when fewer than half of them would be live (most rows reach max_tokens within it)
the sequences get single steps instead, whose rows shrink as they end. Commit appends num_steps
placeholders; resolve puts the samples in place, and a stop token or the length limit ends the
sequence there, its later samples dropped. Full pages are keyed by their tokens only once those
tokens are known (at resolve).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum
import itertools
from collections.abc import Iterable

from jaxinfer.kv_cache import PageAllocator

FINISH_REASONS = ("stop", "length", "abort", "error")  # error: a fault in the step (engine)
# Tokens a step holds while it prefills a sequence whose prompt logprobs are wanted: its forward
# keeps every token's logits, [T, V] float32 (0.5 GiB at 1,024 x 128k), and their log_softmax.
ALL_LOGITS_TOKENS = 1024

PLACEHOLDER = -1  # a sampled token still on the device (committed, not resolved)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler and the KV page pool; checks itself (ValueError names the field).

    Attributes:
      max_num_seqs: most sequences running at once (and so in one step).
      max_num_batched_tokens: most tokens computed in one step, over all sequences.
      max_model_len: most tokens (prompt + output) in one sequence.
      page_size: L, token slots per KV page.
      num_pages: P, pages in the KV pool.
      enable_prefix_caching: reuse the cached pages of a shared prompt prefix.
      long_prefill_token_threshold: if set, most prompt tokens one sequence computes per step.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int | None = None

    def __post_init__(self):
        names = [
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "page_size",
            "num_pages",
        ]
        if self.long_prefill_token_threshold is not None:
            names.append("long_prefill_token_threshold")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                "SchedulerConfig.enable_prefix_caching must be a bool, "
                f"got {self.enable_prefix_caching!r}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_num_seqs ({self.max_num_seqs}) so every running decode fits a step"
            )


def pool_tokens(num_pages: int, page_size: int) -> int:
    """The most tokens (prompt + output) the whole KV pool holds for one request: the last
    sampled token is never computed, so it needs no page."""
    return num_pages * page_size + 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens and scheduling state.

    Args:
      request_id: unique among unfinished requests.
      prompt_token_ids: the prompt, at least one token.
      max_tokens: most output tokens; reaching it finishes with reason "length".
      stop_token_ids: sampling one of these (EOS, ...) finishes with reason "stop"; the stop
        token is kept as the last output token.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        max_tokens: int,
        stop_token_ids: Iterable[int] = (),
    ):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output so far
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0  # leading tokens whose K/V are in the pages
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        # Its prompt's logprobs are wanted: every prompt token computed (no cached prefix), in
        # steps of at most ALL_LOGITS_TOKENS tokens while it prefills
        self.all_prompt_logits = False
        self.block_table: list[int] = []  # page ids, kept by the PageAllocator
        self.page_hashes: list[int] = []  # prefix-cache chain ids, kept by the PageAllocator
        # Order of Scheduler.add. With request_id it names this sequence: an id may be reused
        # once its sequence finishes, while a plan made for the old one is still in flight.
        self.arrival = -1

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def has_pending_token(self) -> bool:
        """Its last token is a PLACEHOLDER: sampled by a committed step, not yet resolved."""
        return self.token_ids[-1] == PLACEHOLDER

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={self.block_table})"
        )


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in a step.

    Attributes:
      request_id: the sequence.
      token_ids: the T_i tokens to compute this step.
      start_pos: position of token_ids[0] (= num_computed_tokens before the step); the tokens
        attend to positions [0, start_pos + T_i).
      block_table: the sequence's pages, covering at least start_pos + T_i slots.
      slot_mapping: cache slot of each token, page * L + offset.
      sample: whether this step samples the next token (a decode, or a prefill's last chunk).
      arrival: the sequence's `arrival`: a plan entry applies to this sequence only, never to a
        newer one that took the same request id.
      num_steps: tokens the entry samples: 1, or in a multi-step decode k >= 1, each computed in
        the step after it is sampled (only the first is in token_ids / slot_mapping; the pages
        of all are in block_table).
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    slot_mapping: tuple[int, ...]
    sample: bool
    arrival: int = -1
    num_steps: int = 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step computes: decodes first, then prefill chunks.

    Attributes:
      seqs: the scheduled sequences.
      preempted: request ids that lost their pages this step (they wait to recompute).
    """

    seqs: tuple[ScheduledSeq, ...] = ()
    preempted: tuple[str, ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V the step writes: the scheduled ones and, in a multi-step decode, the
        samples it computes (at most; a sequence that stops on the device writes fewer)."""
        return sum(len(s.token_ids) + s.num_steps - 1 for s in self.seqs)

    @property
    def decode_only(self) -> bool:
        """Every scheduled sequence computes exactly one token."""
        return all(len(s.token_ids) == 1 for s in self.seqs)


class _Step:
    """The step being planned: token budget left, scheduled sequences, preemptions."""

    def __init__(self, budget: int, page_size: int):
        self.budget = budget
        self.num_tokens = 0  # planned so far
        self.page_size = page_size
        self.seqs: list[ScheduledSeq] = []
        self.ids: set[str] = set()
        self.preempted: list[str] = []

    def add(self, seq: Sequence, num_tokens: int, num_steps: int = 1) -> None:
        start, size = seq.num_computed_tokens, self.page_size
        positions = range(start, start + num_tokens)
        self.seqs.append(
            ScheduledSeq(
                request_id=seq.request_id,
                token_ids=tuple(seq.token_ids[start : start + num_tokens]),
                start_pos=start,
                block_table=tuple(seq.block_table),
                slot_mapping=tuple(seq.block_table[p // size] * size + p % size for p in positions),
                sample=start + num_tokens == seq.num_tokens,
                arrival=seq.arrival,
                num_steps=num_steps,
            )
        )
        self.ids.add(seq.request_id)
        self.budget -= num_tokens
        self.num_tokens += num_tokens

    def plan(self) -> StepPlan:
        return StepPlan(tuple(self.seqs), tuple(self.preempted))


class Scheduler:
    """Waiting and running queues over a PageAllocator; turns them into StepPlans.

    Attributes:
      config: the SchedulerConfig.
      allocator: the host PageAllocator of the KV pool.
      waiting: sequences without pages, next to admit first.
      running: sequences holding pages, oldest arrival first.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.allocator = PageAllocator(
            config.num_pages, config.page_size, config.enable_prefix_caching
        )
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}  # every unfinished sequence
        self._arrivals = itertools.count()

    # ---- requests ----

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence.

        Raises:
          ValueError: a request that could never run (empty prompt, max_tokens < 1, prompt +
            max_tokens past max_model_len, more pages than the pool) or a duplicate id.
        """
        self.check(seq)
        seq.arrival = next(self._arrivals)
        self.waiting.append(seq)
        self._requests[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished sequence `request_id`, or None."""
        return self._requests.get(request_id)

    def planned(self, item: ScheduledSeq) -> Sequence | None:
        """The unfinished sequence a plan entry was made for; None once it finished or aborted,
        even if a newer sequence has taken its request id since."""
        seq = self._requests.get(item.request_id)
        return seq if seq is not None and seq.arrival == item.arrival else None

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self._requests)

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """Finishes an unfinished sequence now (e.g. "stop" on a stop string) and frees its pages.

        Returns:
          The finished sequence, or None if `request_id` is not unfinished.
        """
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        seq = self._requests.get(request_id)
        if seq is not None:
            self._finish(seq, reason)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finishes `request_id` with reason "abort", whatever its state; None if unknown."""
        return self.finish(request_id, "abort")

    # ---- the step ----

    def schedule(self, decode_steps: int = 1) -> StepPlan:
        """Plans the next step: decodes, then prefill chunks, then admissions (see module doc);
        with `decode_steps` k > 1, up to k decode steps per sequence where the module doc says."""
        step = _Step(self.config.max_num_batched_tokens, self.config.page_size)
        # A sequence whose pending token is its last (max_tokens) finishes when it resolves.
        live = [s for s in self.running if s.num_output_tokens < s.max_tokens]
        if decode_steps > 1 and self._schedule_decode_steps(live, decode_steps, step):
            return step.plan()
        for seq in [s for s in live if s.num_uncomputed_tokens == 1]:
            self._schedule_running(seq, step)
        for seq in [s for s in live if s.num_uncomputed_tokens > 1]:
            self._schedule_running(seq, step)
        if not step.preempted:  # else pages are short: don't admit the ones just preempted
            self._admit_waiting(step, len(live))
        return step.plan()

    def update(self, plan: StepPlan, sampled: dict) -> list[Sequence]:
        """Applies a computed step: `commit(plan)` then `resolve(plan, sampled)`.

        Args:
          plan: the plan returned by the last `schedule()`.
          sampled: request id -> sampled token (or its entry's `num_steps` tokens, in order), for
            every plan entry with `sample` set.

        Returns:
          The sequences that got a new token this step (finished ones included).
        """
        self.commit(plan)
        return self.resolve(plan, sampled)

    def commit(self, plan: StepPlan) -> None:
        """Marks the plan's tokens computed and appends a PLACEHOLDER for each sample.

        Call it before the next `schedule()`, and only once every earlier plan is resolved (full
        pages are keyed by their tokens: those of known tokens only).
        """
        for item in plan.seqs:
            seq = self.planned(item)
            if seq is None:  # aborted or finished since the plan was made
                continue
            if seq.num_computed_tokens != item.start_pos:
                raise ValueError(f"stale plan for {item.request_id!r}")
            seq.num_computed_tokens += len(item.token_ids) + item.num_steps - 1
            self.allocator.register_full_pages(seq, min(seq.num_computed_tokens, seq.num_tokens))
            if item.sample:
                seq.token_ids.extend([PLACEHOLDER] * item.num_steps)

    def resolve(self, plan: StepPlan, sampled: dict) -> list[Sequence]:
        """Puts a committed plan's sampled tokens in place (see `update`); a stop id or the
        length limit finishes a sequence, and its samples after that one are dropped.

        Returns:
          The sequences that got new tokens (finished ones included).
        """
        changed = []
        for item in plan.seqs:
            seq = self.planned(item)
            if seq is None or not item.sample:  # finished or aborted meanwhile: token dropped
                continue
            at = item.start_pos + len(item.token_ids)
            if seq.token_ids[at] != PLACEHOLDER:
                raise ValueError(f"plan for {item.request_id!r} resolved twice or never committed")
            tokens = sampled[item.request_id]
            tokens = (
                list(tokens[: item.num_steps]) if isinstance(tokens, (list, tuple)) else [tokens]
            )
            if len(tokens) != item.num_steps:
                raise ValueError(
                    f"plan for {item.request_id!r} samples {item.num_steps} tokens, "
                    f"got {len(tokens)}"
                )
            reason = None
            for j, token in enumerate(tokens):
                seq.token_ids[at + j] = token
                reason = self._finish_reason(seq, token, at + j + 1)
                if reason is not None:  # the samples after it are dropped
                    del seq.token_ids[at + j + 1 :]
                    seq.num_computed_tokens = min(seq.num_computed_tokens, at + j)
                    break
            self.allocator.register_full_pages(seq, seq.num_computed_tokens)
            if reason is not None:
                self._finish(seq, reason)
            changed.append(seq)
        return changed

    def drop_all_pages(self) -> None:
        """Every running sequence gives its pages back and waits to recompute, and the prefix
        cache is forgotten: for when the device pages were lost (rebuilt after a fault)."""
        for seq in reversed(self.running):
            while seq.has_pending_token:  # its step is lost: sampled again after the recompute
                seq.token_ids.pop()
            self._preempt(seq)
        self.allocator.forget_cache()

    def check(self, seq: Sequence) -> None:
        """Raises ValueError if `add(seq)` would refuse it (see `add`); changes nothing."""
        c, rid = self.config, seq.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already queued")
        if seq.status is not SequenceStatus.WAITING or seq.num_output_tokens or seq.block_table:
            raise ValueError(f"request {rid!r}: add a new Sequence")
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if seq.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {seq.max_tokens}")
        total = seq.num_prompt_tokens + seq.max_tokens
        if total > c.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt ({seq.num_prompt_tokens} tokens) + max_tokens "
                f"({seq.max_tokens}) = {total} tokens exceeds max_model_len ({c.max_model_len})"
            )
        if total > pool_tokens(c.num_pages, c.page_size):
            pages = -(-(total - 1) // c.page_size)
            raise ValueError(
                f"request {rid!r}: prompt + max_tokens needs {pages} KV pages of {c.page_size} "
                f"tokens, more than the whole pool (num_pages={c.num_pages})"
            )

    # ---- internals ----

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed_tokens, budget)
        if self.config.long_prefill_token_threshold is not None:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _schedule_running(self, seq: Sequence, step: _Step) -> None:
        if seq.status is not SequenceStatus.RUNNING:  # preempted earlier this step
            return
        if not self._fits_all_logits(seq, step):
            return
        n = self._num_new_tokens(seq, step.budget)
        if n > 0 and self._make_room(seq, n, step):
            step.add(seq, n)

    @staticmethod
    def _fits_all_logits(seq: Sequence, step: _Step) -> bool:
        """A prompt chunk of a sequence that needs every prompt token's logits joins a step of
        at most ALL_LOGITS_TOKENS tokens (its forward keeps [T, V] float32 logits): caps the
        step's budget, or False where the step holds that many already."""
        if not (seq.all_prompt_logits and seq.num_computed_tokens < seq.num_prompt_tokens):
            return True
        room = ALL_LOGITS_TOKENS - step.num_tokens
        if room <= 0:
            return False
        step.budget = min(step.budget, room)
        return True

    def _make_room(self, seq: Sequence, num_tokens: int, step: _Step) -> bool:
        """Reserves `seq`'s pages for `num_tokens` more, preempting the newest unscheduled."""
        total = seq.num_computed_tokens + num_tokens
        while not self.allocator.can_reserve(seq, total):
            victim = next(s for s in reversed(self.running) if s.request_id not in step.ids)
            self._preempt(victim)
            step.preempted.append(victim.request_id)
            if victim is seq:
                return False
        self.allocator.reserve(seq, total)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, step: _Step, seats_taken: int) -> None:
        """Admits waiting sequences while budget, pages and seats allow; `seats_taken`: the
        running sequences that go on after the step in flight (those it ends by length give
        their seats up, module doc)."""
        while self.waiting and step.budget > 0 and seats_taken < self.config.max_num_seqs:
            if not self._admit(self.waiting[0], step):
                break
            seats_taken += 1

    def _admit(self, seq: Sequence, step: _Step) -> bool:
        """Gives the first waiting sequence its cached prefix and pages for a first chunk."""
        # Preempted ones wait at least one step, so their pending token resolved meanwhile.
        assert not seq.has_pending_token, f"{seq.request_id!r} admitted with a pending token"
        if not self._fits_all_logits(seq, step):
            return False
        cached = 0 if seq.all_prompt_logits else self.allocator.allocate_prompt(seq)
        seq.num_computed_tokens = cached
        n = self._num_new_tokens(seq, step.budget)
        if not self.allocator.can_reserve(seq, cached + n):
            self.allocator.free(seq)  # give the cached pages back; wait for pages
            seq.num_computed_tokens = 0
            return False
        self.allocator.reserve(seq, cached + n)
        if not seq.num_preemptions:  # a re-admission finds its own pages, not the prompt's
            seq.num_cached_tokens = cached
        seq.status = SequenceStatus.RUNNING
        self.waiting.popleft()
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        step.add(seq, n)
        return True

    @staticmethod
    def _finish_reason(seq: Sequence, token: int, num_tokens: int) -> str | None:
        """Why `seq` ends with `token` as its `num_tokens`-th token, or None if it goes on."""
        if token in seq.stop_token_ids:
            return "stop"
        if num_tokens - seq.num_prompt_tokens >= seq.max_tokens:
            return "length"
        return None

    def _schedule_decode_steps(self, live: list[Sequence], k: int, step: _Step) -> bool:
        """Plans up to k decode steps for every live sequence (module doc), or returns False
        and plans nothing: a sequence still prefills, a waiting request could be admitted now,
        or the pages for all of them are not free without preempting, or fewer than half of the
        program's row-steps would be live (most rows reach max_tokens within it)."""
        if not live or any(s.num_uncomputed_tokens != 1 for s in live):
            return False
        if self.waiting and len(live) < self.config.max_num_seqs:
            return False
        counts = [min(k, s.max_tokens - s.num_output_tokens) for s in live]
        if 2 * sum(counts) < k * len(live):
            # Most rows end within the program, which still runs k steps of every row: single
            # steps, whose rows shrink as sequences end, do less work.
            return False
        need = sum(
            self.allocator.pages_needed(s, s.num_computed_tokens + n) for s, n in zip(live, counts)
        )
        if need > self.allocator.num_free_pages:
            return False
        for seq, n in zip(live, counts):
            self.allocator.reserve(seq, seq.num_computed_tokens + n)
            step.add(seq, 1, num_steps=n)
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.allocator.free(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._requests[seq.request_id]
