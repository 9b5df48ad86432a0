"""The scheduler, driven by a fake model that reads its context back from fake KV pages.

The fake model's next token is a hand-computable function of the whole context:
(sum of the tokens + the last token + 1) % 97. It reads the context from the slots the plans
wrote, so a wrong block table, slot mapping, position or prefix-cache hit changes the output.
"""

import random

import pytest

from jaxinfer.scheduler import Scheduler, SchedulerConfig, Sequence, SequenceStatus


def next_token(context):
    return (sum(context) + context[-1] + 1) % 97


def run_alone(prompt, max_tokens, stop=()):
    """The reference output: the fake model run on one sequence, no cache involved."""
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in stop:
            break
    return out


def config(**overrides):
    fields = dict(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, page_size=4, num_pages=32
    )
    return SchedulerConfig(**{**fields, **overrides})


class FakeModel:
    """A KV pool of (position, token) per slot; samples next_token of the context it reads."""

    def __init__(self, scheduler):
        self.scheduler, self.slots = scheduler, {}
        self.computed_tokens = 0

    def step(self, plan):
        alloc, size = self.scheduler.allocator, self.scheduler.config.page_size
        for item in plan.seqs:
            for i, (token, slot) in enumerate(zip(item.token_ids, item.slot_mapping)):
                page = slot // size
                assert alloc.ref_count(page) == 1 and not alloc.is_cached(page), "shared write"
                self.slots[slot] = (item.start_pos + i, token)
        self.computed_tokens += plan.num_tokens
        return {
            item.request_id: next_token(self.context(item)) for item in plan.seqs if item.sample
        }

    def context(self, item):
        size, tokens = self.scheduler.config.page_size, []
        for pos in range(item.start_pos + len(item.token_ids)):
            held_pos, token = self.slots[item.block_table[pos // size] * size + pos % size]
            assert held_pos == pos
            tokens.append(token)
        return tokens


def check_plan(plan, cfg):
    assert plan.num_tokens <= cfg.max_num_batched_tokens
    assert plan.num_seqs <= cfg.max_num_seqs
    assert len({s.request_id for s in plan.seqs}) == plan.num_seqs
    slots = [slot for s in plan.seqs for slot in s.slot_mapping]
    assert len(set(slots)) == len(slots)
    for s in plan.seqs:
        assert len(s.token_ids) >= 1 and len(s.slot_mapping) == len(s.token_ids)
        positions = range(s.start_pos, s.start_pos + len(s.token_ids))
        assert list(s.slot_mapping) == [
            s.block_table[p // cfg.page_size] * cfg.page_size + p % cfg.page_size for p in positions
        ]


def live_seqs(sched):
    return list(sched.running) + list(sched.waiting)


def run_engine(cfg, requests, arrivals=None, abort_prob=0.0, seed=0):
    """Drives schedule/update to the end; requests = [(prompt, max_tokens, stop)].

    Returns the sequences, the fake model and the plans.
    """
    rng = random.Random(seed)
    sched = Scheduler(cfg)
    model, plans = FakeModel(sched), []
    seqs = [Sequence(f"r{i}", p, m, s) for i, (p, m, s) in enumerate(requests)]
    arrivals = arrivals or [0] * len(seqs)
    pending = sorted(zip(arrivals, range(len(seqs))))
    for step in range(10_000):
        while pending and pending[0][0] <= step:
            sched.add(seqs[pending.pop(0)[1]])
        if not pending and not sched.has_unfinished():
            break
        if abort_prob and rng.random() < abort_prob and live_seqs(sched):
            sched.abort(rng.choice(live_seqs(sched)).request_id)
        plan = sched.schedule()
        check_plan(plan, cfg)
        assert plan.num_seqs or not sched.has_unfinished(), "stalled"
        sched.update(plan, model.step(plan))
        sched.allocator.check_invariants(live_seqs(sched))
        plans.append(plan)
    assert not sched.has_unfinished()
    alloc = sched.allocator
    assert alloc.num_free_pages == cfg.num_pages
    assert all(alloc.ref_count(p) == 0 for p in range(cfg.num_pages))
    return seqs, model, plans


def random_requests(rng, n):
    requests = []
    for _ in range(n):
        prompt = [rng.randrange(97) for _ in range(rng.randrange(1, 30))]
        stop = {rng.randrange(97) for _ in range(rng.randrange(3))}
        requests.append((prompt, rng.randrange(1, 20), stop))
    return requests


# ---- config and refusal ----


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", -1),
        ("max_model_len", 1.5),
        ("page_size", 0),
        ("num_pages", None),
        ("long_prefill_token_threshold", 0),
        ("enable_prefix_caching", "yes"),
    ],
)
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_config_budget_must_fit_every_decode():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        config(max_num_seqs=8, max_num_batched_tokens=4)


def test_add_refuses_requests_that_never_fit():
    sched = Scheduler(config(max_model_len=20, num_pages=2))  # pool: 2 pages of 4 tokens
    with pytest.raises(ValueError, match=r"= 21 tokens exceeds max_model_len \(20\)"):
        sched.add(Sequence("a", range(15), 6))
    with pytest.raises(ValueError, match=r"needs 3 KV pages .*num_pages=2"):
        sched.add(Sequence("b", range(5), 5))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence("c", [], 5))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add(Sequence("d", [1], 0))
    sched.add(Sequence("e", [1], 1))
    with pytest.raises(ValueError, match="already queued"):
        sched.add(Sequence("e", [1], 1))
    assert [s.request_id for s in sched.waiting] == ["e"]


