"""The sampling filter's sort (top-k / top-p / min-p keep-mask): float keys against the uint32
keys of `sampling._descending_keys`, which XLA sorts with CUB's radix sort on a GPU.

Checks on this backend that both give the same order and the same keep-mask (rows of normal
logits and rows of tied integers with -0.0), then times per row count: each sort alone, the
mask with each, the mask with the sorted logits read back from the sorted keys instead of
gathered (`pairs`: not taken, its softmax fuses differently and one tied row's cut moved), the
plain and filtered sampler, the filtered sampler drawing among each row's top 256 (mode
`filter_top_k`, which batches whose rows all have 0 < top_k <= 256 take), and the filtered
sampler with the previous sort.

`--candidates` times mode "filter" as it draws (each row among its top 256 where its filters cut
inside them, the other rows sorting their whole rows) against every row sorting its whole row,
on logits of three shapes: "sharp" (every row's top-p nucleus inside its top 256), "mixed"
(about a quarter of the rows past it) and "flat" (every row past it), with other
SLOW_ROW_BUCKETS and without the slow rows' branch (its cost where no row needs it); and checks
that both draw the same tokens.

    python scripts/bench_filter_sort.py --rows 16,64,256,512 --out bench/results/sampler-filter-sort-<card>.json
    python scripts/bench_filter_sort.py --candidates --rows 64,256,512 --out bench/results/sampler-filter-candidates-<card>.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import benchmark as bm
from jaxinfer import sampling
from jaxinfer.sampling import SamplingParams, sample_rows, sampling_arrays

SETTINGS = (
    dict(top_p=0.9),
    dict(top_k=50, top_p=0.95),
    dict(min_p=0.05),
    dict(top_k=3000, top_p=0.5),
)


def sort_float(x):
    return jnp.argsort(-x, axis=-1)  # the form before: float keys with JAX's NaN-aware order


def sort_u32(x):
    return jnp.argsort(sampling._descending_keys(x), axis=-1)


def _sorted_pairs(x):
    b, v = x.shape
    iota = jax.lax.broadcasted_iota(jnp.int32, (b, v), 1)
    keys = sampling._descending_keys(x)
    return jax.lax.sort((keys, iota), dimension=1, num_keys=1, is_stable=True)


def sort_pairs(x):
    return _sorted_pairs(x)[1]


def _from_keys(keys):
    bits = jnp.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys)
    return -jax.lax.bitcast_convert_type(bits, jnp.float32)


def mask_with(order_fn, pairs: bool = False):
    """`sampling._filter_mask` with another sort (its own steps after it)."""

    def _filter_mask(scaled, arrays):
        if pairs:
            keys, order = _sorted_pairs(scaled)
            return sampling._mask_from_sorted(scaled, arrays, order, _from_keys(keys))
        order = order_fn(scaled)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        return sampling._mask_from_sorted(scaled, arrays, order, sorted_logits)

    return _filter_mask


def logits(b: int, v: int, kind: str) -> jax.Array:
    rng = np.random.default_rng(0)
    if kind == "normal":
        return jnp.asarray(rng.normal(size=(b, v)) * 3, jnp.float32)
    x = rng.integers(-4, 4, size=(b, v)).astype(np.float64)
    x[:, ::97] = -0.0
    return jnp.asarray(x, jnp.float32)


def arrays(b: int, **settings):
    params = SamplingParams(temperature=0.8, **settings)
    return jax.device_put(sampling_arrays([params] * b, range(b), [0] * b, b))


def checks(b: int, v: int) -> dict:
    """True where a variant's order or mask equals the float sort's, on this backend."""
    out = {}
    for kind in ("normal", "ties"):
        x = logits(b, v, kind)
        want = np.asarray(jax.jit(sort_float)(x))
        for name, fn in (("u32", sort_u32), ("pairs", sort_pairs)):
            out[f"order_{name}_{kind}"] = bool((np.asarray(jax.jit(fn)(x)) == want).all())
        for settings in SETTINGS:
            a = arrays(b, **settings)
            want = np.asarray(jax.jit(mask_with(sort_float))(x, a))
            for name, fn in (("u32", sampling._filter_mask), ("pairs", mask_with(None, True))):
                got = np.asarray(jax.jit(fn)(x, a))
                out[f"mask_{name}_{kind}_{settings}"] = bool((got == want).all())
            if 0 < settings.get("top_k", 0) <= sampling.FILTER_CANDIDATES:
                # Drawn among the top candidates: the same tokens, unless more tokens than the
                # candidates tie at the k-th logit (as the rows of ties here do at 128,256).
                whole, among = (
                    jax.jit(functools.partial(sample_rows, mode=mode))(x, a).tokens
                    for mode in ("filter", sampling.TOP_K_ONLY)
                )
                same = whole == among
                out[f"tokens_top_k_only_{kind}_{settings}"] = bool(np.asarray(same).all())
    return out


def times(b: int, v: int, repeats: int) -> dict:
    """Median us a call of each variant at b rows."""
    x, a = logits(b, v, "normal"), arrays(b, top_k=50, top_p=0.95)

    def us(fn, *args) -> float:
        f = jax.jit(fn)
        return round(bm.pipelined_time(lambda _: f(*args), repeats=repeats, min_time=0.2) * 1e6, 1)

    row = {"rows": b, "top_k_256": us(lambda x: sampling.top_k(x, 256), x)}
    for name, fn in (("float", sort_float), ("u32", sort_u32), ("pairs", sort_pairs)):
        row[f"sort_{name}"] = us(fn, x)
    masks = (
        ("float", mask_with(sort_float)),
        ("u32", sampling._filter_mask),
        ("pairs", mask_with(None, True)),
    )
    for name, fn in masks:
        row[f"mask_{name}"] = us(fn, x, a)
    for mode in ("sample", "filter", sampling.TOP_K_ONLY):  # the last: among the top 256
        row[f"sampler_{mode}"] = us(functools.partial(sample_rows, mode=mode), x, a)
    current = sampling._filter_mask
    sampling._filter_mask = mask_with(sort_float)  # traced anew: a new partial
    try:
        row["sampler_filter_previous"] = us(functools.partial(sample_rows, mode="filter"), x, a)
    finally:
        sampling._filter_mask = current
    return row


# Logits N(0, std) before the temperature (0.8): the widths of the three shapes' nuclei.
SHAPES = {"sharp": 5.0, "mixed": 4.1, "flat": 1.0}
CANDIDATE_SETTINGS = {"p0.95": dict(top_p=0.95), "k50-p0.95": dict(top_k=50, top_p=0.95)}


def whole_rows_draw(scaled, arrays, keys, mesh, *, whole_rows=True):
    """`sampling._draw_filtered` as every row sorting its whole row."""
    masked = jnp.where(sampling._filter_mask(scaled, arrays), scaled, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def traced_with(fn, **patches):
    """fn jitted with sampling's attributes patched while it traces (a new function each time,
    so no earlier trace is reused)."""

    def run(*args):
        saved = {name: getattr(sampling, name) for name in patches}
        for name, value in patches.items():
            setattr(sampling, name, value)
        try:
            return fn(*args)
        finally:
            for name, value in saved.items():
                setattr(sampling, name, value)

    return jax.jit(run)


def shaped_logits(b: int, v: int, shape: str) -> jax.Array:
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.normal(size=(b, v)) * SHAPES[shape], jnp.float32)


def slow_rows(x, a) -> int:
    """Rows of x that sort their whole rows under settings a (temperature > 0 in every row)."""
    t = a.temperature[:, None]
    _, fits = sampling._draw_among_candidates(x / t, a, jnp.zeros_like(x), None)
    return int((~fits).sum())


def candidates(b: int, v: int, repeats: int) -> dict:
    """Mode "filter" with candidates against whole rows at b rows: us a call, slow rows, and
    whether the tokens agree, per logits shape and settings."""
    row = {"rows": b}
    plain = functools.partial(sample_rows, mode="sample")
    filtered = functools.partial(sample_rows, mode="filter")

    def us(f, *args) -> float:
        return round(bm.pipelined_time(lambda _: f(*args), repeats=repeats, min_time=0.2) * 1e6, 1)

    for shape in SHAPES:
        x = shaped_logits(b, v, shape)
        row[f"{shape}_sampler_sample"] = us(jax.jit(plain), x, arrays(b))
        for name, settings in CANDIDATE_SETTINGS.items():
            a, key = arrays(b, **settings), f"{shape}_{name}"
            whole = traced_with(filtered, _draw_filtered=whole_rows_draw)
            new = jax.jit(filtered)
            row[f"{key}_slow_rows"] = slow_rows(x, a)
            row[f"{key}_same_tokens"] = bool(
                (np.asarray(new(x, a).tokens) == np.asarray(whole(x, a).tokens)).all()
            )
            row[f"{key}_whole_rows"] = us(whole, x, a)
            row[f"{key}_candidates"] = us(new, x, a)
            if "top_k" in settings:
                row[f"{key}_top_k_only"] = us(
                    jax.jit(functools.partial(sample_rows, mode=sampling.TOP_K_ONLY)), x, a
                )
            elif shape == "sharp":
                skip = traced_with(filtered, _draw_slow_rows=lambda *args: args[4])
                row[f"{key}_candidates_no_slow_branch"] = us(skip, x, a)
            else:
                for buckets in ((16,), (32, 128), (64,)):
                    f = traced_with(filtered, SLOW_ROW_BUCKETS=buckets)
                    row[f"{key}_candidates_buckets_{'_'.join(map(str, buckets))}"] = us(f, x, a)
        print(row, flush=True)
    return row


def uses_cub(b: int, v: int) -> bool:
    """Whether the compiled uint32 sort at [b, v] calls CUB (XLA picks it by size)."""
    text = jax.jit(sort_u32).lower(logits(b, v, "normal")).compile().as_text()
    return "cub_sort" in text  # XLA's custom call target: xla.gpu.ext.cub_sort_{keys,pairs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=bm.int_list, default=[16, 64, 256, 512])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--candidates", action="store_true", help="mode filter's candidates (above)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {**bm.report_header(), "vocab": args.vocab, "rows": []}
    if args.candidates:
        report["logit_stds"], report["slow_row_buckets"] = SHAPES, sampling.SLOW_ROW_BUCKETS
        for b in args.rows:
            report["rows"].append(candidates(b, args.vocab, args.repeats))
            if args.out:
                bm.write_json(args.out, report)
        return
    report["checks"] = checks(args.check_rows, args.vocab)
    report["cub"] = {str(b): uses_cub(b, args.vocab) for b in (args.rows[0], args.check_rows)}
    print(report["checks"], report["cub"], flush=True)
    for b in args.rows:
        report["rows"].append(times(b, args.vocab, args.repeats))
        print(report["rows"][-1], flush=True)
        if args.out:
            bm.write_json(args.out, report)


if __name__ == "__main__":
    main()
