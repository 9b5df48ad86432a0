"""Sampling: `SamplingParams` and the jitted per-row sampler that `generate` and the engine share
(penalties, temperature, top-k, top-p, min-p; greedy where temperature is 0).

Every setting is an array with one value per row, so a new value never recompiles.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, UInt32

from jaxinfer.validate import (
    INT32_MAX,
    as_bias_pairs,
    as_bool,
    as_float,
    as_int,
    as_strings,
    as_token_ids,
)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. Invalid values raise ValueError naming the
    field, the value and the allowed range; numpy scalars are taken as Python numbers, `bool` is
    refused for numbers, and `stop` / `stop_token_ids` take None for none.

    temperature 0 (or below GREEDY_BELOW, as in vLLM) is greedy; top_k 0 (or -1, vLLM's "off")
    and top_p 1 and min_p 0 are off; penalties follow vLLM:
    repetition_penalty (> 0, 1 = off) over prompt and output tokens, presence/frequency penalties
    (in [-2, 2]) over output tokens. `seed` makes the request's samples independent of its batch.
    `logprobs` = n returns the top-n log-probabilities (raw model distribution) of every new token.
    top_k is at most 2**31 - 1; at or above the vocabulary size it keeps every token.

    As in vLLM: `min_tokens`: EOS (even with ignore_eos) and `stop_token_ids` are not sampled
    as any of the first min_tokens tokens, and a stop string counts only where it ends after
    their text; `logit_bias` ({token id: bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries;
    stored as sorted (id, bias) pairs, a bias of 0 left out; out of range is refused, where vLLM
    clamps) is added to the logits before penalties and sampling (logprobs stay the raw
    model's); `include_stop_str_in_output` keeps the stop string (or the text of the stop
    token id) that ended a request in its text;
    `skip_special_tokens` False writes special tokens into the text; `prompt_logprobs` = n
    returns, for every prompt token after the first, its log-probability given the tokens
    before it and the top-n (n = 0: its own only; such a request skips the prefix cache).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.top_k, (int, np.integer)) and self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for name, check in _FIELD_CHECKS.items():
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL:
                object.__setattr__(self, name, check(name, value))
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})"
            )

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or so small that dividing by it would overflow float32."""
        return self.temperature < GREEDY_BELOW


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-38 overflow to inf.
GREEDY_BELOW = 1e-5


MAX_LOGPROBS = 20  # top-n logprobs computed on device for every row; a request takes its n

# Every new token is checked against every stop string (on the engine's thread, which all
# requests share): their number and length are bounded.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16384  # all of a request's stop strings together
MAX_STOP_TOKEN_IDS = 1024  # counted before they are checked: a front's thread checks them
MAX_LOGIT_BIAS = 300  # entries of a request's logit_bias, as OpenAI's API allows
MAX_BIAS = 100.0  # |bias| of a logit_bias entry, as OpenAI's API allows


def _stop_strings(name: str, value) -> tuple[str, ...]:
    stops = as_strings(name, value)
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"{name} has {len(stops)} strings, more than {MAX_STOP_STRINGS}")
    chars = sum(map(len, stops))
    if chars > MAX_STOP_CHARS:
        raise ValueError(
            f"{name}'s strings hold {chars} characters together, more than {MAX_STOP_CHARS}"
        )
    return stops


def _logit_bias(name: str, value) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (ids as ints or as decimal strings, a JSON object's keys) or (id, bias)
    pairs; None is none. Sorted by id; an id given twice ("1" and "01") is refused."""
    pairs = as_bias_pairs(name, value, low=0, high=INT32_MAX, max_len=MAX_LOGIT_BIAS)
    checked = [(t, as_float(f"{name}[{t}]", b, -MAX_BIAS, MAX_BIAS)) for t, b in pairs]
    return tuple(sorted((t, b) for t, b in checked if b != 0))  # a 0 changes nothing


# Every field's check (jaxinfer/validate.py): each returns the value as a plain Python type.
# top_k is bounded by int32, the device array it goes into; a top_k at or above the vocabulary
# size keeps every token (as 0 does).
_FIELD_CHECKS = {
    "max_tokens": lambda n, v: as_int(n, v, 1),
    "temperature": lambda n, v: as_float(n, v, 0.0),
    "top_k": lambda n, v: as_int(n, v, 0, INT32_MAX),
    "top_p": lambda n, v: as_float(n, v, 0.0, 1.0, low_open=True),
    "min_p": lambda n, v: as_float(n, v, 0.0, 1.0),
    "repetition_penalty": lambda n, v: as_float(n, v, 0.0, low_open=True),
    "presence_penalty": lambda n, v: as_float(n, v, -2.0, 2.0),
    "frequency_penalty": lambda n, v: as_float(n, v, -2.0, 2.0),
    "seed": lambda n, v: as_int(n, v, 0),
    "stop": _stop_strings,
    "stop_token_ids": lambda n, v: tuple(
        as_token_ids(n, v, allow_empty=True, max_len=MAX_STOP_TOKEN_IDS)
    ),
    "ignore_eos": as_bool,
    "logprobs": lambda n, v: as_int(n, v, 0, MAX_LOGPROBS),
    "min_tokens": lambda n, v: as_int(n, v, 0),
    "logit_bias": _logit_bias,
    "include_stop_str_in_output": as_bool,
    "skip_special_tokens": as_bool,
    "prompt_logprobs": lambda n, v: as_int(n, v, 0, MAX_LOGPROBS),
}
_OPTIONAL = ("seed", "logprobs", "prompt_logprobs")  # None means "none"


# ---------------------------------------------------------------------------------------------
# The engine's per-row sampler: every setting is a [B] array in the batch pytree.
#
#   raw logits → penalties (history) → temperature → min-p → top-k → top-p → Gumbel draw per row
#
# (vLLM's order: min-p on the whole distribution, top-k keeping ties with the k-th logit, top-p
# over the renormalised survivors.)
#
# A row's token depends only on its own logits, settings, seed and step: filters become masks in
# vocabulary order and each row draws from its own key, so neither the other rows nor which
# static mode (`sample_mode`) serves the batch can change it.


class SamplingArrays(NamedTuple):
    """Per-row sampling settings (a pytree; every field [B])."""

    temperature: Float[Array, "B"]  # 0 = greedy
    top_k: Int[Array, "B"]  # 0 = off
    top_p: Float[Array, "B"]  # 1 = off
    min_p: Float[Array, "B"]  # 0 = off
    repetition_penalty: Float[Array, "B"]  # 1 = off
    presence_penalty: Float[Array, "B"]  # 0 = off
    frequency_penalty: Float[Array, "B"]  # 0 = off
    seed: UInt32[Array, "B"]  # per-request seed
    step: Int[Array, "B"]  # tokens this request generated before this one
    num_logprobs: Int[Array, "B"]  # top-n logprobs wanted; 0 = none


class LogitBias(NamedTuple):
    """Entries added to rows' logits before penalties and sampling (a pytree; every field
    [B, N], N a bucket): logit_bias, and while a request is short of min_tokens, -inf on its
    stop ids. An entry applies while the row's step is below its `until`."""

    ids: Int[Array, "B N"]  # -1 = no entry
    values: Float[Array, "B N"]
    until: Int[Array, "B N"]  # INT32_MAX: always


