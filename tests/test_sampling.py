"""The per-row sampler: hand-checked penalties, filters, batch-independence, frequencies, logprobs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampling import (
    GREEDY_BELOW,
    MAX_LOGPROBS,
    SAMPLE_MODES,
    TOP_K_ONLY,
    SampleOutput,
    SamplingArrays,
    SamplingParams,
    _fold_seed,
    add_bias_entries,
    apply_logit_bias,
    apply_penalties,
    bias_entries,
    logit_bias_arrays,
    sample_mode,
    sample_rows,
    sampler_mode,
    sampling_arrays,
    top_k,
)

SAMPLERS = {mode: jax.jit(functools.partial(sample_rows, mode=mode)) for mode in SAMPLE_MODES}
NEUTRAL = dict(
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    seed=0,
    step=0,
    num_logprobs=0,
)
DTYPES = dict(top_k=np.int32, seed=np.uint32, step=np.int32, num_logprobs=np.int32)


def rows(b: int, **fields) -> SamplingArrays:
    """[b] arrays: NEUTRAL settings, each field overridable by a scalar or a length-b sequence."""
    values = {**NEUTRAL, **fields}

    def column(name):
        value = np.asarray(values[name], DTYPES.get(name, np.float32))
        return np.broadcast_to(value, (b,)).copy()

    return SamplingArrays(*(column(name) for name in SamplingArrays._fields))


def cheapest_mode(arrays: SamplingArrays) -> str:
    """`sample_mode` of the SamplingParams these [B] arrays were built from."""
    sampling = np.asarray(arrays.temperature) > 0
    filtered = (
        (np.asarray(arrays.top_k) > 0)
        | (np.asarray(arrays.top_p) < 1)
        | (np.asarray(arrays.min_p) > 0)
    )
    if (sampling & filtered).any():
        return "filter"
    return "sample" if (sampling | (np.asarray(arrays.num_logprobs) > 0)).any() else "greedy"


def sample_jit(logits, arrays: SamplingArrays, history=None) -> SampleOutput:
    """`sample_rows` in every static mode that serves the batch (the engine's cheapest one and
    each more general one): they must give the same tokens and logprobs (and, past greedy, the
    same top logprobs). Returns the cheapest mode's output."""
    modes = SAMPLE_MODES[SAMPLE_MODES.index(cheapest_mode(arrays)) :]
    first, *others = (SAMPLERS[mode](logits, arrays, history) for mode in modes)
    for mode, out in zip(modes[1:], others):
        fields = SampleOutput._fields if modes[0] != "greedy" else ("tokens", "logprob")
        for name in fields:
            np.testing.assert_allclose(
                np.asarray(getattr(out, name)),
                np.asarray(getattr(first, name)),
                rtol=1e-6,
                err_msg=f"{modes[0]} vs {mode}: {name}",
            )
    return first


def take_rows(arrays: SamplingArrays, index) -> SamplingArrays:
    return SamplingArrays(*(np.asarray(x)[index] for x in arrays))


def frequencies(logits: np.ndarray, n: int, **fields) -> np.ndarray:
    """[V] frequencies of n draws of one logits row, over seeds 0..n/2 and steps 0, 1."""
    seeds = np.repeat(np.arange(n // 2), 2)
    steps = np.tile([0, 1], n // 2)
    batch = np.broadcast_to(np.asarray(logits, np.float32), (n, len(logits)))
    tokens = np.asarray(sample_jit(batch, rows(n, seed=seeds, step=steps, **fields)).tokens)
    return np.bincount(tokens, minlength=len(logits)) / n


# ---------------------------------------------------------------------------------------------
# Penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    history = jnp.array([[0, 1, -1, -1]])  # tokens 0 and 1 seen; -1 is padding
    out = apply_penalties(logits, rows(1, repetition_penalty=2.0), history)
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])


def test_presence_and_frequency_count_only_output_tokens():
    logits = jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0]])
    history = jnp.array([[0, 4, 1, 1, 2, -1, -1]])
    is_output = jnp.array([[False, False, True, True, True, True, True]])  # 0, 4: prompt
    out = apply_penalties(
        logits, rows(1, presence_penalty=0.5, frequency_penalty=0.25), history, is_output
    )
    # token 1: twice in output → 1 - 0.5 - 2 × 0.25; token 2: once → 1 - 0.5 - 0.25.
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.25, 1.0, 1.0]])


def test_repetition_covers_prompt_and_all_penalties_compose():
    logits = jnp.array([[4.0, -2.0, 3.0]])
    history = jnp.array([[0, 1, 1, -1]])
    is_output = jnp.array([[True, False, True, False]])  # token 0 output, token 1 prompt + output
    out = apply_penalties(
        logits,
        rows(1, repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5),
        history,
        is_output,
    )
    # token 0: 4 / 2 - 1 - 0.5; token 1: -2 × 2 - 1 - 0.5 (one output occurrence); token 2 untouched.
    np.testing.assert_allclose(out, [[0.5, -5.5, 3.0]])


def test_padding_only_history_and_neutral_rows_are_untouched():
    logits = jnp.array([[1.0, -1.0, 2.0], [1.0, -1.0, 2.0]])
    history = jnp.array([[-1, -1], [0, 1]])
    arrays = rows(
        2, repetition_penalty=[3.0, 1.0], presence_penalty=[1.0, 0.0], frequency_penalty=[1.0, 0.0]
    )
    np.testing.assert_array_equal(apply_penalties(logits, arrays, history), logits)


