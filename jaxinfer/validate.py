"""One validation layer for the values that enter through the public API.

`SamplingParams`, `generate()` / `stream()`, `Engine.add_request` and `LLM.generate` all check
their inputs here, so a value means the same everywhere and every refusal reads the same: a
`ValueError` naming the field, the value and the allowed range. The rules:

- integers: Python `int` or a numpy integer scalar; `bool` is refused (True is not a count);
- numbers: the above or a float / numpy float scalar, finite and within float32 (the device
  arrays they end up in); `bool` is refused;
- lists of token ids or strings: any sequence, a numpy array, or None for "none" (as vLLM);
- text: a `str` without lone surrogates (they cannot be encoded, so no tokenizer takes them).

Each checker returns the value as a plain Python type, so what is stored is never a numpy scalar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # a device may flush anything smaller to 0
INT32_MAX = int(np.iinfo(np.int32).max)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def all_ints(items: list) -> bool:
    """Every item a plain int (bool, a subclass of int, is not)."""
    return set(map(type, items)) <= {int}


def _range(low, high, low_open: bool = False) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    return f"in {'(' if low_open else '['}{low}, {high}]"


def as_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (None = unbounded); ValueError otherwise."""
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bound = "" if low is None and high is None else " " + _range(low, high)
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def as_float(
    name: str, value, low: float, high: float | None = None, *, low_open: bool = False
) -> float:
    """`value` as a finite float in [low, high] ((low, high] with `low_open`); ValueError otherwise."""
    number = _is_int(value) or (isinstance(value, (float, np.floating)))
    f = _float32_range(value) if number else None
    ok = f is not None and (f > low if low_open else f >= low) and (high is None or f <= high)
    if ok and low_open and low == 0 and f < FLOAT32_TINY:  # 0 on the device: (0, x] broken
        raise ValueError(
            f"{name} must be a finite float32 number {_range(low, high, low_open)}, got {value!r} "
            f"(below float32's smallest normal number, {FLOAT32_TINY:.3g}, it becomes 0)"
        )
    if not ok:
        raise ValueError(
            f"{name} must be a finite float32 number {_range(low, high, low_open)}, got {value!r}"
        )
    return f


def _float32_range(value) -> float | None:
    """float(value) if finite and within float32's range, else None (NaN too; an int too large
    for a float, 10**400 say, too)."""
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if abs(f) <= FLOAT32_MAX else None


def as_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def as_text(name: str, value, *, allow_empty: bool = False) -> str:
    """A str that UTF-8 can encode (no lone surrogates); non-empty unless `allow_empty`."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"{name} must be a non-empty string, got {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} has a lone surrogate {value[e.start]!r} at character {e.start}: "
            "it is not valid Unicode text"
        ) from None
    return value


def as_sequence(name: str, value) -> list:
    """A list from a sequence or 1-D numpy array; None is empty. Strings, sets, scalars refused."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got an array of shape {value.shape}")
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list, got {type(value).__name__} {value!r:.80}")
    return list(value)


def as_token_ids(
    name: str,
    value,
    *,
    allow_empty: bool = False,
    vocab_size: int | None = None,
    max_len: int | None = None,
) -> list[int]:
    """A list of token ids (ints >= 0, below `vocab_size` when given; at most `max_len` of
    them, counted before any is checked); None is []."""
    if max_len is not None and (count := _length(value)) > max_len:
        raise ValueError(f"{name} has {count} ids, more than {max_len}")
    if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
        ids = value.tolist()  # checked below as Python ints
    elif isinstance(value, (list, tuple)) and all_ints(value):
        ids = list(value)  # the common case, 15x faster than a check per item (bounds below)
    else:
        ids = [as_int(f"{name}[{i}]", t, 0) for i, t in enumerate(as_sequence(name, value))]
    if not ids and not allow_empty:
        raise ValueError(f"{name} must be a non-empty list of token ids, got {value!r:.80}")
    if ids and (min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size)):
        i = next(i for i, t in enumerate(ids) if t < 0 or (vocab_size and t >= vocab_size))
        if vocab_size is None:
            raise ValueError(f"{name}[{i}] must be an integer >= 0, got {ids[i]}")
        raise ValueError(
            f"{name}[{i}]: token id {ids[i]} is outside the vocabulary [0, {vocab_size})"
        )
    return ids


def _length(value) -> int:
    """len() of a sequence or array; 0 for anything else (as_sequence then names the type)."""
    if isinstance(value, (str, bytes)):
        return 0
    try:
        return len(value)
    except TypeError:
        return 0


def as_strings(name: str, value) -> tuple[str, ...]:
    """Non-empty strings from one string, a list of them, or None (none)."""
    items = [value] if isinstance(value, str) else as_sequence(name, value)
    return tuple(as_text(f"{name}[{i}]", s) for i, s in enumerate(items))


def as_bias_pairs(
    name: str,
    value,
    *,
    low: int | None = None,
    high: int | None = None,
    max_len: int | None = None,
) -> list[tuple[int, object]]:
    """(token id, bias) pairs from {id: bias} (ids ints, or ASCII decimal strings: a JSON
    object's keys) or a list of (id, bias) pairs; None is none. Ids become ints in [low, high]
    (None: unbounded), none given twice ("1" and "01"); at most `max_len` pairs, counted first.
    The biases are the caller's to check."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"{name} must be a dict of token id -> bias, got {value!r:.80}")
    if max_len is not None and len(items) > max_len:
        raise ValueError(f"{name} has {len(items)} entries, more than {max_len}")
    pairs: dict[int, object] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{name} entries must be (token id, bias) pairs, got {item!r:.80}")
        key, bias = item
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 32:
            key = int(key)
        elif isinstance(key, str):  # its repr cut short: a key may be any length
            bound = "" if low is None and high is None else " " + _range(low, high)
            raise ValueError(f"{name} token id must be an integer{bound}, got {key!r:.40}")
        token = as_int(f"{name} token id", key, low, high)
        if token in pairs:
            raise ValueError(f"{name} gives token id {token} twice")
        pairs[token] = bias
    return list(pairs.items())