# Entries a row of LogitBias holds: the width is the first that fits the batch's longest row
# (300 logit_bias entries + 1,024 stop ids + EOS fit the last), so three programs serve them all.
BIAS_WIDTHS = (16, 512, 2048)

Entries = tuple[np.ndarray, np.ndarray, np.ndarray]  # one request's (ids, values, until)


def bias_entries(params: SamplingParams, ban_ids) -> Entries | None:
    """One request's LogitBias entries, built once: its logit_bias (always live) and, with
    min_tokens, -inf on `ban_ids` (its stop ids and EOS) until that many tokens are out. None
    where it has neither."""
    bans = sorted(ban_ids) if params.min_tokens else []
    if not params.logit_bias and not bans:
        return None
    bias = params.logit_bias
    ids = np.asarray([t for t, _ in bias] + bans, np.int32)
    values = np.asarray([b for _, b in bias] + [-np.inf] * len(bans), np.float32)
    until = np.asarray([INT32_MAX] * len(bias) + [params.min_tokens] * len(bans), np.int32)
    return ids, values, until


def logit_bias_arrays(rows: Sequence[Entries | None], pad_to: int) -> LogitBias:
    """Host arrays [pad_to, N] of each row's `bias_entries` (None: none), N from BIAS_WIDTHS."""
    longest = max((len(r[0]) for r in rows if r is not None), default=0)
    n = next((w for w in BIAS_WIDTHS if w >= longest), None)
    if n is None:
        raise ValueError(f"{longest} logit bias entries in a row, more than {BIAS_WIDTHS[-1]}")
    ids = np.full((pad_to, n), -1, np.int32)
    values, until = np.zeros((pad_to, n), np.float32), np.zeros((pad_to, n), np.int32)
    for i, r in enumerate(rows):
        if r is not None:
            k = len(r[0])
            ids[i, :k], values[i, :k], until[i, :k] = r
    return LogitBias(ids, values, until)


def apply_logit_bias(
    logits: Float[Array, "B V"], bias: LogitBias, step: Int[Array, "B"], mesh=None
) -> Float[Array, "B V"]:
    """logits with each row's live entries added (an id outside the vocabulary adds nothing).
    Over `mesh`, where the logits are split by vocab, each device adds the entries in its part."""
    from jax.sharding import PartitionSpec

    from jaxinfer.sharding import MODEL

    if mesh is None or logits.shape[1] % mesh.shape[MODEL]:
        return _add_entries(logits, *bias, step, offset=0)

    def local(x, *rest):  # x [B, V / M]: this device's part of the vocabulary
        return _add_entries(x, *rest, offset=jax.lax.axis_index(MODEL) * x.shape[1])

    whole, split = PartitionSpec(), PartitionSpec(None, MODEL)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(split, *[whole] * 4), out_specs=split, check_vma=False
    )(logits, *bias, step)


def _add_entries(x, ids, values, until, step, *, offset) -> Float[Array, "B V"]:
    """x [B, V'] (vocabulary ids offset ... offset + V') plus the entries live at `step`."""
    local = ids - offset
    live = (ids >= 0) & (local >= 0) & (local < x.shape[1]) & (step[:, None] < until)
    local = jnp.where(live, local, x.shape[1])  # out of range: dropped by the scatter
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, local].add(jnp.where(live, values, 0.0), mode="drop")


