"""Attention over a paged KV cache: decode, ragged (mixed prefill/decode), writes.

Shapes (jaxinfer's letter table): B sequences, T query tokens, N query heads,
K kv heads, G = N // K, H head dim, P pages in the pool, L tokens per page.

The cache is one pool per layer: k_pages/v_pages [K, P, L, H]. A sequence's
tokens live in the pages named by its row of ``block_tables`` [B, max_pages]
(page ids into P, in any order); token t of sequence b is at
``k_pages[:, block_tables[b, t // L], t % L]``. Inside the kernels the pool is
viewed as [K, P * L, H] rows, so a tile of tokens is one gather of rows
``page * L + offset``.

Both kernels put the G query heads of one kv head in the same program: each
K/V row is read once per kv head, not once per query head.

* ``paged_attention``: one new token per sequence (decode). Split-K: each
  sequence's own length is cut into ``num_splits`` ranges, one program each;
  the partial (acc, max, sum) are merged with a log-sum-exp combine. This
  keeps every SM busy at small batch and long context, also when the block
  table is far wider than the sequences (an engine sized for 8k tokens
  decoding 512-token sequences).
* ``ragged_paged_attention``: sequence b brings q_len_b >= 1 new tokens
  (packed in q [T, N, H]), the last q_len_b of its kv_len_b cached tokens,
  causal among themselves.
* ``write_kv``: scatter new K/V rows into their slots (page * L + offset).
* ``rope_paged_decode``: the decode kernel fed the q/k/v matmul's output as it
  is: RoPE of q and k, the K/V write and the attention in one launch (the
  program that owns the new token writes its row, then reads it back with the
  others after a CTA barrier).

File layout: kernels -> pallas_call wrappers (tile sizes in frozen configs)
-> validated public entry points (interpret mode and the SM count decided
there, passed to their jitted parts as static arguments) -> ``*_reference``
(plain jnp, over ``common.attention_reference``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.common import (
    LOG2_E,
    SUPPORTED_DTYPES,
    check_tiles,
    init_carry,
    online_softmax_step,
)
from pallas_kernels.rope_write import check_qk_norm, scaled_norm, supported


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """Tiles of the paged kernels.

    Attributes:
      block_k: kv tokens per inner-loop step (power of two, a multiple of L or
        smaller than L and dividing it); None: the decode kernel picks 64 when
        its (sequence, kv head) pairs fill the GPU twice over, else 32, and the
        ragged kernel 32.
      num_splits: split-K ranges per sequence for decode; None picks enough
        programs to fill the GPU.
      block_rows: query rows (tokens x padded heads per kv head) per ragged
        program (power of two >= 16).
      num_warps, num_stages: Triton launch parameters; num_stages None: 4 for
        decode, 2 for the ragged kernel.
      stream: decode in the balanced (stream-K) form: programs_per_sm programs
        an SM, each the same number of kv steps, sequences cut across programs
        merged by a second launch (num_splits unused).
      prefetch_pages: the decode loops load each step's block-table entries
        one step ahead (carried), not in the step that gathers them.
      new_token_last: `rope_paged_decode` only: the kv loop reads the old
        tokens, and the new token joins the softmax after it from registers,
        its K/V written last (the loop is then the plain decode kernel's; the
        sums' order differs from the two kernels', within rounding).
      backend: "triton" (Pallas Triton lowering).
    """

    # 4 stages and block_k 32 or 64 by batch: measured on an H200 (NOTES.md)
    block_k: int | None = None
    num_splits: int | None = None
    block_rows: int = 64
    num_warps: int = 4
    num_stages: int | None = None
    stream: bool = False
    programs_per_sm: int = 2
    prefetch_pages: bool = False
    new_token_last: bool = False
    backend: str = "triton"

    def __post_init__(self):
        check_tiles(self, ("block_k", "block_rows") if self.block_k else ("block_rows",))
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")
        if self.programs_per_sm < 1:
            raise ValueError(f"programs_per_sm={self.programs_per_sm} must be >= 1")


RAGGED_BLOCK_K = 32
DECODE_STAGES = 4
# 2 stages: 11-14% faster than 4 at prefill chunks of 512-8,192 tokens (H200, NOTES.md)
RAGGED_STAGES = 2


def _decode_block_k(config: PagedConfig, batch, num_kv_heads, num_sms: int) -> int:
    """64-token steps once (sequence, kv head) pairs fill the SMs twice over: at 100 sequences of
    ~1,750 tokens 3.9 TB/s against 3.2 with 32 (H200); with fewer pairs the splits fill the GPU
    and 32-token steps were faster (batch 1: 20 us a call against 35; batch 32: 3.3 against
    3.0 TB/s)."""
    if config.block_k:
        return config.block_k
    return 64 if batch * num_kv_heads >= 2 * num_sms else 32


def _choose_splits(config: PagedConfig, block_k, batch, num_kv_heads, max_tokens, num_sms: int):
    if config.num_splits is not None:
        return min(config.num_splits, pl.cdiv(max_tokens, block_k))
    target = 4 * num_sms  # a few waves over the SMs
    splits = pl.cdiv(target, batch * num_kv_heads)
    # at least two kv steps per split, so the pipeline has something to overlap
    return max(1, min(splits, max_tokens // (2 * block_k)))


# ----------------------------------------------------------------------------
# Shared pieces of the kernels.
# ----------------------------------------------------------------------------
def _gather_kv(ref, rows, cols, mask):
    """Rows of a [P * L, Hp] page pool: tile [rows.size, cols.size]."""
    idx = (rows[:, None], cols[None, :])
    if mask is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=mask, other=0.0)


def _tile_pages(bt_ref, bt_row, first_token, *, block_k, page_size, valid):
    """The page of each token [first_token, first_token + block_k) ([block_k] int32); tokens
    not `valid` (None: all are) get page 0 and their slot is clamped into the table."""
    tok = first_token + jnp.arange(block_k, dtype=jnp.int32)
    slot = lax.div(tok, page_size)
    if valid is not None:
        slot = jnp.minimum(slot, bt_ref.shape[-1] - 1)
    bt_idx = (slot,) if bt_row is None else (bt_row, slot)
    if valid is None:
        return bt_ref[bt_idx]
    return plgpu.load(bt_ref.at[bt_idx], mask=valid, other=0)


def _kv_tile(
    bt_ref,
    bt_row,
    k_ref,
    v_ref,
    first_token,
    *,
    block_k,
    page_size,
    cols,
    head_mask,
    valid,
    page=None,
):
    """Loads K and V of tokens [first_token, first_token + block_k).

    bt_ref is a block-table row [max_pages] (bt_row None) or the whole table
    [B, max_pages] with bt_row the sequence (one indexer: Triton takes one).
    ``valid`` [block_k] masks tokens past the sequence (None: all valid), whose
    block-table entries may hold anything. ``page`` [block_k]: the tokens' pages
    when already loaded (None: loaded here).
    """
    tok = first_token + jnp.arange(block_k, dtype=jnp.int32)
    if page is None:
        page = _tile_pages(
            bt_ref, bt_row, first_token, block_k=block_k, page_size=page_size, valid=valid
        )
    rows = page * page_size + lax.rem(tok, page_size)
    mask = None if valid is None else valid[:, None]
    if head_mask is not None:
        mask = head_mask if mask is None else jnp.logical_and(mask, head_mask)
    return (_gather_kv(k_ref, rows, cols, mask), _gather_kv(v_ref, rows, cols, mask), tok)


def _decode_range(q, bt_ref, bt_row, k_ref, v_ref, t0, t1, *, step, prefetch_pages, **tiles):
    """One query block's online softmax over kv tokens [t0, t1): whole block_k steps unmasked,
    then the masked tail. Returns (acc [Gp, Hp], m [Gp], l [Gp]); `tiles` are `_kv_tile`'s
    block_k, page_size, cols and head_mask."""
    block_k, page_size = tiles["block_k"], tiles["page_size"]
    tile = functools.partial(_kv_tile, bt_ref, bt_row, k_ref, v_ref, **tiles)
    pages = functools.partial(_tile_pages, bt_ref, bt_row, block_k=block_k, page_size=page_size)

    def live(first):
        return first + jnp.arange(block_k, dtype=jnp.int32) < t1

    def full_step(i, carry):
        first = t0 + i * block_k
        if not prefetch_pages:
            k, v, _ = tile(first, valid=None)
            return step(q, k, lambda: v, carry, visible=None)
        # this step's pages came with the carry; the next step's load now, a step ahead of
        # the gather they address
        *carry, page = carry
        page_next = pages(first + block_k, valid=live(first + block_k))
        k, v, _ = tile(first, valid=None, page=page)
        return (*step(q, k, lambda: v, tuple(carry), visible=None), page_next)

    def tail_step(i, carry):
        first = t0 + i * block_k
        valid = live(first)
        page = None
        if prefetch_pages:
            *carry, page = carry
        k, v, _ = tile(first, valid=valid, page=page)
        out = step(q, k, lambda: v, tuple(carry), visible=valid[None, :])
        return (*out, page) if prefetch_pages else out

    carry = init_carry(*q.shape)
    if prefetch_pages:
        carry = (*carry, pages(t0, valid=live(t0)))
    n_full = jnp.maximum(lax.div(t1 - t0, block_k), 0)
    n_steps = jnp.maximum(lax.div(t1 - t0 + block_k - 1, block_k), 0)
    carry = lax.fori_loop(0, n_full, full_step, carry)
    return lax.fori_loop(n_full, n_steps, tail_step, carry)[:3]


# ----------------------------------------------------------------------------
# Decode kernel (split-K).
# ----------------------------------------------------------------------------
class _NewToken:
    """A kv head's new token in the q/k/v matmul's rows [Rp, H] (its G query heads, its k, its
    v; before RoPE).

    RoPE is `rope_write`'s math element for element: column c pairs with c +- H/2, and
    c < H/2: x cos - x' sin, else x cos + x' sin, each product and the sum rounded to the
    dtype; the partner column is loaded through a permuted index instead of a split.
    """

    def __init__(self, qkv_ref, pos, freq_ref, group: int, qk_norm=None):
        self.ref, self.pos, self.freq_ref, self.group = qkv_ref, pos, freq_ref, group
        self.qk_norm = qk_norm  # None, or (q_scale_ref [H], k_scale_ref [H], eps)

    def _norm(self, x, x_partner, scale_ref, cols, partner):
        """Rows [.., H] (and the same rows at the partner columns) RMS-normalised over H and
        scaled, as `rope_write`'s q/k norm does it (its sum of squares half by half)."""
        head_dim = self.ref.shape[1]
        lo, sq = cols < head_dim // 2, x * x
        sum_sq = jnp.sum(jnp.where(lo, sq, 0.0), axis=-1, keepdims=True) + jnp.sum(
            jnp.where(lo, 0.0, sq), axis=-1, keepdims=True
        )
        scales = (scale_ref[cols], scale_ref[partner])
        eps, dtype = self.qk_norm[2], self.ref.dtype
        return scaled_norm((x, x_partner), scales, sum_sq, head_dim, eps, dtype)

    def _rope(self, load, scale_ref=None):
        """load(columns) -> rows [.., H] at those columns; returns them rotated (normalised
        first with `scale_ref`), in the dtype."""
        head_dim = self.ref.shape[1]
        half = head_dim // 2
        dtype, f32 = self.ref.dtype, jnp.float32
        cols = jnp.arange(head_dim, dtype=jnp.int32)
        partner = jnp.where(cols < half, cols + half, cols - half)
        sign = jnp.where(cols < half, -1.0, 1.0).astype(f32)
        angle = self.pos.astype(f32) * self.freq_ref[...]  # freq [H]: inv_freq twice over
        cos = jnp.cos(angle).astype(dtype).astype(f32)
        sin = jnp.sin(angle).astype(dtype).astype(f32)
        r = lambda a: a.astype(dtype).astype(f32)
        x, x_partner = load(cols).astype(f32), load(partner).astype(f32)
        if scale_ref is not None:
            x, x_partner = self._norm(x, x_partner, scale_ref, cols, partner)
        # -(x' sin) is exact, so the sum rounds as rope_write's difference does
        return r(r(x * cos) + r(sign * x_partner * sin)).astype(dtype)

    def q(self, group_pad: int):
        """RoPE'd q [Gp, H], rows past G zero."""
        g = jnp.arange(group_pad, dtype=jnp.int32)[:, None]
        ok = g < self.group
        scale_ref = self.qk_norm[0] if self.qk_norm else None
        load = lambda c: plgpu.load(self.ref.at[g, c[None, :]], mask=ok, other=0.0)
        return self._rope(load, scale_ref)

    def kv(self):
        """Its RoPE'd k and its v, [H] each, in the dtype."""
        scale_ref = self.qk_norm[1] if self.qk_norm else None
        k = self._rope(lambda c: self.ref[self.group, c], scale_ref)
        return k, self.ref[self.group + 1, :]

    def write(self, k_out, v_out, slot, owner, kv=None):
        """Its RoPE'd k and its v (`kv`, or from `kv()`) into their slot of the pools [P*L, H]
        (by the split that owns the token; slot < 0: nowhere)."""
        k, v = kv or self.kv()
        row = pl.ds(jnp.maximum(slot, 0), 1)
        live = jnp.full((1, k.shape[0]), owner & (slot >= 0))
        plgpu.store(k_out.at[row, :], k[None, :].astype(k_out.dtype), mask=live)
        plgpu.store(v_out.at[row, :], v[None, :].astype(v_out.dtype), mask=live)