def test_penalties_apply_to_greedy_rows_but_not_to_logprobs():
    logits = jnp.array([[3.0, 2.9, 0.0]])
    history = jnp.array([[0]])
    out = sample_jit(logits, rows(1, temperature=0.0, repetition_penalty=2.0), history)
    assert int(out.tokens[0]) == 1  # 3.0 / 2 < 2.9
    np.testing.assert_allclose(out.logprob, jax.nn.log_softmax(logits)[:, 1], rtol=1e-6)
    assert int(sample_jit(logits, rows(1, temperature=0.0)).tokens[0]) == 0


# ---------------------------------------------------------------------------------------------
# Greedy and filters


def random_logits(b: int, v: int, seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (b, v)) * 3, np.float32)


def test_greedy_rows_take_the_argmax():
    logits = random_logits(16, 100)
    out = sample_jit(logits, rows(16, temperature=0.0, seed=np.arange(16)))
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_a_single_token_filter_is_greedy(setting):
    b = 32
    logits = random_logits(b, 100, seed=1)
    temperature = np.linspace(0.3, 3.0, b)
    for step in range(3):
        out = sample_jit(
            logits, rows(b, temperature=temperature, seed=np.arange(b), step=step, **setting)
        )
        np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Randomness: per-row keys


def test_a_seeded_row_is_independent_of_its_batch():
    """Row alone (B=1, short history) == the same row inside a batch of unlike rows, every step."""
    v, b = 64, 6
    others = rows(
        b,
        temperature=[0.0, 0.7, 1.3, 1.0, 0.0, 2.0],
        top_k=[0, 5, 0, 0, 3, 0],
        top_p=[1.0, 0.9, 0.5, 1.0, 1.0, 1.0],
        min_p=[0.0, 0.0, 0.1, 0.0, 0.0, 0.05],
        repetition_penalty=[1.0, 1.2, 1.0, 1.0, 1.5, 1.0],
        frequency_penalty=[0.0, 0.0, 0.5, 0.0, 0.0, 0.0],
        seed=[9, 8, 7, 6, 5, 4],
        num_logprobs=[0, 3, 0, 0, 0, 20],
    )
    ours = dict(temperature=1.0, seed=1234)  # no filters, no penalties: the cheapest path alone
    history = np.full((b, 8), -1, np.int32)
    history[:, :5] = np.arange(5 * b).reshape(b, 5) % v
    for step in range(6):
        logits = random_logits(b, v, seed=100 + step)
        alone = sample_jit(logits[3:4], rows(1, step=step, **ours), history[3:4, :5])
        batch = take_rows(others, slice(None))
        for name, value in ours.items():
            getattr(batch, name)[3] = value
        batch.step[:] = step
        together = sample_jit(logits, batch, history)
        assert int(alone.tokens[0]) == int(together.tokens[3])
        np.testing.assert_allclose(alone.logprob[0], together.logprob[3], rtol=1e-6)


def test_a_filtered_row_is_independent_of_its_batch():
    v = 64
    ours = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.02, seed=77)
    for step in range(6):
        logits = random_logits(4, v, seed=200 + step)
        alone = sample_jit(logits[:1], rows(1, step=step, **ours))
        batch = rows(4, step=step, **ours)
        batch.temperature[1:] = [0.0, 2.0, 0.5]
        batch.seed[1:] = [1, 2, 3]
        assert int(alone.tokens[0]) == int(sample_jit(logits, batch).tokens[0])


def test_seeds_and_steps_change_the_draw_and_repeat_exactly():
    logits = np.zeros((16, 1000), np.float32)  # uniform: collisions are rare
    a = np.asarray(sample_jit(logits, rows(16, seed=np.arange(16))).tokens)
    assert len(set(a.tolist())) > 8  # different seeds differ
    again = np.asarray(sample_jit(logits, rows(16, seed=np.arange(16))).tokens)
    np.testing.assert_array_equal(a, again)  # same seed and step repeat
    later = np.asarray(sample_jit(logits, rows(16, seed=np.arange(16), step=1)).tokens)
    assert (a != later).sum() > 8  # the step moves the stream on


# ---------------------------------------------------------------------------------------------
# Distributions


P4 = np.array([0.5, 0.3, 0.15, 0.05])
N_DRAWS = 8000
TOL = 0.025  # > 4 standard deviations at N_DRAWS


def test_frequencies_match_softmax_of_logits_over_temperature():
    logits = np.log(P4) + 1.7  # an offset changes nothing
    for temperature in (0.5, 1.0, 2.0):
        expected = np.asarray(jax.nn.softmax(logits / temperature))
        got = frequencies(logits, N_DRAWS, temperature=temperature)
        np.testing.assert_allclose(got, expected, atol=TOL)