def add_bias_entries(
    logits: Float[Array, "B V"], bias: LogitBias, step: Int[Array, "B"]
) -> Float[Array, "B V"]:
    """`apply_logit_bias` as elementwise ops, bit for bit (a token without a live entry keeps
    its logit; one with two gets both added): each of the N entries compared with every vocab
    id, N selects of [B, V]. For the narrowest width, inside a multi-step decode: XLA fuses them
    into the penalties and the sampler, where the scatter would copy the float32 logits each
    step. Over a mesh the vocab ids follow the logits' split (no per-device offset to apply)."""
    vocab = jnp.arange(logits.shape[1], dtype=jnp.int32)[None, :]  # [1, V]
    live = (bias.ids >= 0) & (step[:, None] < bias.until)  # [B, N]
    x = logits
    for j in range(bias.ids.shape[1]):
        hit = live[:, j : j + 1] & (bias.ids[:, j : j + 1] == vocab)  # [B, V]
        x = jnp.where(hit, x + bias.values[:, j : j + 1], x)
    return x


class SampleOutput(NamedTuple):
    """What the sampler returns for each row."""

    tokens: Int[Array, "B"]
    logprob: Float[Array, "B"]  # log_softmax(raw logits)[token]
    top_ids: Int[Array, "B MAX_LOGPROBS"]  # zeros when no row asked for logprobs
    top_logprobs: Float[Array, "B MAX_LOGPROBS"]  # descending; zeros when no row asked


def sampling_arrays(
    params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int], pad_to: int
) -> SamplingArrays:
    """Builds the [pad_to] host arrays for a batch; rows past len(params) are greedy padding.

    Args:
      params: one SamplingParams per live row.
      seeds: one int >= 0 per live row (the engine picks one where params.seed is None); seeds of
        any size are folded to 32 bits.
      steps: tokens each row's request has generated so far.
      pad_to: B, the batch bucket (>= len(params)).
    Returns:
      SamplingArrays of numpy arrays, every field [B].
    """
    n = len(params)
    if len(seeds) != n or len(steps) != n:
        raise ValueError(
            f"need one seed and one step per row: {n} params, "
            f"{len(seeds)} seeds, {len(steps)} steps"
        )
    if pad_to < n:
        raise ValueError(f"pad_to ({pad_to}) is smaller than the batch ({n})")
    pad = SamplingParams(temperature=0.0)  # greedy, no penalties, no filters, no logprobs
    rows = list(params) + [pad] * (pad_to - n)

    def column(get, dtype):
        return np.asarray([get(p) for p in rows], dtype)

    return SamplingArrays(
        temperature=column(lambda p: 0.0 if p.greedy else p.temperature, np.float32),
        top_k=column(lambda p: p.top_k, np.int32),
        top_p=column(lambda p: p.top_p, np.float32),
        min_p=column(lambda p: p.min_p, np.float32),
        repetition_penalty=column(lambda p: p.repetition_penalty, np.float32),
        presence_penalty=column(lambda p: p.presence_penalty, np.float32),
        frequency_penalty=column(lambda p: p.frequency_penalty, np.float32),
        seed=np.asarray([_fold_seed(s) for s in seeds] + [0] * (pad_to - n), np.uint32),
        step=np.asarray(list(steps) + [0] * (pad_to - n), np.int32),
        num_logprobs=column(lambda p: p.logprobs or 0, np.int32),
    )