def _join_token(q, k, v, carry, *, qk_scale, owner):
    """One more kv token, held in registers (k, v [H]), into the online softmax's carry, as
    `online_softmax_step` would take a tile of it (p rounded to v's dtype); a program that does
    not own the token (`owner` false) leaves its carry as it is."""
    acc, m_prev, l_prev = carry
    f32 = jnp.float32
    s = jnp.sum(q.astype(f32) * k.astype(f32)[None, :], axis=1) * qk_scale  # [Gp]
    s = jnp.where(owner, s, common.MASK_VALUE)
    m_new = jnp.maximum(m_prev, s)
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.where(owner, jnp.exp2(s - m_new), 0.0)
    p_v = p.astype(v.dtype).astype(f32)
    acc = acc * alpha[:, None] + p_v[:, None] * v.astype(f32)[None, :]
    return acc, m_new, l_prev * alpha + p


def _decode_kernel(
    q_ref,
    k_ref,
    v_ref,
    bt_ref,
    len_ref,
    *refs,
    qk_scale,
    group,
    head_dim,
    page_size,
    block_k,
    num_splits,
    finalize,
    dot_precision,
    fresh,
    qk_eps,
    prefetch_pages,
    new_token_last,
    interpret,
):
    # q_ref [Gp, Hp], or with `fresh` the new token's q/k/v rows [Rp, H] before RoPE;
    # k_ref/v_ref [P*L, Hp]; bt_ref [max_pages]; len_ref [B] (the new token counted)
    # fresh: refs = (pos_ref [B], slot_ref [B], freq_ref [H], *outputs, k_out, v_out), with
    # q_scale_ref, k_scale_ref [H] after freq_ref when qk_eps is set (Qwen3's q/k norms)
    group_pad = max(16, pl.next_power_of_2(group))
    head_pad = k_ref.shape[-1]
    b = pl.program_id(1)
    split = pl.program_id(2)
    length = len_ref[b]
    cols = jnp.arange(head_pad, dtype=jnp.int32)
    head_mask = (cols < head_dim)[None, :] if head_pad != head_dim else None
    g_ok = jnp.arange(group_pad) < group
    q_mask = g_ok[:, None]
    if head_mask is not None:
        q_mask = jnp.logical_and(q_mask, head_mask)
    # Each sequence cuts its own length (not the table's width) into num_splits
    # ranges of whole steps: a short sequence in a table sized for long ones
    # still spreads over every split, and only its last step is masked.
    per_split = (
        lax.div(lax.div(length + num_splits - 1, num_splits) + block_k - 1, block_k) * block_k
    )
    if fresh:
        pos_ref, slot_ref, freq_ref, *out_refs, k_out, v_out = refs
        qk_norm = None
        if qk_eps is not None:
            q_scale_ref, k_scale_ref, *out_refs = out_refs
            qk_norm = (q_scale_ref, k_scale_ref, qk_eps)
        new_token = _NewToken(q_ref, pos_ref[b], freq_ref, group, qk_norm)
        q = new_token.q(group_pad)
        owner = lax.div(length - 1, per_split) == split  # the split holding the new token
    if fresh and not new_token_last:
        new_token.write(k_out, v_out, slot_ref[b], owner)
        # The kv loop reads the new row back like any other, from GMEM, once every thread of
        # the program has stored its part (a CTA barrier orders global memory too). Taking
        # it from registers instead, a select on the tile that holds it, cost ~20 us a layer
        # at 100 x 1,500 on an H200 (bench/README.md).
        if not interpret:
            plgpu.debug_barrier()
        else:  # one thread, no barrier; the input refs keep the old pools there (on a GPU
            k_ref, v_ref = k_out, v_out  # they are the same buffers as the outputs)
    elif not fresh:
        out_refs = refs
        q = plgpu.load(q_ref, mask=q_mask, other=0.0)
    t0 = split * per_split
    # new_token_last: the loop stops before the new token, which no program then reads from
    # the pools (its slot may be written while another split reads)
    t1 = jnp.minimum(t0 + per_split, length - 1 if fresh and new_token_last else length)
    step = functools.partial(online_softmax_step, qk_scale=qk_scale, dot_precision=dot_precision)
    acc, m, l = _decode_range(
        q,
        bt_ref,
        None,
        k_ref,
        v_ref,
        t0,
        t1,
        step=step,
        prefetch_pages=prefetch_pages,
        block_k=block_k,
        page_size=page_size,
        cols=cols,
        head_mask=head_mask,
    )
    if fresh and new_token_last:
        kv = new_token.kv()
        acc, m, l = _join_token(q, *kv, (acc, m, l), qk_scale=qk_scale, owner=owner)
        new_token.write(k_out, v_out, slot_ref[b], owner, kv)

    if finalize:
        (o_ref,) = out_refs  # [Gp, Hp] of [G, H]
        out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        plgpu.store(o_ref, out.astype(o_ref.dtype), mask=q_mask)
    else:
        o_ref, m_ref, l_ref = out_refs  # [Gp, Hp], [Gp], [Gp] of G rows
        plgpu.store(o_ref, acc, mask=q_mask)
        plgpu.store(m_ref, m, mask=g_ok)
        plgpu.store(l_ref, l, mask=g_ok)