@pytest.mark.parametrize(
    "setting, support",
    [
        (dict(top_k=2), [0, 1]),
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_p=0.7), [0, 1]),  # mass before each: 0, .5, .8, .95
        (dict(top_p=0.85), [0, 1, 2]),
        (dict(min_p=0.5), [0, 1]),  # keep p >= .25
        (dict(min_p=0.2), [0, 1, 2]),  # keep p >= .1
        (dict(top_k=3, top_p=0.6), [0, 1]),  # top-p on the top-3 renormalised: .53, .32, .16
        # min-p first (vLLM's order): .5, .3 renormalised are .625, .375, and .625 reaches .6
        (dict(top_p=0.6, min_p=0.5), [0]),
        (dict(top_k=3, min_p=0.2, top_p=0.9), [0, 1, 2]),  # .53, .32, .16 after min-p
    ],
)
def test_filters_keep_their_support_and_renormalise(setting, support):
    got = frequencies(np.log(P4), N_DRAWS, **setting)
    outside = np.setdiff1d(np.arange(4), support)
    assert got[outside].sum() == 0  # never drawn
    expected = np.zeros(4)
    expected[support] = P4[support] / P4[support].sum()
    np.testing.assert_allclose(got, expected, atol=TOL)


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    """As vLLM: every token at least as likely as the k-th stays, so ties share the draws."""
    logits = np.array([2.0, 2.0, 0.0, 2.0, -1.0])
    got = frequencies(logits, N_DRAWS, top_k=1)
    np.testing.assert_allclose(got, [1 / 3, 1 / 3, 0, 1 / 3, 0], atol=TOL)
    got = frequencies(np.array([3.0, 1.0, 1.0, 0.0]), N_DRAWS, top_k=2)
    assert got[3] == 0 and got[1] > 0 and got[2] > 0


def test_the_filter_mask_keeps_a_prefix_of_the_stable_sort():
    """Among tied tokens a filter cuts through, the lower ids stay (the stable sort's order, as
    vLLM's), -0.0 tying with 0.0; the mask is built from the last token kept, not scattered."""
    from jaxinfer.sampling import _filter_mask

    tied = np.zeros((1, 10), np.float32)
    tied[0, 1] = -0.0
    cases = [  # (logits, settings, the ids kept)
        (tied, dict(top_p=0.35), [0, 1, 2, 3]),  # mass before the 4th: 0.3 < 0.35
        (tied, dict(top_k=2), list(range(10))),  # top-k keeps every token tied with the k-th
        (np.array([[1.0, 3.0, 3.0, -np.inf, 3.0, 2.0]], np.float32), dict(top_p=0.5), [1, 2]),
        (np.array([[-np.inf, 0.0, -np.inf]], np.float32), {}, [0, 1, 2]),  # filters off: all
        # top-p's softmax of an inf logit is NaN: nothing kept (the row then draws from -inf)
        (np.array([[0.5, -1.0, np.inf, np.inf, 1.0]], np.float32), dict(top_p=0.9), []),
    ]
    for logits, settings, kept in cases:
        mask = np.asarray(_filter_mask(jnp.asarray(logits), rows(1, **settings)))[0]
        np.testing.assert_array_equal(np.flatnonzero(mask), kept, err_msg=str(settings))


def test_the_filter_sorts_unsigned_keys_in_the_float_sort_order():
    """`_descending_keys` (uint32, which XLA sorts with CUB on a GPU) order every row exactly as a
    stable `argsort(-x)` of the floats: ties by id, ±0 equal, ±inf, subnormals, NaNs of either
    sign and any payload last."""
    from jaxinfer.sampling import _descending_keys

    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 500)).astype(np.float32) * 5
    x[1] = rng.integers(-3, 3, size=500)
    x[2, ::7], x[2, ::5], x[2, ::11], x[2, ::13] = -0.0, 0.0, np.inf, -np.inf
    x[3, ::17], x[3, ::23] = np.nan, -0.0
    x[3, ::19] = -np.float32(np.nan)  # sign bit set
    x[3, ::29] = np.array([0x7F800001], np.uint32).view(np.float32)[0]  # NaN payloads
    x[3, 1::29] = np.array([0xFFC00123], np.uint32).view(np.float32)[0]
    x[4] = -np.inf
    x[5] = -np.abs(x[5])
    x[5, ::31], x[5, 1::31] = 1e-40, -1e-40  # subnormals
    want = np.asarray(jnp.argsort(-jnp.asarray(x), axis=-1))
    keys = _descending_keys(jnp.asarray(x))
    assert keys.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(jnp.argsort(keys, axis=-1)), want)
    np.testing.assert_array_equal(want[2, :5], np.flatnonzero(x[2] == np.inf)[:5])


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """logits / 1e-38 overflow to inf (and top-p's softmax to NaN): below GREEDY_BELOW a row
    takes the argmax, as vLLM's does."""
    params = [
        SamplingParams(temperature=1e-38, top_p=0.9),
        SamplingParams(temperature=GREEDY_BELOW / 2),
        SamplingParams(temperature=GREEDY_BELOW, top_k=1),
        SamplingParams(top_k=-1),
    ]
    assert [p.greedy for p in params] == [True, True, False, False] and params[3].top_k == 0
    assert sample_mode(params[:2]) == "greedy" and sample_mode(params) == "filter"
    arrays = sampling_arrays(params, seeds=[0, 1, 2, 3], steps=[0] * 4, pad_to=4)
    np.testing.assert_allclose(arrays.temperature, [0.0, 0.0, GREEDY_BELOW, 1.0])
    logits = random_logits(4, 40, seed=6) * 10
    out = sample_jit(logits, arrays)
    np.testing.assert_array_equal(out.tokens[:3], logits[:3].argmax(-1))