def _fold_seed(seed: int) -> int:
    """Any int >= 0 → 32 bits: its low word, XOR a mix of the words above it (seeds < 2**32
    are unchanged; a plain XOR of the words made 2**32 and 1 draw alike)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    low, high, mixed = int(seed) & 0xFFFFFFFF, int(seed) >> 32, 0
    while high:
        mixed = _mix32(mixed ^ (high & 0xFFFFFFFF) ^ 0x9E3779B9)
        high >>= 32
    return low ^ mixed


def _mix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit ints whose every output bit
    depends on every input bit."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


SAMPLE_MODES = ("greedy", "sample", "filter")
# A filtered row draws among its top this many tokens (each device's, over a mesh: no row of
# logits is gathered) where its filters cut inside them; the others sort their whole rows
# (`_draw_filtered`), unless every row's top-k is within them (mode TOP_K_ONLY: no sort at all).
FILTER_CANDIDATES = 256
TOP_K_ONLY = "filter_top_k"  # "filter" where every sampling row fits the candidates


def fits_candidates(params: Sequence[SamplingParams]) -> bool:
    """Every sampling row (temperature > 0) keeps at most FILTER_CANDIDATES tokens by top-k."""
    return all(0 < p.top_k <= FILTER_CANDIDATES for p in params if not p.greedy)


def sample_mode(params: Sequence[SamplingParams]) -> str:
    """The cheapest static sampler mode that serves every row of a batch.

    "greedy": no row samples or wants top logprobs (argmax only); "sample": Gumbel draws and top
    logprobs, no filter; "filter": also top-k / top-p / min-p. With a static mode the sampler
    needs no `lax.cond`, whose predicate XLA copies to the host and waits for; the one dynamic
    part is mode "filter"'s branches for the rows that sort their whole rows (`_draw_filtered`).
    """
    if any(not p.greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params):
        return "filter"
    if any(not p.greedy or p.logprobs for p in params):
        return "sample"
    return "greedy"


def sampler_mode(params: Sequence[SamplingParams]) -> str:
    """`sample_mode`, or TOP_K_ONLY for a filtered batch that `fits_candidates`."""
    mode = sample_mode(params)
    if mode == "filter" and fits_candidates(params):
        return TOP_K_ONLY
    return mode


def sample_rows(
    logits: Float[Array, "B V"],
    arrays: SamplingArrays,
    history: Int[Array, "B S"] | None = None,
    history_is_output: Bool[Array, "B S"] | None = None,
    *,
    mode: str,
    mesh=None,
    bias: LogitBias | None = None,
) -> SampleOutput:
    """Samples one token per row, each row with its own settings, seed and step. Jittable.

    Args:
      logits: [B, V] raw model logits (any float dtype; computed in float32).
      arrays: SamplingArrays, every field [B].
      history: [B, S] prompt + output token ids so far, -1 = padding; None = no penalties (the
        caller passes a history only when some row uses penalties).
      history_is_output: [B, S] True where history holds a generated token (presence and
        frequency penalties count only those); None = every history token counts as output.
      mode: a static SAMPLE_MODES entry at least as general as every row needs (see
        `sample_mode`). Mode "filter" draws each row among its top FILTER_CANDIDATES tokens
        where its filters cut inside them and sorts the whole rows of the others (a flat
        distribution's top-p), with the whole-row filter's tokens either way
        (`_draw_filtered`).
      mesh: the mesh whose "model" axis splits the logits' vocab (tensor parallelism), or None.
        The top logprobs are then taken on each device's shard and merged, greedy and plain
        sampling reduce in place, and the filter gathers each device's top candidates: no
        device gathers whole rows, except the filter's rows that sort them.
      mode TOP_K_ONLY: every sampling row has 0 < top_k <= FILTER_CANDIDATES
        (`fits_candidates`); each is drawn among its top candidates, with no branch for rows
        that would sort their whole rows: the same result except where more than
        FILTER_CANDIDATES tokens tie at the row's k-th logit (top-k keeps every tied token,
        the candidates only that many of them).
      bias: LogitBias entries added before the penalties (logit_bias, min_tokens); None: none.
    Returns:
      SampleOutput: tokens [B], logprob [B], top_ids / top_logprobs [B, MAX_LOGPROBS].
    """
    raw = logits.astype(jnp.float32)  # [B, V]
    adjusted = adjust_logits(raw, arrays, history, history_is_output, mesh=mesh, bias=bias)
    return sample_adjusted(raw, adjusted, arrays, mode=mode, mesh=mesh)


def adjust_logits(
    logits: Float[Array, "B V"],
    arrays: SamplingArrays,
    history: Int[Array, "B S"] | None = None,
    history_is_output: Bool[Array, "B S"] | None = None,
    *,
    mesh=None,
    bias: LogitBias | None = None,
) -> Float[Array, "B V"]:
    """The logits the rows draw from (float32): the LogitBias entries added, then the penalties
    (`sample_rows`'s arguments of the same names; None: none)."""
    x = logits.astype(jnp.float32)
    x = x if bias is None else apply_logit_bias(x, bias, arrays.step, mesh)
    return x if history is None else apply_penalties(x, arrays, history, history_is_output)


def sample_adjusted(
    raw: Float[Array, "B V"],
    adjusted: Float[Array, "B V"],
    arrays: SamplingArrays,
    *,
    mode: str,
    mesh=None,
) -> SampleOutput:
    """`sample_rows` in two parts: tokens drawn from `adjusted` (`adjust_logits`), logprobs
    those of `raw` (float32 both; the same array where no row has an adjustment)."""
    if mode not in (*SAMPLE_MODES, TOP_K_ONLY):
        raise ValueError(f"sampler mode {mode!r} is not one of {(*SAMPLE_MODES, TOP_K_ONLY)}")
    top_k_only = mode == TOP_K_ONLY
    mode = "filter" if top_k_only else mode
    greedy = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)  # [B]
    if mode == "greedy":
        tokens = greedy
    else:
        filters = mode == "filter"
        tokens = _sample_or_greedy(adjusted, arrays, greedy, filters, mesh, top_k_only)
    logprobs = jax.nn.log_softmax(raw, axis=-1)  # [B, V]
    logprob = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    if mode == "greedy":
        top_ids, top_logprobs = _no_top_logprobs(logprobs)
    else:
        top_ids, top_logprobs = _top_logprobs(logprobs, mesh)
    return SampleOutput(tokens, logprob, top_ids, top_logprobs)


class PromptLogprobs(NamedTuple):
    """Each packed token's next-token log-probabilities (`prompt_logprobs`); fields [T, ...]."""

    target: Float[Array, "T"]  # log_softmax(logits)[the next prompt token]; 0 where none
    top_ids: Int[Array, "T MAX_LOGPROBS"]
    top_logprobs: Float[Array, "T MAX_LOGPROBS"]