def _decode_call(
    q,
    k_rows,
    v_rows,
    block_tables,
    lengths,
    *,
    sm_scale,
    page_size,
    config: PagedConfig,
    interpret,
    num_sms,
    fresh=None,
    qk_eps=None,
):
    """q [B, K, G, H]; k_rows/v_rows [K, P*L, H] -> [B, K, G, H].

    fresh = (positions [B], slots [B], freq [H]): q is instead the q/k/v matmul's output
    [B, K, G + 2, H] before RoPE, its token the last of each sequence's `lengths`; RoPE and
    the K/V write happen in the kernel, which returns ([B, K, G, H], k_rows, v_rows). With
    qk_eps, fresh also holds (q_scale [H], k_scale [H]): the q/k norms before RoPE."""
    batch, num_kv_heads, group, head_dim = q.shape
    if fresh is not None:
        group -= 2
    num_rows = k_rows.shape[1]
    max_pages = block_tables.shape[1]
    head_pad = pl.next_power_of_2(head_dim)
    group_pad = max(16, pl.next_power_of_2(group))
    block_k = _decode_block_k(config, batch, num_kv_heads, num_sms)
    max_tokens = max_pages * page_size
    splits = _choose_splits(config, block_k, batch, num_kv_heads, max_tokens, num_sms)
    finalize = splits == 1
    dot_precision = common.dot_precision(q.dtype)

    kernel = functools.partial(
        _decode_kernel,
        qk_scale=sm_scale * LOG2_E,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        block_k=block_k,
        num_splits=splits,
        finalize=finalize,
        dot_precision=dot_precision,
        fresh=fresh is not None,
        qk_eps=qk_eps,
        prefetch_pages=config.prefetch_pages,
        new_token_last=config.new_token_last,
        interpret=interpret,
    )
    q_rows = group_pad if fresh is None else max(group_pad, pl.next_power_of_2(group + 2))
    out_spec = pl.BlockSpec((None, None, group_pad, head_pad), lambda h, b, s: (b, h, 0, 0))
    pool_spec = pl.BlockSpec((None, num_rows, head_pad), lambda h, b, s: (h, 0, 0))
    whole = lambda n: pl.BlockSpec((n,), lambda h, b, s: (0,))
    in_specs = [
        pl.BlockSpec((None, None, q_rows, head_pad), lambda h, b, s: (b, h, 0, 0)),
        pool_spec,
        pool_spec,
        pl.BlockSpec((None, max_pages), lambda h, b, s: (b, 0)),
        whole(batch),
    ]
    if fresh is not None:
        in_specs += [whole(batch), whole(batch)] + [whole(head_dim)] * (len(fresh) - 2)
    out_4d = (batch, num_kv_heads, group, head_dim)
    if finalize:
        out_shape = [jax.ShapeDtypeStruct(out_4d, q.dtype)]
        out_specs = [out_spec]
    else:
        part = (splits, batch, num_kv_heads, group)
        out_shape = [
            jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, group_pad, head_pad), lambda h, b, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda h, b, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda h, b, s: (s, b, h, 0)),
        ]
    aliases = {}
    if fresh is not None:  # the pools, updated in place
        aliases = {1: len(out_shape), 2: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k_rows.shape, k_rows.dtype)] * 2
        out_specs += [pool_spec, pool_spec]
    name = "paged_decode" if fresh is None else "rope_paged_decode"
    name += "_qk_norm" if qk_eps is not None else ""
    outs = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, batch, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages or DECODE_STAGES
        ),
        interpret=interpret,
        name=f"{name}_h{head_dim}_L{page_size}_bk{block_k}_s{splits}",
    )(q, k_rows, v_rows, block_tables, lengths, *(fresh or ()))
    pools = tuple(outs[-2:]) if fresh is not None else ()
    outs = outs[: len(outs) - len(pools)]
    out = outs[0] if finalize else _combine_call(*outs, q.dtype, interpret=interpret)
    return (out, *pools) if fresh is not None else out


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref, *, num_splits, head_dim):
    """Log-sum-exp combine of one (sequence, kv head, query head)'s splits: acc_ref [Sp, Hp],
    m_ref/l_ref [Sp] (m in log2 units; empty splits have m = MASK_VALUE, l = 0 and weigh 0)."""
    splits_pad, head_pad = acc_ref.shape
    s_ok = jnp.arange(splits_pad) < num_splits
    h_ok = jnp.arange(head_pad) < head_dim
    m = plgpu.load(m_ref, mask=s_ok, other=common.MASK_VALUE)
    l = plgpu.load(l_ref, mask=s_ok, other=0.0)
    acc = plgpu.load(acc_ref, mask=s_ok[:, None] & h_ok[None, :], other=0.0)
    w = jnp.exp2(m - jnp.max(m))  # [Sp]
    denom = jnp.sum(w * l)
    out = jnp.sum(w[:, None] * acc, axis=0) / jnp.where(denom == 0.0, 1.0, denom)
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=h_ok)