# ---------------------------------------------------------------------------------------------
# Logprobs


def test_logprob_and_top_logprobs_come_from_the_raw_logits():
    b, v = 5, 50
    logits = random_logits(b, v, seed=3)
    history = np.array([[1, 2, 3]] * b, np.int32)
    out = sample_jit(
        logits,
        rows(
            b,
            temperature=0.7,
            top_k=8,
            repetition_penalty=1.5,
            presence_penalty=1.0,
            seed=np.arange(b),
            num_logprobs=[0, 5, 0, 20, 1],
        ),
        history,
    )
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprob, reference[np.arange(b), tokens], rtol=1e-5)
    top_ids = np.argsort(-reference, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, top_ids)
    np.testing.assert_allclose(
        out.top_logprobs, np.take_along_axis(reference, top_ids, -1), rtol=1e-5
    )
    assert np.all(np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0)


@pytest.mark.parametrize("values", ["normal", "ties", "mostly_inf", "all_inf"])
@pytest.mark.parametrize(
    "k, block, v", [(1, 8, 1000), (20, 8, 1003), (20, 64, 5000), (64, 16, 2051)]
)
def test_blockwise_top_k_equals_lax_top_k(values, k, block, v):
    """Values and ids, the lower id first among equal values, a vocab no multiple of the block."""
    rng = np.random.default_rng(k + v)
    x = {
        "normal": rng.normal(size=(6, v)),
        "ties": rng.integers(0, 3, size=(6, v)),  # thousands tied at the top value
        "mostly_inf": np.where(rng.random((6, v)) < 0.995, -np.inf, rng.normal(size=(6, v))),
        "all_inf": np.full((6, v), -np.inf),
    }[values]
    x = jnp.asarray(x, jnp.float32)
    want = jax.lax.top_k(x, k)
    got = jax.jit(top_k, static_argnums=(1, 2))(x, k, block)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_top_logprobs_of_a_large_vocab_sort_no_whole_row():
    """XLA's GPU top-k sorts whole rows for k > 16: the sampler's top-20 runs over blocks."""
    b, v = 3, 8192
    logits = random_logits(b, v, seed=5)
    arrays = rows(b, temperature=0.5, seed=np.arange(b), num_logprobs=MAX_LOGPROBS)
    fn = functools.partial(sample_rows, mode="sample")
    jaxpr = jax.make_jaxpr(fn)(jnp.asarray(logits), arrays)
    widths = [
        e.invars[0].aval.shape[-1] for e in _equations(jaxpr.jaxpr) if "top_k" in str(e.primitive)
    ]
    assert widths and max(widths) < v // 2
    out = jax.jit(fn)(logits, arrays)
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    top_ids = np.argsort(-reference, axis=-1, kind="stable")[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(out.top_ids, top_ids)
    np.testing.assert_array_equal(out.top_logprobs, np.take_along_axis(reference, top_ids, -1))


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (pjit, shard_map) included."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


def test_no_logprobs_wanted_gives_zeros():
    """Greedy rows without logprobs take the greedy mode, which skips the top-k of the logprobs
    (a sampling mode computes them for every row; the caller keeps the ones asked for)."""
    out = sample_jit(random_logits(3, 30), rows(3, temperature=0.0))
    assert out.top_ids.shape == (3, MAX_LOGPROBS) and out.top_logprobs.shape == (3, MAX_LOGPROBS)
    assert not np.any(out.top_ids) and not np.any(out.top_logprobs)


def test_a_vocab_smaller_than_max_logprobs_pads_the_top():
    logits = np.log(P4)[None].astype(np.float32)
    out = sample_jit(logits, rows(1, temperature=0.0, num_logprobs=MAX_LOGPROBS))
    np.testing.assert_array_equal(out.top_ids[0, :4], [0, 1, 2, 3])
    np.testing.assert_allclose(out.top_logprobs[0, :4], np.log(P4), rtol=1e-5)
    assert np.all(np.asarray(out.top_ids[0, 4:]) == -1)
    assert np.all(np.isneginf(out.top_logprobs[0, 4:]))


# ---------------------------------------------------------------------------------------------
# Host-side builder, jit, validation


def test_sampling_arrays_pads_with_greedy_rows():
    params = [
        SamplingParams(
            temperature=1.0,
            top_k=5,
            top_p=0.9,
            min_p=0.1,
            seed=3,
            logprobs=4,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        ),
        SamplingParams(temperature=0.8),
    ]
    arrays = sampling_arrays(params, seeds=[3, 2**40 + 1], steps=[7, 0], pad_to=4)
    assert all(np.asarray(x).shape == (4,) for x in arrays)
    np.testing.assert_allclose(arrays.temperature, [1.0, 0.8, 0.0, 0.0])
    np.testing.assert_array_equal(arrays.top_k, [5, 0, 0, 0])
    np.testing.assert_array_equal(arrays.num_logprobs, [4, 0, 0, 0])
    np.testing.assert_array_equal(arrays.step, [7, 0, 0, 0])
    assert arrays.seed.dtype == np.uint32 and arrays.seed[0] == 3  # < 2**32: as it is
    assert arrays.seed[1] == _fold_seed(2**40 + 1) != 1  # 64-bit seed folded
    np.testing.assert_allclose(arrays.repetition_penalty[2:], 1.0)
    np.testing.assert_allclose(arrays.presence_penalty[2:], 0.0)
    logits = random_logits(4, 40, seed=5)
    out = sample_jit(logits, arrays, np.tile(np.arange(6, dtype=np.int32), (4, 1)))
    np.testing.assert_array_equal(out.tokens[2:], logits[2:].argmax(-1))


def test_sampling_arrays_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="seed"):
        sampling_arrays([SamplingParams()], seeds=[], steps=[0], pad_to=2)
    with pytest.raises(ValueError, match="pad_to"):
        sampling_arrays([SamplingParams()] * 3, seeds=[0] * 3, steps=[0] * 3, pad_to=2)