def test_request_that_exactly_fills_the_pool_runs():
    # 5 prompt + 4 output tokens: the last output is never computed, so 8 slots = 2 pages
    cfg = config(num_pages=2)
    seqs, _, _ = run_engine(cfg, [([3, 1, 4, 1, 5], 4, ())])
    assert seqs[0].output_token_ids == run_alone([3, 1, 4, 1, 5], 4)


# ---- plans ----


def test_prefill_then_decode_plans():
    sched = Scheduler(config())
    sched.add(Sequence("a", [5, 6, 7, 8, 9, 10], 3))
    plan = sched.schedule()
    (item,) = plan.seqs
    pages = item.block_table
    assert (item.token_ids, item.start_pos, item.sample) == ((5, 6, 7, 8, 9, 10), 0, True)
    assert item.slot_mapping == tuple(
        [pages[0] * 4 + i for i in range(4)] + [pages[1] * 4, pages[1] * 4 + 1]
    )
    (seq,) = sched.update(plan, {"a": 42})
    assert seq.output_token_ids == [42] and seq.num_computed_tokens == 6
    (item,) = sched.schedule().seqs
    assert (item.token_ids, item.start_pos, item.sample) == ((42,), 6, True)
    assert item.slot_mapping == (pages[1] * 4 + 2,)


def test_chunked_prefill_shares_steps_with_decodes():
    cfg = config(max_num_batched_tokens=8)
    seqs, _, plans = run_engine(
        cfg, [([1, 2, 3], 6, ()), (list(range(20)), 2, ())], arrivals=[0, 1]
    )
    shape = [[(s.request_id, len(s.token_ids), s.sample) for s in p.seqs] for p in plans[:4]]
    assert shape == [
        [("r0", 3, True)],
        [("r0", 1, True), ("r1", 7, False)],
        [("r0", 1, True), ("r1", 7, False)],
        [("r0", 1, True), ("r1", 6, True)],
    ]
    assert [s.output_token_ids for s in seqs] == [run_alone([1, 2, 3], 6), run_alone(range(20), 2)]


def test_long_prefill_token_threshold_caps_chunks():
    cfg = config(long_prefill_token_threshold=5)
    _, _, plans = run_engine(cfg, [(list(range(12)), 1, ())])
    assert [len(p.seqs[0].token_ids) for p in plans] == [5, 5, 2]


def test_decodes_come_before_older_prefill_chunks():
    cfg = config(max_num_batched_tokens=8, long_prefill_token_threshold=4)
    _, _, plans = run_engine(cfg, [(list(range(30)), 1, ()), ([1, 2], 3, ())])
    shape = [[(s.request_id, len(s.token_ids)) for s in p.seqs] for p in plans[:3]]
    assert shape == [[("r0", 4), ("r1", 2)], [("r1", 1), ("r0", 4)], [("r1", 1), ("r0", 4)]]