def prompt_logprobs(
    logits: Float[Array, "T V"], targets: Int[Array, "T"], mesh=None
) -> PromptLogprobs:
    """The raw model's log-probability of each token's target (-1: none) and its top
    MAX_LOGPROBS, as the sampled tokens' logprobs are taken."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [T, V]
    picked = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    top_ids, top_logprobs = _top_logprobs(logprobs, mesh)
    return PromptLogprobs(jnp.where(targets >= 0, picked, 0.0), top_ids, top_logprobs)


def apply_penalties(
    logits: Float[Array, "B V"],
    arrays: SamplingArrays,
    history: Int[Array, "B S"],
    history_is_output: Bool[Array, "B S"] | None = None,
) -> Float[Array, "B V"]:
    """vLLM penalties: repetition over all of history, then frequency and presence over outputs.

    Repetition p: a seen token's logit > 0 becomes logit / p, otherwise logit * p. Then
    logit -= frequency × (count in output) + presence × (1 if in output). -1 entries are ignored;
    None for history_is_output counts every history token as output.
    """
    state = penalty_state(history, history_is_output, logits.shape[-1], jnp.int32)
    return apply_penalty_state(logits, arrays, state)


def penalty_state(
    history: Int[Array, "B S"],
    history_is_output: Bool[Array, "B S"] | None,
    v: int,
    dtype=jnp.int32,
) -> Int[Array, "B V"]:
    """What the penalties need of a history, one integer a token: 2 x (its count in the output)
    + (1 if it is in the prompt part). > 0: seen (repetition); >> 1: the output count
    (frequency, presence). A sampled token adds 2 (`count_sample`), so a multi-step decode keeps
    it up to date without the history. -1 entries are ignored; None for history_is_output counts
    every history token as output. `dtype` must hold 2 x S + 1."""
    if history_is_output is None:
        history_is_output = jnp.ones(history.shape, bool)
    b, _ = history.shape
    rows = jnp.arange(b)[:, None]
    valid = history >= 0
    out_ids = jnp.where(valid & history_is_output, history, v)  # out of range: dropped
    prompt_ids = jnp.where(valid & ~history_is_output, history, v)
    outputs = jnp.zeros((b, v), dtype).at[rows, out_ids].add(2, mode="drop")
    in_prompt = jnp.zeros((b, v), dtype).at[rows, prompt_ids].set(1, mode="drop")
    return outputs | in_prompt


def count_sample(
    state: Int[Array, "B V"], tokens: Int[Array, "B"], live: Bool[Array, "B"]
) -> Int[Array, "B V"]:
    """`penalty_state` with each live row's sampled token added to its output."""
    rows = jnp.arange(state.shape[0])
    return state.at[rows, tokens].add(jnp.where(live, 2, 0).astype(state.dtype))


def apply_penalty_state(
    logits: Float[Array, "B V"], arrays: SamplingArrays, state: Int[Array, "B V"]
) -> Float[Array, "B V"]:
    """`apply_penalties` from its `penalty_state`. A row whose penalties are neutral (1, 0, 0)
    keeps its logits bit for bit."""
    out_counts = (state >> 1).astype(jnp.float32)
    rep = arrays.repetition_penalty[:, None]
    logits = jnp.where(state > 0, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (
        logits
        - arrays.frequency_penalty[:, None] * out_counts
        - arrays.presence_penalty[:, None] * (out_counts > 0)
    )


def _sample_or_greedy(
    logits: Float[Array, "B V"],
    arrays: SamplingArrays,
    greedy: Int[Array, "B"],
    filters: bool,
    mesh=None,
    top_k_only: bool = False,
) -> Int[Array, "B"]:
    """Temperature, filters, one Gumbel draw per row from its own key; T = 0 rows stay greedy.

    filters: True applies top-k / top-p / min-p (`_draw_filtered`), False skips them (no row
    uses one). `top_k_only`: no row sorts its whole row (see `sample_rows`).
    """
    sampling = arrays.temperature > 0
    scaled = logits / jnp.where(sampling, arrays.temperature, 1.0)[:, None]  # [B, V]
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(arrays.seed, arrays.step)
    if filters:
        drawn = _draw_filtered(scaled, arrays, keys, mesh, whole_rows=not top_k_only)
    else:
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)  # [B]
    return jnp.where(sampling, drawn, greedy)


# Rows that sort their whole rows go in the smallest of these many rows (or the batch) that
# holds them: XLA sorts few rows slowly per row (an H100 sorted 16 rows of 128,256 logits in
# 0.47 ms, 256 in 2.3 ms). A batch with more rows that surely need it than the largest of these
# sorts every row, skipping the candidates.
SLOW_ROW_BUCKETS = (16, 64)


def _draw_filtered(
    scaled: Float[Array, "B V"], arrays: SamplingArrays, keys, mesh, *, whole_rows: bool = True
) -> Int[Array, "B"]:
    """`categorical(key, where(_filter_mask(scaled), scaled, -inf))` of each row, mostly without
    sorting whole rows: each row draws among its top candidates (`_draw_among_candidates`)
    where its filters keep no token past them, or from its whole row where they are all off.
    The other rows (a flat distribution's top-p, ties across the candidates' end, a top-k past
    them) sort their whole rows (`_draw_slow_rows`); where more than the largest
    SLOW_ROW_BUCKETS surely do, every row sorts its whole row (a check that a batch of no more
    rows skips). `whole_rows=False` (mode TOP_K_ONLY) draws every row among its candidates, as
    does a vocabulary of at most FILTER_CANDIDATES: no branch."""
    v = scaled.shape[1]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), scaled.dtype))(keys)  # [B, V]
    if mesh is not None and v % mesh.size == 0:
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxinfer.sharding import MODEL

        noise = jax.lax.with_sharding_constraint(
            noise, NamedSharding(mesh, PartitionSpec(None, MODEL))
        )
    if not whole_rows or v <= FILTER_CANDIDATES:  # top-k within the candidates, or whole rows
        return _draw_among_candidates(scaled, arrays, noise, mesh, whole_mass=whole_rows)[0]
    unfiltered = (
        ((arrays.top_k <= 0) | (arrays.top_k >= v)) & (arrays.top_p >= 1) & (arrays.min_p <= 0)
    )
    plain = jnp.argmax(noise + scaled, axis=-1).astype(jnp.int32)  # categorical's draw

    def among_candidates():
        drawn, fits = _draw_among_candidates(scaled, arrays, noise, mesh)
        drawn = jnp.where(unfiltered, plain, drawn)
        slow = (arrays.temperature > 0) & ~unfiltered & ~fits
        return _draw_slow_rows(scaled, arrays, noise, slow, drawn, mesh)

    def whole():
        return jnp.where(unfiltered, plain, _draw_whole_rows(scaled, arrays, noise, mesh))

    most = max(SLOW_ROW_BUCKETS)
    if scaled.shape[0] <= most:  # a bucket holds every row
        return among_candidates()
    flat = (arrays.temperature > 0) & _past_candidates(scaled, arrays)
    return jax.lax.cond(flat.sum() > most, whole, among_candidates)