def test_new_settings_do_not_recompile():
    traces = []

    @jax.jit
    def step(logits, arrays, history):
        traces.append(1)
        return sample_rows(logits, arrays, history, mode="filter")  # serves every batch

    logits = random_logits(4, 32)
    history = np.zeros((4, 0), np.int32)  # W = 0 works too
    for params in (
        [SamplingParams(temperature=0.0)] * 4,
        [SamplingParams(temperature=1.2, top_k=3, logprobs=2)] * 4,
        [SamplingParams(top_p=0.5, min_p=0.1, repetition_penalty=1.3)] * 4,
    ):
        out = step(logits, sampling_arrays(params, [1, 2, 3, 4], [0] * 4, 4), history)
        assert isinstance(out, SampleOutput) and out.tokens.shape == (4,)
    assert len(traces) == 1
    no_history = sample_jit(logits, rows(4, temperature=0.0))
    np.testing.assert_array_equal(no_history.tokens, logits.argmax(-1))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("temperature", -0.5),
        ("top_k", -2),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
    ],
)
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}[ \[]"):
        SamplingParams(**{field: value})


# ---------------------------------------------------------------------------------------------
# Static modes (the engine's sampler)


@pytest.mark.parametrize("case", SAMPLE_MODES)
def test_sample_mode_picks_the_cheapest_mode_that_serves_the_batch(case):
    """`sample_mode` picks `case` from the batch's SamplingParams, and that mode gives what every
    more general mode gives on the batch (`sample_jit` compares them), with and without history."""
    v, b = 96, 5
    params = {
        "greedy": [SamplingParams(temperature=0.0)] * b,
        "sample": [
            SamplingParams(temperature=0.0, logprobs=3),
            SamplingParams(temperature=0.8),
            SamplingParams(temperature=1.3, seed=4),
        ]
        + [SamplingParams(temperature=0)] * 2,
        "filter": [
            SamplingParams(temperature=0.9, top_k=7),
            SamplingParams(temperature=1.1, top_p=0.6),
            SamplingParams(temperature=0.7, min_p=0.2),
            SamplingParams(temperature=0.0, top_k=3),
            SamplingParams(temperature=1.0, logprobs=20),
        ],
    }[case]
    assert sample_mode(params) == case
    arrays = jax.tree.map(jnp.asarray, sampling_arrays(params, list(range(b)), [2] * b, pad_to=b))
    assert cheapest_mode(arrays) == case
    history = jnp.asarray(np.arange(4 * b).reshape(b, 4) % v, jnp.int32)
    for seed in range(3):
        logits = random_logits(b, v, seed=seed)
        for hist in (None, history):
            out = sample_jit(logits, arrays, hist)
            if case == "greedy":
                expected = logits if hist is None else apply_penalties(logits, arrays, hist)
                np.testing.assert_array_equal(out.tokens, np.argmax(expected, -1))
    with pytest.raises(ValueError, match="mode"):
        sample_rows(logits, arrays, mode="beam")


@pytest.mark.parametrize("v, ties", [(96, False), (96, True), (50_000, False)])
def test_top_k_batches_draw_among_candidates_as_among_whole_rows(v, ties):
    """A batch whose sampling rows all keep at most FILTER_CANDIDATES tokens by top-k samples in
    mode TOP_K_ONLY (among each row's top candidates, no sort of the whole row), with the
    tokens, logprobs and top logprobs of the whole-row filter, top-p and min-p rows included.
    Tied logits too, while no more than the candidates tie. At 50,000 the candidates come from
    the blockwise top-k (more than 2 x 256 blocks of 64)."""
    params = [
        SamplingParams(temperature=0.9, top_k=7),
        SamplingParams(temperature=1.1, top_k=256, top_p=0.6),
        SamplingParams(temperature=0.7, top_k=50, min_p=0.05),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.3, top_k=200, top_p=0.95, min_p=0.01, logprobs=2),
    ]
    assert sampler_mode(params) == TOP_K_ONLY
    assert sampler_mode([*params, SamplingParams(top_p=0.9)]) == "filter"  # no top-k: every token
    b = len(params)
    whole = jax.jit(functools.partial(sample_rows, mode="filter"))
    candidates = jax.jit(functools.partial(sample_rows, mode=TOP_K_ONLY))
    drawn = set()
    for step in range(12):
        arrays = sampling_arrays(params, list(range(b)), [step] * b, pad_to=b)
        arrays = jax.tree.map(jnp.asarray, arrays)
        logits = random_logits(b, v, seed=step)
        if ties:
            logits = np.round(logits / 3)  # integers: many tokens share each value
        want, got = whole(logits, arrays), candidates(logits, arrays)
        for name in SampleOutput._fields:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        drawn.update(np.asarray(got.tokens)[[1, 5]].tolist())
    assert len(drawn) > 6  # the top-p rows did sample, not only take their argmax


