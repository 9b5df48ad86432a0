"""The one dispatch point between the model and its attention implementations.

`impl` picks the implementation: "xla" (plain einsums, softmax in f32), "reference" (the same in
f32 throughout, the yardstick), "cudnn" (prefill through `jax.nn.dot_product_attention`) and
"pallas" (the kernels in `pallas_kernels/`). Grouped-query attention never repeats K/V: the
N query heads are viewed as [K, G].

Over a mesh (`mesh` given), each entry point runs on every device's share of the heads through
`shard_map`: the kernels see a single-device problem of N / tp query heads and K / tp kv heads
(one repeated kv head where K < tp, see `sharding.py`), and no head crosses a device.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxinfer.sharding import MODEL

IMPLS = ("xla", "reference", "cudnn", "pallas")
PAGE = 64  # page size under which the paged decode kernel reads a contiguous cache


def default_impl() -> str:
    """Pallas kernels on a GPU (flash prefill, paged decode: measured fastest there), XLA on CPU."""
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return impl


def causal_attention(
    q: Float[Array, "B T N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], *, impl: str
) -> Float[Array, "B T N H"]:
    """Causal self-attention over the T tokens given (prefill, or a forward with no cache)."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, causal=True)
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None]  # [1, T, S]
    return masked_attention(q, k, v, mask, reference=impl == "reference")


def cached_attention(
    q: Float[Array, "B T N H"],
    k_cache: Float[Array, "K B S H"],
    v_cache: Float[Array, "K B S H"],
    q_positions: Int[Array, "B T"],
    *,
    impl: str,
) -> Float[Array, "B T N H"]:
    """Attention of new tokens over a contiguous cache; key s is visible to a query at p iff s <= p."""
    kv_heads, b, s, h = k_cache.shape
    if impl == "pallas" and q.shape[1] == 1 and s % PAGE == 0:
        from pallas_kernels.paged_attention import paged_attention

        pages = s // PAGE  # row b owns pages b * pages .. (b + 1) * pages - 1
        as_pages = lambda c: c.reshape(kv_heads, b * pages, PAGE, h)  # a view: no copy
        tables = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
        out = paged_attention(
            q[:, 0], as_pages(k_cache), as_pages(v_cache), tables, q_positions[:, 0] + 1
        )
        return out[:, None]
    mask = jnp.arange(s)[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
    return masked_attention(q, k_cache, v_cache, mask, reference=impl == "reference", kv="KBSH")


def contiguous_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
    cache: tuple[Array, Array] | None,
    prefill: bool,
    *,
    impl: str,
    mesh: Mesh | None = None,
):
    """Attention over a contiguous cache (k, v) [K, B, S, H] after writing row b's T new entries
    at slots positions[b]; `prefill` says the cache held nothing before. cache None: a plain
    causal forward that keeps nothing. Over `mesh`, on each device's heads."""
    k, v = _repeat_kv(k, mesh, axis=2), _repeat_kv(v, mesh, axis=2)

    def attend(q, k, v, positions, cache):
        if cache is None:
            return causal_attention(q, k, v, impl=impl), None
        k_cache, v_cache = _write(cache[0], k, positions), _write(cache[1], v, positions)
        if prefill:  # attend to the fresh tokens alone
            return causal_attention(q, k, v, impl=impl), (k_cache, v_cache)
        return cached_attention(q, k_cache, v_cache, positions, impl=impl), (k_cache, v_cache)

    cache_axes = None if cache is None else (0, 0)
    return on_head_shards(
        mesh,
        attend,
        (q, k, v, positions, cache),
        in_axes=(2, 2, 2, None, cache_axes),
        out_axes=(2, cache_axes),
    )


def _write(
    cache: Float[Array, "K B S H"], new: Float[Array, "B T K H"], positions: Int[Array, "B T"]
) -> Float[Array, "K B S H"]:
    """Writes row b's T new entries at slots positions[b]."""
    rows = jnp.broadcast_to(jnp.arange(new.shape[0])[:, None], positions.shape)  # [B, T]
    return cache.at[:, rows, positions].set(new.transpose(2, 0, 1, 3).astype(cache.dtype))