def _past_candidates(scaled: Float[Array, "B V"], arrays: SamplingArrays) -> Bool[Array, "B"]:
    """Rows whose filters surely keep tokens past their top FILTER_CANDIDATES, from one row
    reduction: no min-p (which might cut inside them), and a top-k past them, or top-p alone
    where even that many tokens at the top probability carry less than top_p."""
    n, v = FILTER_CANDIDATES, scaled.shape[1]
    z = jnp.sum(jnp.exp(scaled - scaled.max(axis=-1, keepdims=True)), axis=-1)  # 1 / top prob
    no_top_k = (arrays.top_k <= 0) | (arrays.top_k >= v)
    wide_top_p = no_top_k & (arrays.top_p < 1) & (n < arrays.top_p * z)
    return (arrays.min_p <= 0) & (((arrays.top_k > n) & ~no_top_k) | wide_top_p)


def _draw_whole_rows(scaled, arrays, noise, mesh) -> Int[Array, "B"]:
    """Each row's filtered draw from its whole sorted row (gathered whole over a mesh)."""
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        scaled, noise = jax.lax.with_sharding_constraint(
            (scaled, noise), NamedSharding(mesh, PartitionSpec())
        )
    masked = jnp.where(_filter_mask(scaled, arrays), scaled, -jnp.inf)
    return jnp.argmax(noise + masked, axis=-1).astype(jnp.int32)


def _draw_slow_rows(scaled, arrays, noise, slow: Bool[Array, "B"], drawn, mesh) -> Int[Array, "B"]:
    """`drawn` with each `slow` row drawn from its whole sorted row: the slow rows gathered into
    the smallest SLOW_ROW_BUCKETS size (or the batch) that holds them, one branch a size."""
    b = scaled.shape[0]
    sizes = sorted({min(r, b) for r in SLOW_ROW_BUCKETS} | {b})
    index = jnp.nonzero(slow, size=b, fill_value=b)[0]  # slow rows first, then b (none)

    def sort_first(r: int):
        def branch(drawn):
            rows = index[:r]
            at = jnp.minimum(rows, b - 1)
            sub = jax.tree.map(lambda a: a[at], arrays)
            got = _draw_whole_rows(scaled[at], sub, noise[at], mesh)
            return drawn.at[rows].set(got, mode="drop")

        return branch

    # 0: no slow row; compare_all: the default search is a loop, whose predicate the host reads
    which = jnp.searchsorted(jnp.array([0, *sizes]), slow.sum(), method="compare_all")
    return jax.lax.switch(which, [lambda d: d, *(sort_first(r) for r in sizes)], drawn)