def test_only_the_filter_mode_branches():
    """A branch's predicate goes to the host, which waits for it: only mode "filter" has
    branches (the rows that sort their whole rows), whose programs the engine queues from a
    worker thread."""
    arrays = jax.tree.map(jnp.asarray, sampling_arrays([SamplingParams()], [0], [0], pad_to=1))
    logits = jnp.zeros((1, 1000))
    history = jnp.zeros((1, 4), jnp.int32)
    samplers = {**SAMPLERS, TOP_K_ONLY: jax.jit(functools.partial(sample_rows, mode=TOP_K_ONLY))}
    for mode, sampler in samplers.items():
        text = sampler.lower(logits, arrays, history).as_text()
        assert ("stablehlo.case" in text) == (mode == "filter"), mode


def test_large_seeds_fold_apart():
    """Folded to 32 bits, seeds past 2**32 do not fall on the small ones (a plain XOR of the
    32-bit words made 2**32 draw as 1, 2**32 + 1 as 0)."""
    small = {_fold_seed(s) for s in range(1000)}
    assert small == set(range(1000))
    large = [_fold_seed(2**32 * h + s) for h in (1, 2, 3, 2**32 + 1) for s in range(1000)]
    assert len(set(large)) == len(large) and not small & set(large)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        _fold_seed(-1)


# ---------------------------------------------------------------------------------------------
# logit_bias and min_tokens: LogitBias entries


def entries(*triples) -> tuple:
    """One row's (ids, values, until) from (id, value, until) triples."""
    ids, values, until = zip(*triples) if triples else ((), (), ())
    return (
        np.asarray(ids, np.int32),
        np.asarray(values, np.float32),
        np.asarray(until, np.int32),
    )


def test_logit_bias_entries_add_to_the_logits_while_live():
    """Each entry adds its value to its row's logit while the row's step is below its `until`;
    -1 ids and ids outside the vocabulary add nothing; logprobs stay the raw model's."""
    logits = np.asarray([[0.0, 1.0, 2.0, 3.0]] * 3, np.float32)
    per_row = [
        entries((0, 10.0, 2**31 - 1)),  # always: 0 wins
        entries((3, -np.inf, 5), (2, -np.inf, 5)),  # min_tokens 5 at step 4: 3 and 2 banned → 1
        entries((3, -np.inf, 4), (9, 50.0, 2**31 - 1)),  # ban ended at step 4; id 9 > V: nothing
    ]
    bias = logit_bias_arrays(per_row, pad_to=3)
    assert bias.ids.shape == (3, 16) and (bias.ids[:, 2:] == -1).all()
    assert (bias.ids[0, 1:] == -1).all()
    arrays = rows(3, temperature=0.0, step=4, num_logprobs=2)
    for mode in SAMPLE_MODES:
        out = jax.jit(functools.partial(sample_rows, mode=mode))(logits, arrays, bias=bias)
        np.testing.assert_array_equal(out.tokens, [0, 1, 3])
        np.testing.assert_allclose(out.logprob, jax.nn.log_softmax(logits)[[0, 1, 2], [0, 1, 3]])
    biased = apply_logit_bias(jnp.asarray(logits), bias, jnp.asarray([4, 4, 4]))
    np.testing.assert_array_equal(
        np.asarray(biased), [[10, 1, 2, 3], [0, 1, -np.inf, -np.inf], [0, 1, 2, 3]]
    )


def bias_entries_case():
    """Logits [6, 64] with -0.0 columns, bias entries of many kinds for them, and the step."""
    rng = np.random.default_rng(0)
    b, v = 6, 64
    logits = rng.normal(size=(b, v)).astype(np.float32)
    logits[:, ::7] = -0.0
    per_row = [
        entries((3, 1.5, 9), (3, -np.inf, 5), (60, -2.0, 9)),  # a bias and a ban on one id
        entries((0, 0.25, 2), (63, 100.0, 9)),  # the first dead at step 4
        None,
        entries(
            *[(int(t), float(x), 9) for t, x in zip(rng.permutation(v)[:16], rng.normal(size=16))]
        ),
        entries((7, -np.inf, 5)),  # a ban on a -0.0 logit
        entries((70, 5.0, 9)),  # outside the vocabulary
    ]
    return logits, logit_bias_arrays(per_row, b), jnp.asarray([4, 4, 4, 4, 4, 4])


def test_bias_entries_as_elementwise_ops_equal_the_scatter_bit_for_bit():
    """`add_bias_entries` (a multi-step decode's) against `apply_logit_bias` (a single step's):
    the same bits, -0.0 logits without an entry and a bias on a banned id included."""
    logits, bias, step = bias_entries_case()
    want = np.asarray(apply_logit_bias(jnp.asarray(logits), bias, step))
    got = np.asarray(jax.jit(add_bias_entries)(jnp.asarray(logits), bias, step))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got[0, 3] == -np.inf and got[1, 0] == logits[1, 0] and got[1, 63] == logits[1, 63] + 100