def _combine_call(acc, m, l, dtype, *, interpret):
    """acc [S, B, K, G, H], m/l [S, B, K, G] -> [B, K, G, H]: one launch (as jnp the combine was
    four kernels a layer, ~6 us at batch 1)."""
    splits, batch, num_kv_heads, group, head_dim = acc.shape
    splits_pad, head_pad = pl.next_power_of_2(splits), pl.next_power_of_2(head_dim)
    per_row = pl.BlockSpec((splits_pad, None, None, None), lambda b, h, g: (0, b, h, g))
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=splits, head_dim=head_dim),
        grid=(batch, num_kv_heads, group),
        in_specs=[
            pl.BlockSpec((splits_pad, None, None, None, head_pad), lambda b, h, g: (0, b, h, g, 0)),
            per_row,
            per_row,
        ],
        out_specs=pl.BlockSpec((None, None, None, head_pad), lambda b, h, g: (b, h, g, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, group, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"paged_decode_combine_s{splits}",
    )(acc, m, l)


# ----------------------------------------------------------------------------
# Decode kernel, balanced (stream-K): every program the same number of kv steps.
# ----------------------------------------------------------------------------
# Per kv head, the sequences' kv steps ("units", block_k tokens each) are laid end to end,
# sequence after sequence, and program p of that head takes units [p W / Q, (p + 1) W / Q)
# of the W there are. Every program of the launch then streams the same number of tiles and
# they all end together: no last wave half empty, whatever the batch. A sequence whose units
# fall in one program is finished there; one cut by a program boundary leaves a partial
# (acc, max, sum) in each program's slot (0: the program's first sequence, 1: its last), and
# a second launch merges those. On an H200 it was slower than the split form at every shape
# measured (NOTES.md): opt-in, not used by the engine.
def _stream_units(len_ref, b, block_k):
    """kv steps of sequence b; at least one, so an empty sequence still gets its zeros written."""
    return jnp.maximum(lax.div(len_ref[b] + block_k - 1, block_k), 1)


def _stream_range(total, prog, num_programs):
    """(programs in use, first unit of program `prog`): none is left without a unit."""
    used = jnp.minimum(num_programs, total)
    return used, lax.div(prog * total, used)


def _stream_seq_of(ends, unit):
    """The sequence that holds `unit`: ends [Bp] each sequence's last unit + 1 (padding: big)."""
    return jnp.sum((ends <= unit).astype(jnp.int32))


def _stream_decode_kernel(
    q_ref,
    k_ref,
    v_ref,
    bt_ref,
    len_ref,
    ends_ref,
    o_ref,
    acc_ref,
    m_ref,
    l_ref,
    *,
    batch,
    num_programs,
    qk_scale,
    group,
    head_dim,
    page_size,
    block_k,
    dot_precision,
    prefetch_pages,
):
    # one kv head: q_ref [B, Gp, Hp]; k_ref/v_ref [P*L, Hp]; bt_ref [B, max_pages]; len_ref [B];
    # ends_ref [Bp]; o_ref [B, Gp, Hp]; acc_ref [Q, 2, Gp, Hp], m_ref/l_ref [Q, 2, Gp]
    group_pad, head_pad = q_ref.shape[1:]
    prog = pl.program_id(1)
    ends = ends_ref[...]
    total = ends_ref[batch - 1]
    used, u0 = _stream_range(total, prog, num_programs)
    _, u1 = _stream_range(total, prog + 1, num_programs)
    b_first = _stream_seq_of(ends, u0)
    n_seqs = jnp.where(prog < used, _stream_seq_of(ends, u1 - 1) - b_first + 1, 0)
    cols = jnp.arange(head_pad, dtype=jnp.int32)
    head_mask = (cols < head_dim)[None, :] if head_pad != head_dim else None
    q_mask = (jnp.arange(group_pad) < group)[:, None]
    if head_mask is not None:
        q_mask = jnp.logical_and(q_mask, head_mask)
    loop = dict(
        step=functools.partial(online_softmax_step, qk_scale=qk_scale, dot_precision=dot_precision),
        prefetch_pages=prefetch_pages,
        block_k=block_k,
        page_size=page_size,
        cols=cols,
        head_mask=head_mask,
    )

    def sequence(i, _):
        b = b_first + i
        length = len_ref[b]
        units = _stream_units(len_ref, b, block_k)
        start = ends_ref[b] - units
        j0 = jnp.maximum(u0 - start, 0)
        j1 = jnp.minimum(u1 - start, units)
        t0 = j0 * block_k
        t1 = jnp.minimum(j1 * block_k, length)
        q = plgpu.load(q_ref.at[b], mask=q_mask, other=0.0)
        acc, m, l = _decode_range(q, bt_ref, b, k_ref, v_ref, t0, t1, **loop)
        whole = (j0 == 0) & (j1 == units)
        out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        plgpu.store(o_ref.at[b], out.astype(o_ref.dtype), mask=q_mask & whole)
        slot = jnp.minimum(i, 1)
        cut = jnp.logical_not(whole)
        plgpu.store(acc_ref.at[prog, slot], acc, mask=jnp.full(acc.shape, cut))
        plgpu.store(m_ref.at[prog, slot], m, mask=jnp.full(m.shape, cut))
        plgpu.store(l_ref.at[prog, slot], l, mask=jnp.full(l.shape, cut))
        return _

    lax.fori_loop(0, n_seqs, sequence, 0)


def _stream_combine_kernel(
    len_ref,
    ends_ref,
    acc_ref,
    m_ref,
    l_ref,
    o_in_ref,
    o_ref,
    *,
    batch,
    num_programs,
    block_k,
    group,
    head_dim,
):
    """Program p of a kv head merges the sequence cut at its first unit, if that is the first
    cut of the sequence (programs p - 1 .. the one holding its last unit hold its partials)."""
    del o_in_ref  # the same buffer as o_ref: the sequences finished in one program stay
    group_pad, head_pad = acc_ref.shape[2:]
    prog = pl.program_id(1)
    ends = ends_ref[...]
    total = ends_ref[batch - 1]
    used, u0 = _stream_range(total, prog, num_programs)
    _, u_prev = _stream_range(total, jnp.maximum(prog - 1, 0), num_programs)
    b = jnp.minimum(_stream_seq_of(ends, u0), batch - 1)
    end = ends_ref[b]
    start = end - _stream_units(len_ref, b, block_k)
    mine = (prog > 0) & (prog < used) & (start < u0) & (start >= u_prev)
    last = lax.div(end * used + total - 1, total) - 1  # the program holding unit end - 1
    first_slot = jnp.where(u_prev == start, 0, 1)

    def merge(i, carry):
        acc, m, l = carry
        p = prog - 1 + i
        slot = jnp.where(i == 0, first_slot, 0)
        m_p, l_p = m_ref[p, slot], l_ref[p, slot]
        m_new = jnp.maximum(m, m_p)
        a, a_p = jnp.exp2(m - m_new), jnp.exp2(m_p - m_new)
        return acc * a[:, None] + acc_ref[p, slot] * a_p[:, None], m_new, l * a + l_p * a_p

    n = jnp.where(mine, last - prog + 2, 0)
    acc, _, l = lax.fori_loop(0, n, merge, init_carry(group_pad, head_pad))
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    mask = (jnp.arange(group_pad) < group)[:, None] & (jnp.arange(head_pad) < head_dim)[None, :]
    plgpu.store(o_ref.at[b], out.astype(o_ref.dtype), mask=mask & mine)


def _stream_decode_call(
    q, k_rows, v_rows, block_tables, lengths, *, sm_scale, page_size, config, interpret, num_sms
):
    """q [B, K, G, H]; k_rows/v_rows [K, P*L, H] -> [B, K, G, H], the balanced form."""
    batch, num_kv_heads, group, head_dim = q.shape
    num_rows = k_rows.shape[1]
    head_pad = pl.next_power_of_2(head_dim)
    group_pad = max(16, pl.next_power_of_2(group))
    block_k = _decode_block_k(config, batch, num_kv_heads, num_sms)
    num_programs = pl.cdiv(num_sms * config.programs_per_sm, num_kv_heads)  # per kv head
    units = jnp.maximum(pl.cdiv(lengths, block_k), 1)
    batch_pad = pl.next_power_of_2(batch)
    ends = jnp.full((batch_pad,), jnp.iinfo(jnp.int32).max, jnp.int32)
    ends = ends.at[:batch].set(jnp.cumsum(units, dtype=jnp.int32))
    static = dict(batch=batch, num_programs=num_programs, group=group, head_dim=head_dim)

    head_block = pl.BlockSpec((batch, None, group_pad, head_pad), lambda h, p: (0, h, 0, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda h, p: (0,) * len(shape))
    parts = (num_kv_heads, num_programs, 2, group_pad)
    part_specs = [
        pl.BlockSpec((None, num_programs, 2, group_pad, head_pad), lambda h, p: (h, 0, 0, 0, 0)),
        pl.BlockSpec((None, num_programs, 2, group_pad), lambda h, p: (h, 0, 0, 0)),
        pl.BlockSpec((None, num_programs, 2, group_pad), lambda h, p: (h, 0, 0, 0)),
    ]
    params = plgpu.CompilerParams(
        num_warps=config.num_warps, num_stages=config.num_stages or DECODE_STAGES
    )
    name = f"h{head_dim}_L{page_size}_bk{block_k}_q{num_programs}"
    out, acc, m, l = pl.pallas_call(
        functools.partial(
            _stream_decode_kernel,
            qk_scale=sm_scale * LOG2_E,
            page_size=page_size,
            block_k=block_k,
            dot_precision=common.dot_precision(q.dtype),
            prefetch_pages=config.prefetch_pages,
            **static,
        ),
        grid=(num_kv_heads, num_programs),
        in_specs=[
            head_block,
            pl.BlockSpec((None, num_rows, head_pad), lambda h, p: (h, 0, 0)),
            pl.BlockSpec((None, num_rows, head_pad), lambda h, p: (h, 0, 0)),
            whole(block_tables.shape),
            whole((batch,)),
            whole((batch_pad,)),
        ],
        out_specs=[head_block, *part_specs],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((*parts, head_pad), jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name=f"paged_decode_stream_{name}",
    )(q, k_rows, v_rows, block_tables, lengths, ends)
    return pl.pallas_call(
        functools.partial(_stream_combine_kernel, block_k=block_k, **static),
        grid=(num_kv_heads, num_programs),
        in_specs=[whole((batch,)), whole((batch_pad,)), *part_specs, head_block],
        out_specs=head_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={5: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"paged_decode_stream_combine_{name}",
    )(lengths, ends, acc, m, l, out)


# ----------------------------------------------------------------------------
# Ragged kernel (packed queries of several lengths, causal within each).
# ----------------------------------------------------------------------------
def _ragged_kernel(
    work_seq_ref,
    work_q0_ref,
    q_ref,
    k_ref,
    v_ref,
    bt_ref,
    kv_len_ref,
    cu_ref,
    o_ref,
    *,
    qk_scale,
    group,
    group_pad,
    head_dim,
    page_size,
    block_k,
    block_tokens,
    dot_precision,
):
    # q_ref/o_ref [T, N, Hp]; k_ref/v_ref [P*L, Hp]; bt_ref [B, max_pages]
    head_pad = q_ref.shape[-1]
    kv_head = pl.program_id(0)
    w = pl.program_id(1)
    seq = work_seq_ref[w]
    live = seq >= 0
    seq = jnp.maximum(seq, 0)
    r0 = work_q0_ref[w]
    q_start, q_end = cu_ref[seq], cu_ref[seq + 1]
    kv_len = kv_len_ref[seq]

    rows = block_tokens * group_pad
    i = jnp.arange(rows, dtype=jnp.int32)
    tok = r0 + lax.div(i, group_pad)  # row of q in [T]
    g = lax.rem(i, group_pad)
    row_ok = (tok < q_end) & (g < group) & live
    cols = jnp.arange(head_pad, dtype=jnp.int32)
    head_mask = (cols < head_dim)[None, :] if head_pad != head_dim else None
    io_mask = row_ok[:, None]
    if head_mask is not None:
        io_mask = jnp.logical_and(io_mask, head_mask)
    io_idx = (tok[:, None], (kv_head * group + g)[:, None], cols[None, :])
    q = plgpu.load(q_ref.at[io_idx], mask=io_mask, other=0.0)

    # query row at kv position pos sees keys 0..pos
    offset = kv_len - (q_end - q_start) - q_start
    pos = tok + offset
    pos_first = r0 + offset
    pos_last = jnp.minimum(r0 + block_tokens, q_end) - 1 + offset
    n_full = jnp.where(live, lax.div(pos_first + 1, block_k), 0)
    n_steps = jnp.where(live, lax.div(pos_last + block_k, block_k), 0)

    tile = functools.partial(
        _kv_tile,
        bt_ref,
        seq,
        k_ref,
        v_ref,
        block_k=block_k,
        page_size=page_size,
        cols=cols,
        head_mask=head_mask,
    )
    step = functools.partial(online_softmax_step, qk_scale=qk_scale, dot_precision=dot_precision)

    def full_step(j, carry):
        k, v, _ = tile(j * block_k, valid=None)
        return step(q, k, lambda: v, carry, visible=None)

    def diag_step(j, carry):
        first = j * block_k
        kv_tok = first + jnp.arange(block_k, dtype=jnp.int32)
        k, v, _ = tile(first, valid=kv_tok < kv_len)
        visible = kv_tok[None, :] <= pos[:, None]
        return step(q, k, lambda: v, carry, visible=visible)

    carry = init_carry(rows, head_pad)
    carry = lax.fori_loop(0, n_full, full_step, carry)
    acc, _, l = lax.fori_loop(n_full, n_steps, diag_step, carry)
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    plgpu.store(o_ref.at[io_idx], out.astype(o_ref.dtype), mask=io_mask)


def _ragged_work_list(cu_q_lens, block_tokens, num_work, skip_single_token):
    """(sequence, first q row) of each q block; -1 marks unused programs."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks = (q_lens + block_tokens - 1) // block_tokens  # [B]
    if skip_single_token:  # those sequences get no program: the decode kernel serves them
        blocks = jnp.where(q_lens == 1, 0, blocks)
    ends = jnp.cumsum(blocks)
    w = jnp.arange(num_work, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, w, side="right", method="compare_all").astype(jnp.int32)
    live = seq < q_lens.shape[0]
    seq_c = jnp.minimum(seq, q_lens.shape[0] - 1)
    first_block = ends[seq_c] - blocks[seq_c]
    q0 = cu_q_lens[seq_c] + (w - first_block) * block_tokens
    return jnp.where(live, seq, -1), jnp.where(live, q0, 0).astype(jnp.int32)


def _ragged_call(
    q,
    k_rows,
    v_rows,
    block_tables,
    kv_lens,
    cu_q_lens,
    *,
    sm_scale,
    page_size,
    config: PagedConfig,
    interpret,
    skip_single_token=False,
):
    """q [T, N, H]; k_rows/v_rows [K, P*L, H] -> [T, N, H]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_rows, _ = k_rows.shape
    num_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    group_pad = pl.next_power_of_2(group)
    head_pad = pl.next_power_of_2(head_dim)
    block_tokens = max(1, config.block_rows // group_pad)
    num_work = num_tokens // block_tokens + num_seqs
    work_seq, work_q0 = _ragged_work_list(cu_q_lens, block_tokens, num_work, skip_single_token)
    dot_precision = common.dot_precision(q.dtype)

    kernel = functools.partial(
        _ragged_kernel,
        qk_scale=sm_scale * LOG2_E,
        group=group,
        group_pad=group_pad,
        head_dim=head_dim,
        page_size=page_size,
        block_k=config.block_k or RAGGED_BLOCK_K,
        block_tokens=block_tokens,
        dot_precision=dot_precision,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda h, w: (0,) * len(shape))
    q_spec = whole((num_tokens, num_heads, head_pad))
    kv_spec = pl.BlockSpec((None, num_rows, head_pad), lambda h, w: (h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_work),
        in_specs=[
            whole((num_work,)),
            whole((num_work,)),
            q_spec,
            kv_spec,
            kv_spec,
            whole(block_tables.shape),
            whole((num_seqs,)),
            whole((num_seqs + 1,)),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages or RAGGED_STAGES
        ),
        interpret=interpret,
        name=f"ragged_paged_h{head_dim}_L{page_size}",
    )(work_seq, work_q0, q, k_rows, v_rows, block_tables, kv_lens, cu_q_lens)
    # rows past cu_q_lens[-1] (bucket padding) belong to no sequence: zero them
    live_row = jnp.arange(num_tokens) < cu_q_lens[-1]
    return jnp.where(live_row[:, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------
def _check_pages(q, k_pages, v_pages, block_tables, num_q_rows, name):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages/v_pages must both be [K, P, L, H], got {k_pages.shape} and {v_pages.shape}"
        )
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k_pages.dtype == v_pages.dtype):
        raise ValueError(
            f"dtypes must match and be bf16/f16/f32: q {q.dtype}, "
            f"k {k_pages.dtype}, v {v_pages.dtype}"
        )
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    if q.shape[-1] != head_dim:
        raise ValueError(f"head dim of q {q.shape} and pages {k_pages.shape} differ")
    if not 16 <= head_dim <= 256 or head_dim % 8:
        raise ValueError(f"head dim {head_dim} must be a multiple of 8 in 16..256")
    if q.shape[-2] % num_kv_heads:
        raise ValueError(f"N={q.shape[-2]} not a multiple of K={num_kv_heads}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} must be a power of two")
    if block_tables.ndim != 2 or block_tables.shape[0] != num_q_rows:
        raise ValueError(f"block_tables must be [{name}, max_pages], got {block_tables.shape}")
    if block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")


def _check_vector(x, size, name):
    if x.shape != (size,) or x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32 [{size}], got {x.dtype}{x.shape}")


def _rows_view(pages):
    """[K, P, L, H] -> [K, P * L, H]: a free reshape of a contiguous pool."""
    k, p, l, h = pages.shape
    return pages.reshape(k, p * l, h)


def paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    *,
    sm_scale: float | None = None,
    config: PagedConfig | None = None,
    interpret: bool | None = None,
):
    """Decode attention of one new token per sequence over a paged cache.

    Args:
      q: [B, N, H] queries.
      k_pages, v_pages: [K, P, L, H] page pools.
      block_tables: int32 [B, max_pages] page ids of each sequence.
      lengths: int32 [B] cached tokens per sequence, 1..max_pages * L.
      sm_scale: logit scale, default 1/sqrt(H).
      config: tiles; default PagedConfig() (its split count sized to the
        default device's SMs).
      interpret: Pallas interpret mode (default: on CPU).

    Returns:
      [B, N, H] attention output, q's dtype.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H], got {q.shape}")
    _check_pages(q, k_pages, v_pages, block_tables, q.shape[0], "B")
    _check_vector(lengths, q.shape[0], "lengths")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return _paged_attention(
        q,
        k_pages,
        v_pages,
        block_tables,
        lengths,
        sm_scale=sm_scale,
        config=config or PagedConfig(),
        interpret=common.resolve_interpret(interpret),
        num_sms=common.num_sms(),
    )


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret", "num_sms"))
def _paged_attention(
    q, k_pages, v_pages, block_tables, lengths, *, sm_scale, config, interpret, num_sms
):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    q4 = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = (_stream_decode_call if config.stream else _decode_call)(
        q4,
        _rows_view(k_pages),
        _rows_view(v_pages),
        block_tables,
        lengths,
        sm_scale=sm_scale,
        page_size=page_size,
        config=config,
        interpret=interpret,
        num_sms=num_sms,
    )
    return out.reshape(q.shape)


def rope_paged_decode(
    qkv,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    positions,
    slots,
    inv_freq,
    qk_norm=None,
    *,
    sm_scale: float | None = None,
    config: PagedConfig | None = None,
    interpret: bool | None = None,
):
    """`paged_attention` from the q/k/v matmul's output as it is, RoPE and the K/V write in the
    same kernel: what `rope_write` then `paged_attention` compute, bit for bit, in one launch
    (with `config.new_token_last`, the pools bit for bit and the output within rounding; with
    `qk_norm`, within the rounding of the norm's float32 sum).

    Args:
      qkv: [B, K, G + 2, H] per kv head its G query heads, its k and its v, before RoPE: the
        new token of each sequence, the last of its `lengths`.
      k_pages, v_pages: [K, P, L, H] page pools, donated (updated in place).
      block_tables: int32 [B, max_pages].
      lengths: int32 [B] tokens per sequence with the new one, 1..max_pages * L.
      positions: int32 [B] the new tokens' positions (RoPE angles).
      slots: int32 [B] where the new K/V go (page * L + offset; negative: nowhere).
      inv_freq: [H / 2] RoPE inverse frequencies (float32).
      qk_norm: (q_scale [H], k_scale [H], eps): Qwen3's per-head RMS norms of q and k before
        RoPE, as `rope_write` takes them.
      sm_scale, config, interpret: as `paged_attention`.

    Returns:
      ([B, K * G, H] attention output, k_pages, v_pages).
    """
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [B, K, G + 2, H] with G >= 1, got {qkv.shape}")
    batch, num_kv_heads, rows, head_dim = qkv.shape
    _check_pages(qkv.reshape(batch, -1, head_dim), k_pages, v_pages, block_tables, batch, "B")
    if k_pages.shape[0] != num_kv_heads:
        raise ValueError(f"qkv has {num_kv_heads} kv heads, the pools {k_pages.shape[0]}")
    if not supported(head_dim, qkv.dtype):
        raise ValueError(f"head dim {head_dim} / dtype {qkv.dtype}: RoPE's kernel can't take it")
    for name, x in (("lengths", lengths), ("positions", positions), ("slots", slots)):
        _check_vector(x, batch, name)
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must be [{head_dim // 2}], got {inv_freq.shape}")
    scales, qk_eps = check_qk_norm(qk_norm, head_dim)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    return _rope_paged_decode(
        qkv,
        k_pages,
        v_pages,
        block_tables,
        lengths,
        positions,
        slots,
        jnp.asarray(inv_freq, jnp.float32),
        scales,
        sm_scale=sm_scale,
        config=config or PagedConfig(),
        interpret=common.resolve_interpret(interpret),
        num_sms=common.num_sms(),
        qk_eps=qk_eps,
    )


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "config", "interpret", "num_sms", "qk_eps"),
    donate_argnums=(1, 2),
)
def _rope_paged_decode(
    qkv, k_pages, v_pages, block_tables, lengths, positions, slots, inv_freq, scales, **static
):
    batch, num_kv_heads, rows, head_dim = qkv.shape
    freq = jnp.tile(inv_freq, 2)  # [H]: each column's angle, both halves of RoPE's pairs
    out, k_rows, v_rows = _decode_call(
        qkv,
        _rows_view(k_pages),
        _rows_view(v_pages),
        block_tables,
        lengths,
        page_size=k_pages.shape[2],
        fresh=(positions, slots, freq, *scales),
        **static,
    )
    out = out.reshape(batch, num_kv_heads * (rows - 2), head_dim)
    return out, k_rows.reshape(k_pages.shape), v_rows.reshape(v_pages.shape)


def ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    kv_lens,
    cu_q_lens,
    *,
    sm_scale: float | None = None,
    config: PagedConfig | None = None,
    interpret: bool | None = None,
    skip_single_token: bool = False,
):
    """Attention of packed new tokens of several sequences over a paged cache.

    Args:
      q: [T, N, H] new tokens, sequence b at rows cu_q_lens[b]:cu_q_lens[b+1].
      k_pages, v_pages: [K, P, L, H] page pools, new tokens already written.
      block_tables: int32 [B, max_pages].
      kv_lens: int32 [B] cached tokens per sequence (new ones included).
      cu_q_lens: int32 [B + 1]; each q_len_b >= 1 and <= kv_lens[b]. The new
        tokens are the LAST q_len_b of the kv_lens[b], causal among themselves.
      sm_scale: logit scale, default 1/sqrt(H).
      config, interpret: as in ``paged_attention``.
      skip_single_token: sequences with q_len 1 get no program and their rows
        are left unwritten (for callers that serve them with the decode
        kernel, which is much faster on one-token queries).

    Returns:
      [T, N, H]; rows past cu_q_lens[-1] are zero; with skip_single_token the
      rows of one-token sequences are undefined.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got {q.shape}")
    num_seqs = block_tables.shape[0] if block_tables.ndim == 2 else -1
    _check_pages(q, k_pages, v_pages, block_tables, num_seqs, "B")
    _check_vector(kv_lens, num_seqs, "kv_lens")
    _check_vector(cu_q_lens, num_seqs + 1, "cu_q_lens")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return _ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        block_tables,
        kv_lens,
        cu_q_lens,
        sm_scale=sm_scale,
        config=config or PagedConfig(),
        interpret=common.resolve_interpret(interpret),
        skip_single_token=skip_single_token,
    )


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "config", "interpret", "skip_single_token")
)
def _ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    kv_lens,
    cu_q_lens,
    *,
    sm_scale,
    config,
    interpret,
    skip_single_token,
):
    return _ragged_call(
        q,
        _rows_view(k_pages),
        _rows_view(v_pages),
        block_tables,
        kv_lens,
        cu_q_lens,
        sm_scale=sm_scale,
        page_size=k_pages.shape[2],
        config=config,
        interpret=interpret,
        skip_single_token=skip_single_token,
    )


def _bits_dtype(dtype):
    return {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]


@jax.jit
def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Writes new K/V rows into their cache slots.

    Args:
      k_pages, v_pages: [K, P, L, H] page pools (donate them at the caller's
        jit for an in-place update).
      k_new, v_new: [T, K, H] rows to write.
      slot_mapping: int32 [T], slot = page * L + offset; negative = skip.

    Returns:
      (k_pages, v_pages) updated.
    """
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"pages must both be [K, P, L, H], got {k_pages.shape} and {v_pages.shape}"
        )
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    if k_new.shape != v_new.shape or k_new.ndim != 3 or k_new.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k_new/v_new must be [T, {num_kv_heads}, {head_dim}], "
            f"got {k_new.shape} and {v_new.shape}"
        )
    _check_vector(slot_mapping, k_new.shape[0], "slot_mapping")
    num_rows = num_pages * page_size
    # negative slots go out of range and are dropped by the scatter
    slots = jnp.where(slot_mapping < 0, num_rows, slot_mapping)

    def scatter(pages, new):
        if pages.dtype == jnp.float32:  # in place as it is (the bit view below copies on a CPU)
            rows = (
                _rows_view(pages)
                .at[:, slots]
                .set(new.swapaxes(0, 1).astype(pages.dtype), mode="drop")
            )
            return rows.reshape(pages.shape)
        # Scatter the raw bits: XLA upcasts a 16-bit float scatter to f32, which
        # converts (copies) the whole pool every step; an integer scatter of the
        # same width stays in place (on a GPU; a CPU copies 16-bit pools either way).
        bits = _bits_dtype(pages.dtype)
        rows = lax.bitcast_convert_type(_rows_view(pages), bits)
        new = lax.bitcast_convert_type(new.swapaxes(0, 1).astype(pages.dtype), bits)
        rows = rows.at[:, slots].set(new, mode="drop")
        return lax.bitcast_convert_type(rows, pages.dtype).reshape(pages.shape)

    return scatter(k_pages, k_new), scatter(v_pages, v_new)


# ----------------------------------------------------------------------------
# References (plain jnp, f32).
# ----------------------------------------------------------------------------
def gather_contiguous(pages, block_tables):
    """The pages each sequence names, in order: [K, P, L, H] x [B, max_pages]
    -> a contiguous cache [B, max_pages * L, K, H]."""
    g = pages[:, block_tables]  # [K, B, max_pages, L, H]
    k, b, mp, l, h = g.shape
    return g.reshape(k, b, mp * l, h).transpose(1, 2, 0, 3)


def paged_attention_reference(
    q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float | None = None
):
    """Gathers the pages to [B, S, K, H] and runs the contiguous decode."""
    return contiguous_decode_reference(
        q,
        gather_contiguous(k_pages, block_tables),
        gather_contiguous(v_pages, block_tables),
        lengths,
        sm_scale=sm_scale,
    )


def contiguous_decode_reference(q, k, v, lengths, *, sm_scale: float | None = None):
    """Decode over a contiguous cache k/v [B, S, K, H] (the non-paged peer):
    q [B, N, H], keys s < lengths[b] visible -> [B, N, H]."""
    visible = jnp.arange(k.shape[1])[None, None, :] < lengths[:, None, None]
    out, _ = common.attention_reference(q[:, None], k, v, visible, sm_scale)
    return out[:, 0].astype(q.dtype)


def ragged_paged_attention_reference(
    q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens, *, sm_scale: float | None = None
):
    """Per-token masks over gathered pages; rows past cu_q_lens[-1] are 0."""
    num_tokens = q.shape[0]
    seq = (
        jnp.searchsorted(cu_q_lens, jnp.arange(num_tokens), side="right", method="compare_all") - 1
    )
    live = seq < block_tables.shape[0]
    seq = jnp.minimum(seq, block_tables.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (jnp.arange(num_tokens) - cu_q_lens[seq])
    k = gather_contiguous(k_pages, block_tables)[seq]  # [T, S, K, H]
    v = gather_contiguous(v_pages, block_tables)[seq]
    visible = jnp.arange(k.shape[1])[None, None, :] <= pos[:, None, None]
    out, _ = common.attention_reference(q[:, None], k, v, visible, sm_scale)
    return jnp.where(live[:, None, None], out[:, 0], 0).astype(q.dtype)


def write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Row-by-row writes in a Python loop (host side; for tests)."""
    import numpy as np

    kp, vp = np.array(k_pages), np.array(v_pages)
    page_size = kp.shape[2]
    for t, slot in enumerate(np.asarray(slot_mapping)):
        if slot < 0:
            continue
        kp[:, slot // page_size, slot % page_size] = np.asarray(k_new[t])
        vp[:, slot // page_size, slot % page_size] = np.asarray(v_new[t])
    return kp, vp