def _draw_among_candidates(
    scaled: Float[Array, "B V"],
    arrays: SamplingArrays,
    noise: Float[Array, "B V"],
    mesh,
    *,
    whole_mass: bool = True,
) -> tuple[Int[Array, "B"], Bool[Array, "B"]]:
    """Each row's draw among its top FILTER_CANDIDATES tokens (with their Gumbel noise, drawn
    for the whole vocabulary), filtered as its whole sorted row, and whether that draw is the
    whole row's: [B] each.

    The candidates come in the stable sort's order (over a mesh whose "model" axis splits the
    vocabulary, each device offers its own top ones, gathered). The filters run on them as on
    the sorted row (`_keep_sorted`); where what they keep ends above the candidates' last
    logit, every token past the candidates is cut, and the draw is the whole row's.
    `whole_mass=False`: top-p's mass without the sum over the whole row (`_keep_sorted`)."""
    v = scaled.shape[1]
    n = min(FILTER_CANDIDATES, v)
    if mesh is not None and v % mesh.size == 0:
        values, ids, picked = _candidates_by_shard(
            scaled, min(FILTER_CANDIDATES, v // mesh.size), mesh, noise
        )
        values, at = jax.lax.top_k(values, n)
        ids, picked = (jnp.take_along_axis(a, at, axis=-1) for a in (ids, picked))
    else:
        values, ids = top_k(scaled, n)  # [B, n] each
        picked = jnp.take_along_axis(noise, ids, axis=-1)
    # The stable descending sort's order (the lower id first among equal logits, ±0 equal).
    _, ids, values, picked = jax.lax.sort(
        (_descending_keys(values), ids, values, picked), dimension=1, num_keys=2
    )
    keep, exact = _keep_sorted(values, scaled, arrays, whole_mass=whole_mass)  # [B, n], [B]
    scores = jnp.where(keep, picked + values, -jnp.inf)
    best = scores.max(axis=-1, keepdims=True)
    # argmax over the whole row takes the lowest id among equal maxima
    drawn = jnp.min(jnp.where(scores == best, ids, v), axis=-1).astype(jnp.int32)  # [B]
    if n == v:
        return drawn, jnp.ones(drawn.shape, bool)
    (cut,) = _at_last_kept(keep, values)
    return drawn, exact & keep[:, 0] & (cut[:, 0] > values[:, -1])


def _filter_mask(scaled: Float[Array, "B V"], arrays: SamplingArrays) -> Bool[Array, "B V"]:
    """Keep-mask in vocabulary order after min-p, then top-k, then top-p (on [B, V] scaled
    logits), as vLLM filters.

    The mask is all True for a row whose filters are all off, exactly as when the sort is skipped.
    """
    order = jnp.argsort(_descending_keys(scaled), axis=-1)  # [B, V], most likely first, stable
    return _mask_from_sorted(scaled, arrays, order, jnp.take_along_axis(scaled, order, axis=-1))


def _mask_from_sorted(
    scaled: Float[Array, "B V"],
    arrays: SamplingArrays,
    order: Int[Array, "B V"],
    sorted_logits: Float[Array, "B V"],
) -> Bool[Array, "B V"]:
    """`_filter_mask` from the row's stable descending sort: `order` and the logits in it."""
    v = scaled.shape[1]
    keep, _ = _keep_sorted(sorted_logits, scaled, arrays)
    # Each filter keeps a prefix of the sorted row, so the mask in vocabulary order is every token
    # ahead of the last one kept in (logit descending, id ascending) order, which is the stable
    # sort's: no scatter of the whole [B, V] mask back.
    cut_logit, cut_id = _at_last_kept(keep, sorted_logits, order)
    ids = jnp.arange(v)[None, :]
    # keep[:, 0] False: nothing kept (top-p's mass of an inf logit is NaN), as before
    return ((scaled > cut_logit) | ((scaled == cut_logit) & (ids <= cut_id))) & keep[:, :1]


def _at_last_kept(keep: Bool[Array, "B N"], *rows: Array) -> tuple[Array, ...]:
    """Each of `rows` [B, N] at the last kept entry of its row (a kept prefix; entry 0 where
    none is kept): [B, 1] each."""
    last = jnp.maximum(keep.sum(axis=-1, keepdims=True) - 1, 0)  # [B, 1]
    return tuple(jnp.take_along_axis(r, last, axis=-1) for r in rows)


def _keep_sorted(
    sorted_logits: Float[Array, "B N"],
    scaled: Float[Array, "B V"],
    arrays: SamplingArrays,
    *,
    whole_mass: bool = True,
) -> tuple[Bool[Array, "B N"], Bool[Array, "B"]]:
    """The filters' keep flags over a row's stable descending sort, whole (N = V) or its first N:
    min-p, then top-k, then top-p over what those keep, renormalised (vLLM's order). Each keeps
    a prefix. Also whether the flags of a prefix are the whole row's.

    Top-p's mass is over every token that min-p and top-k keep: summed over the first
    FILTER_CANDIDATES sorted tokens where top-k keeps none past them (its k-th among them, no
    tie with it past them), else over the whole row in vocabulary order; a prefix and the whole
    row sum alike. A top-k past the prefix leaves the mass unknown unless min-p cuts inside it.
    The running mass is summed over the first FILTER_CANDIDATES entries on their own, for the
    same reason. `whole_mass=False` skips the whole row's sum (a prefix's rows all have a top-k
    within it): a row with ties past the prefix then takes the prefix's."""
    n, v = sorted_logits.shape[1], scaled.shape[1]
    m = min(FILTER_CANDIDATES, n)
    top = sorted_logits[:, :1]  # [B, 1]
    # min_p: prob >= min_p × max prob  ⇔  logit >= max logit + log(min_p).
    floor = jnp.where(arrays.min_p[:, None] > 0, top + jnp.log(arrays.min_p)[:, None], -jnp.inf)
    by_min_p = sorted_logits >= floor
    # top_k: every token at least as likely as the k-th (tokens tied with it stay).
    k = jnp.where(arrays.top_k > 0, jnp.minimum(arrays.top_k, v), v)[:, None]  # [B, 1]
    kth = jnp.take_along_axis(sorted_logits, jnp.minimum(k, n) - 1, axis=-1)
    kth = jnp.where(k <= n, kth, -jnp.inf)  # past the prefix: no cut inside it
    keep = by_min_p & (sorted_logits >= kth)
    # top_p: the smallest prefix whose mass reaches top_p (the first token always stays; 1 =
    # exactly off).
    weights = jnp.where(keep, jnp.exp(sorted_logits - top), 0.0)  # [B, N]
    mass = jnp.sum(weights[:, :m], axis=-1, keepdims=True)  # [B, 1]
    if whole_mass:
        whole = jnp.sum(
            jnp.where((scaled >= floor) & (scaled >= kth), jnp.exp(scaled - top), 0.0),
            axis=-1,
            keepdims=True,
        )
        mass = jnp.where((k <= m) & (sorted_logits[:, m - 1 : m] < kth), mass, whole)
    probs = weights / mass
    mass_before = _cumsum_by_parts(probs) - probs
    keep &= (mass_before < arrays.top_p[:, None]) | (arrays.top_p[:, None] >= 1)
    exact = (k[:, 0] <= n) | (k[:, 0] >= v) | ~by_min_p[:, -1]
    return keep, exact


def _cumsum_by_parts(x: Float[Array, "B N"]) -> Float[Array, "B N"]:
    """cumsum along rows, the first FILTER_CANDIDATES entries summed on their own."""
    n = FILTER_CANDIDATES
    if x.shape[1] <= n:
        return jnp.cumsum(x, axis=-1)
    head = jnp.cumsum(x[:, :n], axis=-1)
    return jnp.concatenate([head, head[:, -1:] + jnp.cumsum(x[:, n:], axis=-1)], axis=-1)


def _descending_keys(x: Float[Array, "B V"]) -> UInt32[Array, "B V"]:
    """uint32 keys whose stable ascending sort is `jnp.argsort(-x)`'s, exactly: ±0 equal, NaNs
    equal and last, as `jnp.sort` orders floats.

    Why: XLA on a GPU sorts unsigned keys with an index through CUB's radix sort, and floats with
    an index (JAX's NaN-aware comparator) through its own bitonic sort, several times slower at
    [256, 128256]."""
    neg = -x.astype(jnp.float32)
    neg = jnp.where(neg == 0, 0.0, neg)  # -0 → +0
    neg = jnp.where(jnp.isnan(neg), jnp.nan, neg)  # one NaN, whose key is the greatest
    bits = jax.lax.bitcast_convert_type(neg, jnp.uint32)
    # Order-preserving: a negative float's bits all flipped, a positive one's sign bit set.
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))