@pytest.mark.devices(4)
def test_bias_entries_over_a_vocab_split_mesh_equal_the_scatter_bit_for_bit():
    """The same over a mesh that splits the vocabulary four ways."""
    from jaxinfer.sharding import make_mesh

    logits, bias, step = bias_entries_case()
    want = np.asarray(apply_logit_bias(jnp.asarray(logits), bias, step))
    split = jax.sharding.NamedSharding(make_mesh(4), jax.sharding.PartitionSpec(None, "model"))
    on_mesh = jax.jit(add_bias_entries, out_shardings=split)(
        jax.device_put(logits, split), bias, step
    )
    np.testing.assert_array_equal(np.asarray(on_mesh).view(np.uint32), want.view(np.uint32))


def test_logit_bias_applies_before_penalties_and_sampling():
    """A banned token is never drawn, whatever the temperature; a +100 bias always is."""
    logits = np.zeros((64, 5), np.float32)
    bias = logit_bias_arrays([entries((2, -np.inf, 9))] * 32 + [entries((4, 100.0, 9))] * 32, 64)
    arrays = rows(64, temperature=1.5, seed=np.arange(64), repetition_penalty=1.5)
    history = np.tile(np.arange(5, dtype=np.int32), (64, 1))
    out = SAMPLERS["sample"](logits, arrays, history, bias=bias)
    tokens = np.asarray(out.tokens)
    assert 2 not in tokens[:32] and len(set(tokens[:32])) > 1
    assert (tokens[32:] == 4).all()


def test_logit_bias_widths_are_few():
    """Three widths serve every batch: a few programs, whatever the clients send."""
    assert logit_bias_arrays([None, None], 2).ids.shape == (2, 16)
    assert logit_bias_arrays([entries(*[(1, 1.0, 9)] * 17)], 1).ids.shape == (1, 512)
    big = entries(*[(2, 1.0, 9)] * 1325)  # 300 logit_bias + 1,024 stop ids + EOS
    assert logit_bias_arrays([None, big], 2).ids.shape == (2, 2048)
    with pytest.raises(ValueError, match="2049 logit bias entries in a row, more than 2048"):
        logit_bias_arrays([entries(*[(2, 1.0, 9)] * 2049)], 1)


def test_bias_entries_of_a_request():
    params = SamplingParams(max_tokens=9, min_tokens=3, logit_bias={"7": -1.5, 2: 4, 8: 0})
    ids, values, until = bias_entries(params, {5, 1})
    assert ids.tolist() == [2, 7, 1, 5]  # the bias of 0 left out
    assert values.tolist() == [4.0, -1.5, -np.inf, -np.inf]
    assert until.tolist() == [2**31 - 1, 2**31 - 1, 3, 3]
    assert bias_entries(SamplingParams(logit_bias={3: 1}), {5})[0].tolist() == [3]  # no min
    assert bias_entries(SamplingParams(), {5}) is None


@pytest.mark.devices(4)
def test_logit_bias_over_a_vocab_split_mesh_equals_one_device():
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh(4)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 64)).astype(np.float32)
    per_row = [
        entries((0, 5.0, 9), (63, -3.0, 9)),
        entries((17, -np.inf, 1)),
        entries((33, 2.0, 0)),
        entries((16, 1.0, 9)),
    ]
    bias = logit_bias_arrays(per_row, 4)
    step = jnp.asarray([0, 0, 0, 8])
    want = apply_logit_bias(jnp.asarray(logits), bias, step)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    got = jax.jit(functools.partial(apply_logit_bias, mesh=mesh))(
        jax.device_put(logits, split), bias, step
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.isneginf(np.asarray(got)[1, 17]) and np.asarray(got)[2, 33] == logits[2, 33]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(min_tokens=-1), "^min_tokens must be an integer >= 0"),
        (dict(max_tokens=4, min_tokens=5), r"^min_tokens \(5\) must be at most max_tokens \(4\)"),
        (dict(logit_bias={"a": 1}), "^logit_bias token id must be an integer"),
        (dict(logit_bias={"٣": 1}), "^logit_bias token id must be an integer"),  # not ASCII
        (dict(logit_bias={5: 100.5}), r"^logit_bias\[5\] must be a finite float32 number"),
        (dict(logit_bias={5: True}), r"^logit_bias\[5\] must be a finite float32 number"),
        (dict(logit_bias={"1": 1, "01": 2}), "^logit_bias gives token id 1 twice"),
        (dict(logit_bias={i: 0 for i in range(301)}), "^logit_bias has 301 entries, more than 300"),
        (dict(logit_bias=[(1, 2, 3)]), r"^logit_bias entries must be \(token id, bias\) pairs"),
        (dict(logit_bias="5:1"), "^logit_bias must be a dict"),
        (dict(include_stop_str_in_output=1), "^include_stop_str_in_output must be True or False"),
        (dict(skip_special_tokens="no"), "^skip_special_tokens must be True or False"),
    ],
)
def test_new_fields_refuse_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_logit_bias_is_stored_as_sorted_pairs():
    p = SamplingParams(logit_bias={"50256": -100, 3: 2.5})
    assert p.logit_bias == ((3, 2.5), (50256, -100.0)) and hash(p) == hash(
        SamplingParams(logit_bias=[(50256, -100.0), (3, 2.5)])
    )
    assert SamplingParams(logit_bias=None).logit_bias == ()