def on_head_shards(mesh: Mesh | None, fn, args: tuple, in_axes: tuple, out_axes):
    """`fn(*args)`, over `mesh` on each device's slice of the heads: an int in `in_axes` /
    `out_axes` (pytrees matching args / the output) names the head axis that the "model" mesh
    axis splits; None: the whole value on every device. No mesh: `fn(*args)` as it is."""
    if mesh is None:
        return fn(*args)

    def spec(axis):
        return PartitionSpec() if axis is None else PartitionSpec(*([None] * axis), MODEL)

    is_axis = lambda x: x is None or isinstance(x, int)
    in_specs = tuple(
        jax.tree.map(spec, a, is_leaf=is_axis) if isinstance(a, tuple) else spec(a) for a in in_axes
    )
    out_specs = jax.tree.map(spec, out_axes, is_leaf=is_axis)
    shard = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return shard(*args)


def _repeat_kv(x: Array, mesh: Mesh | None, axis: int) -> Array:
    """Each kv head repeated tp / K times when a mesh has more devices than kv heads (the pool
    then holds tp head slots, see `sharding.py`); otherwise x as it is."""
    if mesh is None or x.shape[axis] >= mesh.shape[MODEL]:
        return x
    return jnp.repeat(x, mesh.shape[MODEL] // x.shape[axis], axis=axis)


@flax.struct.dataclass
class PagedMeta:
    """Where a step's packed tokens go in the page pool and which pages each sequence reads.

    Row b of the B sequences owns tokens cu_q_lens[b]:cu_q_lens[b+1] of the T packed ones; they are
    the last of its kv_lens[b] tokens. Tokens past cu_q_lens[-1] are padding (slot -1).
    `decode` (static: its own compiled program) says token b is sequence b's one new token and
    T == B, so the split-K decode kernel serves the step instead of the ragged one.
    """

    slot_mapping: Int[Array, "T"]  # page * L + offset; -1 = write nothing
    block_tables: Int[Array, "B W"]  # page ids of each sequence (W = max pages per sequence)
    kv_lens: Int[Array, "B"]
    cu_q_lens: Int[Array, "B+1"]
    decode: bool = flax.struct.field(pytree_node=False, default=False)


def paged_attention(
    q: Float[Array, "T N H"],
    k: Float[Array, "T K H"],
    v: Float[Array, "T K H"],
    k_pages: Float[Array, "K P L H"],
    v_pages: Float[Array, "K P L H"],
    meta: PagedMeta,
    *,
    impl: str,
    mesh: Mesh | None = None,
):
    """Writes the step's K/V into their pages, then attends each token to its sequence's pages.
    Over `mesh`, on each device's heads (pages split by kv heads)."""
    k, v = _repeat_kv(k, mesh, axis=1), _repeat_kv(v, mesh, axis=1)
    return on_head_shards(
        mesh,
        lambda *a: _paged_attention(*a, impl=impl),
        (q, k, v, k_pages, v_pages, meta),
        in_axes=(1, 1, 1, 0, 0, None),
        out_axes=(1, (0, 0)),
    )


# Decode programs of at most this many rows take the fused kernel. On an H200 (Llama-3-8B,
# bench/README.md) it was 1.2-1.5% faster at one row (engine TPOT, three calls) and 12% slower
# per layer at 100 rows of 1,500 tokens; between, kernel timings went either way. With the new
# token joined after the kv loop (`new_token_last`), every decode program takes it.
FUSED_DECODE_MAX_ROWS = 1


def rope_paged_attention(
    qkv: Float[Array, "T K G+2 H"],
    k_pages: Float[Array, "K P L H"],
    v_pages: Float[Array, "K P L H"],
    meta: PagedMeta,
    positions: Int[Array, "T"],
    inv_freq: np.ndarray,
    qk_norm: tuple[Array, Array, float] | None = None,
    *,
    impl: str,
    fused: bool = False,
    new_token_last: bool = False,
):
    """`paged_attention` from the q/k/v matmul's output as it is, before RoPE: one Pallas kernel
    applies RoPE to q and k and writes K/V (`pallas_kernels.rope_write`; with `qk_norm`, (q
    scale, k scale, eps), Qwen3's per-head norms first), then each token attends to its
    sequence's pages. `fused` with the Pallas decode kernel: all of it in that one kernel
    (`paged_attention.rope_paged_decode`, the q/k norms too; the same numbers, or within
    rounding with the norms or `new_token_last`: in every decode program, the new token joined
    after the kv loop). One device (no mesh). Returns ([T, N, H], (k_pages, v_pages))."""
    from pallas_kernels.paged_attention import PagedConfig, rope_paged_decode
    from pallas_kernels.rope_write import rope_write

    max_rows = 1 << 30 if new_token_last else FUSED_DECODE_MAX_ROWS
    if fused and impl == "pallas" and meta.decode and qkv.shape[0] <= max_rows:
        # padding rows: length 1, slot -1, dropped
        lengths = jnp.maximum(meta.kv_lens, 1)
        out, k_pages, v_pages = rope_paged_decode(
            qkv,
            k_pages,
            v_pages,
            meta.block_tables,
            lengths,
            positions,
            meta.slot_mapping,
            inv_freq,
            qk_norm,
            config=PagedConfig(new_token_last=True) if new_token_last else None,
        )
        return out, (k_pages, v_pages)
    q, k_pages, v_pages = rope_write(
        qkv, k_pages, v_pages, positions, meta.slot_mapping, inv_freq, qk_norm
    )
    return _attend_pages(q, k_pages, v_pages, meta, impl=impl), (k_pages, v_pages)


def _paged_attention(q, k, v, k_pages, v_pages, meta: PagedMeta, *, impl: str):
    from pallas_kernels.paged_attention import write_kv

    if impl != "pallas" and q.shape[0] <= _EACH_MAX_TOKENS:
        k_pages, v_pages = _write_kv_each(k_pages, v_pages, k, v, meta.slot_mapping)
    else:
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta.slot_mapping)
    return _attend_pages(q, k_pages, v_pages, meta, impl=impl), (k_pages, v_pages)