def test_max_num_seqs_limits_running():
    cfg = config(max_num_seqs=2)
    requests = [([i + 1], 5, ()) for i in range(5)]
    seqs, _, plans = run_engine(cfg, requests)
    assert max(p.num_seqs for p in plans) == 2
    assert [s.output_token_ids for s in seqs] == [run_alone(*r) for r in requests]


def test_a_seat_the_step_in_flight_frees_by_length_admits_at_once():
    """Planned while the step before runs (asynchronous scheduling: committed, not resolved), a
    sequence whose pending token is its last by max_tokens gives its seat to a waiting one in
    that same plan; a pending token that may not be the last keeps the seat."""
    sched = Scheduler(config(max_num_seqs=2))
    model = FakeModel(sched)
    for i, (prompt, max_tokens) in enumerate([([1, 2], 1), ([3, 4], 5), ([5, 6], 3)]):
        sched.add(Sequence(f"r{i}", prompt, max_tokens))
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["r0", "r1"]
    sampled = model.step(first)
    sched.commit(first)  # in flight: r0's pending token is its last, r1's is not
    second = sched.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in second.seqs] == [("r1", 1), ("r2", 2)]
    check_plan(second, sched.config)
    sched.resolve(first, sampled)
    assert sched.get("r0") is None and first.seqs[0].request_id == "r0"
    assert [s.request_id for s in sched.running] == ["r1", "r2"] and not sched.waiting
    sched.allocator.check_invariants(live_seqs(sched))


# ---- finishing ----


def test_stop_token_and_length():
    prompt = [10, 20]
    full = run_alone(prompt, 10)
    requests = [(prompt, 10, {full[3]}), (prompt, 3, ())]
    seqs, _, _ = run_engine(config(), requests)
    assert seqs[0].output_token_ids == full[:4] and seqs[0].finish_reason == "stop"
    assert seqs[1].output_token_ids == full[:3] and seqs[1].finish_reason == "length"


def test_engine_finishes_a_sequence_for_a_stop_string():
    sched = Scheduler(config())
    model = FakeModel(sched)
    sched.add(Sequence("a", [1, 2, 3, 4, 5], 10))
    for _ in range(3):
        plan = sched.schedule()
        sched.update(plan, model.step(plan))
    seq = sched.finish("a", "stop")
    assert seq.is_finished and seq.finish_reason == "stop" and seq.num_output_tokens == 3
    assert not sched.has_unfinished() and sched.allocator.num_free_pages == 32
    assert sched.finish("a", "stop") is None
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish("a", "done")


def test_abort_in_each_state_frees_pages():
    sched = Scheduler(config(max_num_seqs=1))
    model = FakeModel(sched)
    sched.add(Sequence("run", list(range(10)), 5))
    sched.add(Sequence("wait", [1, 2], 5))
    plan = sched.schedule()
    assert sched.get("run").status is SequenceStatus.RUNNING
    assert sched.get("wait").status is SequenceStatus.WAITING
    assert sched.abort("wait").finish_reason == "abort"
    sampled = model.step(plan)
    sched.abort("run")  # between the step and its update: the update skips it
    assert sched.update(plan, sampled) == []
    assert sched.allocator.num_free_pages == 32 and not sched.has_unfinished()
    assert sched.abort("run") is None


# ---- preemption, aborts, prefix caching under load ----


@pytest.mark.parametrize("caching", [False, True])
def test_preempted_sequence_recomputes_and_resumes(caching):
    # 4 pages of 2 tokens; two sequences of 2 prompt tokens growing to 5 tokens each
    cfg = config(page_size=2, num_pages=4, max_model_len=16, enable_prefix_caching=caching)
    seqs, _, plans = run_engine(cfg, [([1, 2], 4, ()), ([3, 4], 4, ())])
    preempting = next(p for p in plans if p.preempted)
    assert preempting.preempted == ("r1",)  # the newest loses its pages
    resumed = next(
        s for p in plans[plans.index(preempting) + 1 :] for s in p.seqs if s.request_id == "r1"
    )
    # it recomputes prompt + output so far; with caching its own full first page is a hit
    assert resumed.start_pos == (2 if caching else 0)
    assert resumed.start_pos + len(resumed.token_ids) > 2 and resumed.sample
    assert seqs[1].num_preemptions == 1
    assert seqs[1].num_cached_tokens == 0  # its own pages found again are no prompt cache hit
    assert [s.output_token_ids for s in seqs] == [run_alone([1, 2], 4), run_alone([3, 4], 4)]