def whole_row_tokens(logits, arrays: SamplingArrays) -> np.ndarray:
    """The filtered draw from every row's whole sorted row (`_filter_mask`, then `categorical`),
    greedy where temperature is 0: what the candidates must reproduce."""
    from jaxinfer.sampling import _filter_mask

    t = np.asarray(arrays.temperature)
    scaled = jnp.asarray(logits) / jnp.where(t > 0, t, 1.0)[:, None]
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(arrays.seed, arrays.step)
    masked = jnp.where(_filter_mask(scaled, arrays), scaled, -jnp.inf)
    drawn = np.asarray(jax.vmap(jax.random.categorical)(keys, masked))
    return np.where(t > 0, drawn, np.asarray(logits).argmax(-1))


# (row kind, SamplingParams fields, whether its draw among the top 256 is its whole row's)
FILTER_ROWS = [
    ("peaked", dict(top_p=0.9), True),
    ("peaked", dict(top_p=0.95, top_k=40), True),
    ("peaked", dict(min_p=0.05), True),
    ("peaked", dict(top_k=300), False),  # the 300th logit lies past the candidates
    ("peaked", dict(top_k=300, min_p=0.2), True),  # min-p cuts inside them first
    ("flat", dict(top_p=0.9), False),  # ~2,000 tokens in its nucleus
    ("flat", dict(top_p=0.002), True),
    ("ties", dict(top_k=20), False),  # a fifth of the tokens tie at the 20th: top-k keeps all
    ("ties", dict(top_k=5), True),  # 10 tie at the top
    ("peaked", dict(), True),  # no filter: drawn from its whole row, unsorted
    ("peaked", dict(temperature=0.0), True),
]


def filter_batch(v: int, flat_rows: int, seed: int):
    """Logits and SamplingParams of FILTER_ROWS, then `flat_rows` more flat top-p rows."""
    rng = np.random.default_rng(seed)
    kinds = [kind for kind, _, _ in FILTER_ROWS] + ["flat"] * flat_rows
    scale = {"peaked": 6.0, "flat": 0.3}
    ties = np.zeros(v)
    ties[: v // 5], ties[:10] = 1.0, 3.0
    logits = np.stack(
        [
            rng.permutation(ties) if kind == "ties" else rng.normal(size=v) * scale[kind]
            for kind in kinds
        ]
    ).astype(np.float32)
    params = [SamplingParams(**{"temperature": 0.9, **f}) for _, f, _ in FILTER_ROWS]
    params += [SamplingParams(temperature=1.1, top_p=0.8)] * flat_rows
    return logits, params


@pytest.mark.parametrize("v, flat_rows", [(3000, 5), (3000, 20), (3000, 70), (50_000, 20)], ids=str)
def test_filtered_rows_draw_among_candidates_or_sort_their_whole_rows(v, flat_rows):
    """Mode "filter" draws each row among its top 256 tokens where its filters cut inside them
    (top-p of a peaked row, min-p, top-k within them) and sorts the whole rows of the others
    (gathered into 16 rows, or the batch; with more than 64 flat rows every row sorts its whole
    row): the tokens of every row are those of the whole-row filter, and the rows that need
    their whole row are the expected ones. At 50,000 the candidates come from the blockwise
    top-k."""
    from jaxinfer.sampling import _draw_among_candidates

    logits, params = filter_batch(v, flat_rows, seed=v)
    b = len(params)
    assert sampler_mode(params) == "filter"
    sampler = jax.jit(functools.partial(sample_rows, mode="filter"))
    drawn = set()
    for step in range(6):
        arrays = jax.tree.map(
            jnp.asarray, sampling_arrays(params, list(range(b)), [step] * b, pad_to=b)
        )
        got = np.asarray(sampler(logits, arrays).tokens)
        np.testing.assert_array_equal(got, whole_row_tokens(logits, arrays), err_msg=f"step {step}")
        drawn.update((i, t) for i, t in enumerate(got))
    assert len({t for i, t in drawn if i == 5}) > 3  # a flat row did sample widely
    t = np.asarray(arrays.temperature)
    scaled = jnp.asarray(logits) / jnp.where(t > 0, t, 1.0)[:, None]
    _, fits = _draw_among_candidates(scaled, arrays, jnp.zeros_like(scaled), None)
    want = [f for _, _, f in FILTER_ROWS] + [False] * flat_rows
    np.testing.assert_array_equal(np.asarray(fits)[:9], want[:9])  # rows with a filter
    np.testing.assert_array_equal(np.asarray(fits)[11:], want[11:])


@pytest.mark.parametrize("b", [4, 16, 40])
def test_whole_rows_sort_only_inside_branches(b):
    """The whole-row sorts run in the branches taken only where rows need them: XLA must not
    hoist them (it hoisted a loop's sort where one slice covered all rows)."""
    import re

    v = 1000
    params = [SamplingParams(temperature=0.9, top_p=0.9)] * b
    arrays = jax.tree.map(jnp.asarray, sampling_arrays(params, list(range(b)), [0] * b, pad_to=b))
    sampler = jax.jit(functools.partial(sample_rows, mode="filter"))
    text = sampler.lower(jnp.zeros((b, v)), arrays).compile().as_text()
    computations = re.split(r"\n(?=\S)", text)
    entry = next(c for c in computations if c.startswith("ENTRY"))
    whole = [
        line
        for c in computations
        for line in c.splitlines()
        if " sort(" in line and f",{v}]" in line
    ]
    assert whole  # the branches' sorts are compiled
    assert not [line for line in entry.splitlines() if line in whole]