def _attend_pages(q, k_pages, v_pages, meta: PagedMeta, *, impl: str):
    """Each token attends to its sequence's pages (its own K/V already written)."""
    from pallas_kernels.paged_attention import paged_attention as decode_kernel
    from pallas_kernels.paged_attention import ragged_paged_attention_reference

    if impl == "reference":
        out = ragged_paged_attention_reference(
            q, k_pages, v_pages, meta.block_tables, meta.kv_lens, meta.cu_q_lens
        )
    elif impl != "pallas":
        out = _xla_paged_attention(q, k_pages, v_pages, meta)
    elif meta.decode:  # padding rows read one slot of page 0; dropped later
        out = decode_kernel(q, k_pages, v_pages, meta.block_tables, jnp.maximum(meta.kv_lens, 1))
    else:
        out = _mixed_step_attention(q, k_pages, v_pages, meta)
    return out


_EACH_MAX_TOKENS = 16


def _write_kv_each(
    k_pages: Float[Array, "K P L H"],
    v_pages: Float[Array, "K P L H"],
    k: Float[Array, "T K H"],
    v: Float[Array, "T K H"],
    slots: Int[Array, "T"],
):
    """`write_kv` one token at a time, by dynamic-update-slice. On a CPU, XLA lowers the scatter
    of a few rows through copies of the whole pool (measured: 2 s of a 2.2 s SmolLM2 decode step
    at 1,024 pages); these updates stay in place. For steps of few tokens (decodes)."""
    kv_heads, _, page, h = k_pages.shape

    def put(pages, rows, t):  # rows [T, K, H]; slot -1 rewrites the slot 0 it read
        slot = jnp.maximum(slots[t], 0)
        at = (0, slot // page, slot % page, 0)
        old = jax.lax.dynamic_slice(pages, at, (kv_heads, 1, 1, h))
        new = jnp.where(slots[t] >= 0, rows[t].astype(pages.dtype)[:, None, None, :], old)
        return jax.lax.dynamic_update_slice(pages, new, at)

    def body(t, pools):
        return put(pools[0], k, t), put(pools[1], v, t)

    return jax.lax.fori_loop(0, slots.shape[0], body, (k_pages, v_pages))


def _xla_paged_attention(
    q: Float[Array, "T N H"],
    k_pages: Float[Array, "K P L H"],
    v_pages: Float[Array, "K P L H"],
    meta: PagedMeta,
    chunk: int = 16,
) -> Float[Array, "T N H"]:
    """Plain XLA over the pages, `chunk` tokens at a time: only a chunk's sequences' pages are
    gathered at once ([K, C, S, H], S = block-table width x L), never all T tokens' (at 2,048
    tokens of an 8k context that was tens of GB). Padding tokens give 0."""
    t, n, h = q.shape
    b = meta.kv_lens.shape[0]
    token = jnp.arange(t)
    seq = jnp.searchsorted(meta.cu_q_lens, token, side="right", method="compare_all") - 1  # [T]
    live = seq < b
    seq = jnp.minimum(seq, b - 1)
    q_lens = meta.cu_q_lens[seq + 1] - meta.cu_q_lens[seq]
    pos = meta.kv_lens[seq] - q_lens + token - meta.cu_q_lens[seq]  # [T] each token's position

    kv_heads, num_pages, page, _ = k_pages.shape

    def gather(pages, tables):  # [K, P, L, H], [C, W] -> [K, C, W * L, H]
        # Gathered along the leading axis of a [K * P, L * H] view: XLA then reads the pages where
        # they are; gathering axis 1 of the pool made the CPU re-lay (copy) the pool every layer.
        rows = pages.reshape(kv_heads * num_pages, page * h)
        idx = jnp.arange(kv_heads)[:, None, None] * num_pages + tables[None]  # [K, C, W]
        return rows[idx].reshape(kv_heads, tables.shape[0], tables.shape[1] * page, h)

    def attend(q_c, seq_c, pos_c):  # [C, N, H], [C], [C]
        tables = meta.block_tables[seq_c]  # [C, W]
        k, v = gather(k_pages, tables), gather(v_pages, tables)  # [K, C, S, H]
        w = tables.shape[1]
        visible = jnp.arange(w * page)[None, None, :] <= pos_c[:, None, None]  # [C, 1, S]
        return masked_attention(q_c[:, None], k, v, visible, kv="KBSH")[:, 0]

    if t <= chunk or t % chunk:
        out = attend(q, seq, pos)
    else:
        parts = (q.reshape(t // chunk, chunk, n, h), seq.reshape(-1, chunk), pos.reshape(-1, chunk))
        out = jax.lax.map(lambda part: attend(*part), parts).reshape(t, n, h)
    return jnp.where(live[:, None, None], out, 0).astype(q.dtype)


def _mixed_step_attention(
    q: Float[Array, "T N H"], k_pages, v_pages, meta: PagedMeta
) -> Float[Array, "T N H"]:
    """Sequences with one new token (decodes) through the split-K decode kernel, the others
    through the ragged kernel: the ragged kernel is slow on one-token queries (0.40 ms a layer at
    256 decodes of ~200 tokens on an H200, against ~0.05 ms of KV bytes)."""
    from pallas_kernels.paged_attention import paged_attention as decode_kernel
    from pallas_kernels.paged_attention import ragged_paged_attention as ragged_kernel

    t, b = q.shape[0], meta.kv_lens.shape[0]
    starts, q_lens = meta.cu_q_lens[:-1], meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]  # [B]
    single = q_lens == 1
    # Other rows (prefill chunks, padding) attend one slot of their first page; dropped below.
    dec = decode_kernel(
        q[jnp.minimum(starts, t - 1)],
        k_pages,
        v_pages,
        meta.block_tables,
        jnp.where(single, meta.kv_lens, 1),
    )  # [B, N, H]
    rag = ragged_kernel(
        q, k_pages, v_pages, meta.block_tables, meta.kv_lens, meta.cu_q_lens, skip_single_token=True
    )  # one-token rows left unwritten
    token = jnp.arange(t)
    seq = jnp.minimum(
        jnp.searchsorted(meta.cu_q_lens[1:], token, side="right", method="compare_all"), b - 1
    )  # [T]
    from_decode = single[seq] & (token < meta.cu_q_lens[-1])
    return jnp.where(from_decode[:, None, None], dec[seq], rag)


def masked_attention(
    q: Float[Array, "B T N H"],
    k: Array,
    v: Array,
    mask: Bool[Array, "B T S"],
    *,
    reference: bool = False,
    kv: str = "BSKH",
) -> Float[Array, "B T N H"]:
    """Softmax attention under `mask`; k and v are laid out as `kv` says (BSKH or KBSH)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[kv.index("K")]
    dtype = q.dtype
    if reference:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum(f"BTKGH,{kv}->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"BKGTS,{kv}->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(dtype)