def test_preempted_sequence_goes_to_the_front_of_the_queue():
    # 4 pages of 2 tokens, 2 seats: r0 and r1 outgrow the pool while r2 waits
    cfg = config(page_size=2, num_pages=4, max_model_len=16, max_num_seqs=2)
    sched = Scheduler(cfg)
    model = FakeModel(sched)
    for i in range(3):
        sched.add(Sequence(f"r{i}", [2 * i + 1, 2 * i + 2], 4))
    for _ in range(10):
        plan = sched.schedule()
        if plan.preempted:
            break
        sched.update(plan, model.step(plan))
    assert plan.preempted == ("r1",) and [s.request_id for s in plan.seqs] == ["r0"]
    assert [s.request_id for s in sched.waiting] == ["r1", "r2"]
    assert sched.get("r1").block_table == [] and sched.get("r1").num_output_tokens == 3


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_outputs_match_running_alone_under_preemption(seed, caching):
    rng = random.Random(seed)
    requests = random_requests(rng, 16)
    arrivals = sorted(rng.randrange(30) for _ in requests)
    cfg = config(num_pages=14, max_num_batched_tokens=12, enable_prefix_caching=caching)
    seqs, _, plans = run_engine(cfg, requests, arrivals)
    assert [s.output_token_ids for s in seqs] == [run_alone(*r) for r in requests]
    assert sum(s.num_preemptions for s in seqs) > 0
    assert any(p.num_seqs > 1 and any(not s.sample for s in p.seqs) for p in plans)


@pytest.mark.parametrize("seed", range(3))
def test_random_aborts_free_pages(seed):
    rng = random.Random(seed)
    requests = random_requests(rng, 16)
    arrivals = sorted(rng.randrange(30) for _ in requests)
    cfg = config(num_pages=14, max_num_batched_tokens=12)
    seqs, _, _ = run_engine(cfg, requests, arrivals, abort_prob=0.15, seed=seed)
    aborted = [s for s in seqs if s.finish_reason == "abort"]
    assert aborted and len(aborted) < len(seqs)
    for seq, request in zip(seqs, requests):  # run_engine checked every page is free
        expected = run_alone(*request)
        if seq.finish_reason == "abort":
            assert seq.output_token_ids == expected[: seq.num_output_tokens]
        else:
            assert seq.output_token_ids == expected


def test_prefix_cache_hits_skip_compute_with_identical_outputs():
    system = list(range(40, 56))  # 16 tokens = 4 full pages
    requests = [(system + [i, i + 1, i + 2], 5, ()) for i in range(4)]
    arrivals = [0, 20, 40, 60]  # each arrives after the one before finished
    runs = {}
    for caching in (True, False):
        runs[caching] = run_engine(config(enable_prefix_caching=caching), requests, arrivals)
    (cached_seqs, cached_model, _), (plain_seqs, plain_model, _) = runs[True], runs[False]
    assert [s.output_token_ids for s in cached_seqs] == [s.output_token_ids for s in plain_seqs]
    assert [s.output_token_ids for s in cached_seqs] == [run_alone(*r) for r in requests]
    assert [s.num_cached_tokens for s in cached_seqs] == [0, 16, 16, 16]
    assert plain_model.computed_tokens - cached_model.computed_tokens == 3 * 16


def test_prefix_cache_shared_by_concurrent_sequences():
    system = list(range(60, 72))  # 12 tokens = 3 full pages
    requests = [(system + [i], 8, ()) for i in range(3)]
    seqs, _, _ = run_engine(config(max_num_batched_tokens=13), requests, arrivals=[0, 1, 1])
    assert [s.num_cached_tokens for s in seqs] == [0, 12, 12]
    assert [s.output_token_ids for s in seqs] == [run_alone(*r) for r in requests]