def _top_logprobs(
    logprobs: Float[Array, "B V"], mesh=None
) -> tuple[Int[Array, "B MAX_LOGPROBS"], Float[Array, "B MAX_LOGPROBS"]]:
    """Top MAX_LOGPROBS per row, descending; a vocab smaller than that pads with id -1, -inf.

    Over `mesh` (logits split by vocab): the top n of each device's share, then the top n of
    the n x devices candidates: the same result, ties included (the lower id first), with only
    the candidates gathered."""
    b, v = logprobs.shape
    n = min(MAX_LOGPROBS, v)
    devices = 1 if mesh is None else mesh.size
    if devices > 1 and v % devices == 0 and v // devices >= n:
        values, ids = _top_k_by_shard(logprobs, n, mesh)
    else:
        values, ids = top_k(logprobs, n)
    pad = MAX_LOGPROBS - n
    ids = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    values = jnp.pad(values, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return ids, values


# `top_k`'s block: XLA's GPU top-k has a fast kernel only for k <= 16 and sorts whole rows
# otherwise. $JAXINFER_TOP_K_BLOCK overrides it when a program is traced (0: whole rows, as
# before the blockwise form; for measuring).
TOP_K_BLOCK = 64


def top_k(x: Float[Array, "B V"], k: int, block: int | None = None):
    """`jax.lax.top_k(x, k)` (values [B, k] descending, ids [B, k]; equal values: the lower id
    first), exactly, without sorting whole rows.

    The row is cut into blocks of `block`; the k blocks with the greatest maxima (the lower block
    first on ties) hold the top k: an element of a block left out has k block maxima ahead of it
    in (value, lower id) order. Those blocks, gathered in vocabulary order, are the candidates:
    k x block of them, whose top k is the row's.

    Exact for rows free of NaN and for rows of NaN only (a log_softmax row is one or the other).
    Where a row also holds NaNs, `lax.top_k` ranks a -NaN below everything and a block's max
    carries it through: that row's result may differ (ids stay below V)."""
    if block is None:
        block = int(os.environ.get("JAXINFER_TOP_K_BLOCK") or TOP_K_BLOCK)
    b, v = x.shape
    nblocks = -(-v // block) if block > 0 else 0
    if nblocks <= 2 * k:  # short rows (the candidates would be most of the row), or block 0
        return jax.lax.top_k(x, k)
    padded = jnp.pad(x, ((0, 0), (0, nblocks * block - v)), constant_values=-jnp.inf)
    blocks = padded.reshape(b, nblocks, block)
    _, chosen = jax.lax.top_k(blocks.max(axis=-1), k)  # [B, k]
    chosen = jnp.sort(chosen, axis=-1)  # vocabulary order: top_k's ties go to the lower id
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(b, k * block)
    values, at = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(chosen, at // block, axis=-1) * block + at % block
    return values, jnp.minimum(ids, v - 1)  # a padding id only ever where a row holds NaNs


def _top_k_by_shard(x: Float[Array, "B V"], n: int, mesh):
    """`lax.top_k(x, n)` of vocab-split x: per device, then over the gathered candidates."""
    values, ids = _candidates_by_shard(x, n, mesh)
    values, pick = jax.lax.top_k(values, n)
    return values, jnp.take_along_axis(ids, pick, axis=-1)


def _candidates_by_shard(x: Float[Array, "B V"], n: int, mesh, *alongside):
    """Each device's top n of vocab-split x (most likely first, the lower id first on ties),
    gathered: values [B, M * n], their vocabulary ids, and the entries of each `alongside`
    array (vocab-split like x) at those ids."""
    from jax.sharding import PartitionSpec

    from jaxinfer.sharding import MODEL

    def local(x, *others):  # [B, V / M] each
        values, ids = top_k(x, n)
        picked = [jnp.take_along_axis(o, ids, axis=-1) for o in others]
        ids = ids + jax.lax.axis_index(MODEL) * x.shape[1]
        gather = lambda a: jax.lax.all_gather(a, MODEL, axis=1, tiled=True)  # [B, M * n]
        return tuple(gather(a) for a in (values, ids, *picked))

    split = PartitionSpec(None, MODEL)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(split,) * (1 + len(alongside)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(x, *alongside)


def _no_top_logprobs(
    logprobs: Float[Array, "B V"],
) -> tuple[Int[Array, "B MAX_LOGPROBS"], Float[Array, "B MAX_LOGPROBS"]]:
    b = logprobs.shape[0]
    return (jnp.zeros((b, MAX_LOGPROBS), jnp.int32), jnp.zeros((b, MAX_LOGPROBS), jnp.float32))
