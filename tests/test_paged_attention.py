"""Paged decode / ragged attention and write_kv against jnp references.

Interpret mode fills output buffers with NaN before the kernel runs, so the
finiteness check proves that every output element was written. Block tables
are random permutations of the page pool (never contiguous), and the pool's
unused pages hold NaN: a kernel that reads a page it should not, or a token
past a sequence's length, turns its output NaN.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import (
    PagedConfig,
    contiguous_decode_reference,
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    rope_paged_decode,
    write_kv,
    write_kv_reference,
)

from kernel_checks import assert_close


def make_cache(rng, lengths, num_kv_heads, head_dim, page_size, max_pages, dtype, spare_pages=3):
    """Pool with shuffled pages; slots past each length (and spare pages) NaN."""
    batch = len(lengths)
    num_pages = batch * max_pages + spare_pages
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
    valid = np.zeros((num_pages, page_size), bool)
    for b, n in enumerate(lengths):
        for t in range(n):
            valid[table[b, t // page_size], t % page_size] = True
    k[:, ~valid] = np.nan
    v[:, ~valid] = np.nan
    # entries of block tables past a sequence's pages are junk
    for b, n in enumerate(lengths):
        used = -(-n // page_size)
        table[b, used:] = rng.integers(-(2**20), 2**20, max_pages - used)
    return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table, jnp.int32))


def clean(x):
    """The references gather whole pages: zero the NaN padding for them."""
    return jnp.nan_to_num(x)


def clean_tables(table, num_pages):
    return jnp.where((table >= 0) & (table < num_pages), table, 0)


# (lengths, N, K, H, L, max_pages, dtype, config)
DECODE = [
    ((1,), 4, 4, 64, 16, 1, jnp.float32, None),
    ((3, 17, 1, 40), 8, 2, 80, 16, 4, jnp.bfloat16, None),
    ((256, 513, 100), 8, 1, 128, 64, 9, jnp.float32, None),
    ((1023, 5), 32, 8, 128, 128, 8, jnp.bfloat16, None),
    ((2048, 2000), 4, 1, 64, 64, 32, jnp.bfloat16, PagedConfig(num_splits=3)),
    ((700, 64, 129), 8, 8, 256, 16, 44, jnp.float32, PagedConfig(block_k=32, num_splits=1)),
    ((300, 33), 16, 2, 96, 128, 3, jnp.float16, PagedConfig(block_k=16)),
    # a table 10x wider than the longest sequence: each sequence splits its own
    # length (short ones leave splits empty)
    ((40, 5, 1, 97), 8, 2, 64, 16, 64, jnp.float32, PagedConfig(num_splits=8)),
]


@pytest.mark.parametrize("lengths,n,k,h,page,max_pages,dtype,config", DECODE)
def test_paged_decode(lengths, n, k, h, page, max_pages, dtype, config):
    rng = np.random.default_rng(sum(lengths) + h)
    kp, vp, table = make_cache(rng, lengths, k, h, page, max_pages, dtype)
    q = jnp.asarray(rng.standard_normal((len(lengths), n, h)), dtype)
    lens = jnp.asarray(lengths, jnp.int32)
    out = paged_attention(q, kp, vp, table, lens, config=config)
    ref = paged_attention_reference(q, clean(kp), clean(vp), clean_tables(table, kp.shape[1]), lens)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


def test_decode_block_k_follows_the_batch():
    """64-token steps once (sequence, kv head) pairs fill the SMs twice over, 32 below; the
    64-token kernel (picked here by a small SM count) matches the reference."""
    from pallas_kernels.paged_attention import _decode_block_k, _paged_attention

    auto = PagedConfig()
    assert _decode_block_k(auto, 100, 8, num_sms=132) == 64  # 800 pairs
    assert _decode_block_k(auto, 32, 8, num_sms=132) == 32  # 256 pairs
    assert _decode_block_k(auto, 1, 8, num_sms=132) == 32
    assert _decode_block_k(PagedConfig(block_k=16), 100, 8, num_sms=132) == 16
    rng = np.random.default_rng(3)
    lengths = (130, 64, 1, 77)
    kp, vp, table = make_cache(rng, lengths, 2, 64, 16, 10, jnp.float32)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    out = _paged_attention(
        q, kp, vp, table, lens, sm_scale=64**-0.5, config=auto, interpret=True, num_sms=4
    )
    ref = paged_attention_reference(q, clean(kp), clean(vp), clean_tables(table, kp.shape[1]), lens)
    assert_close(out, ref, jnp.float32)


# (lengths, N, K, H, L, max_pages, dtype, SMs, programs an SM): the balanced form cuts
# sequences wherever the programs' equal shares of kv steps end; few SMs make each program hold
# several sequences (slots 0 and 1 both used), many make one sequence span many programs.
STREAM_DECODE = [
    ((1,), 4, 4, 64, 16, 1, jnp.float32, 132, 2),
    ((3, 17, 1, 40), 8, 2, 80, 16, 4, jnp.bfloat16, 5, 1),
    ((256, 513, 100), 8, 1, 128, 64, 9, jnp.float32, 5, 2),
    ((1023, 5), 32, 8, 128, 128, 8, jnp.bfloat16, 132, 2),
    ((700, 64, 129, 31, 32, 33), 9, 3, 64, 16, 44, jnp.float32, 2, 3),
    ((300,) * 12, 8, 2, 64, 16, 19, jnp.bfloat16, 9, 1),
    ((40, 5, 1, 97), 8, 2, 64, 16, 64, jnp.float16, 1, 1),  # one program a kv head: no cut
]


@pytest.mark.parametrize("lengths,n,k,h,page,max_pages,dtype,sms,per_sm", STREAM_DECODE)
def test_balanced_decode(lengths, n, k, h, page, max_pages, dtype, sms, per_sm):
    """The stream-K form against the reference (interpret mode fills outputs with NaN: every
    sequence is written, by its own program or by the merge of its cut)."""
    from pallas_kernels.common import resolve_interpret
    from pallas_kernels.paged_attention import _paged_attention

    rng = np.random.default_rng(sum(lengths) + sms)
    kp, vp, table = make_cache(rng, lengths, k, h, page, max_pages, dtype)
    q = jnp.asarray(rng.standard_normal((len(lengths), n, h)), dtype)
    lens = jnp.asarray(lengths, jnp.int32)
    config = PagedConfig(stream=True, programs_per_sm=per_sm, block_k=16 if page == 16 else 32)
    static = dict(sm_scale=h**-0.5, config=config, interpret=resolve_interpret(None), num_sms=sms)
    out = _paged_attention(q, kp, vp, table, lens, **static)
    ref = paged_attention_reference(q, clean(kp), clean(vp), clean_tables(table, kp.shape[1]), lens)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "config",
    [
        PagedConfig(block_k=16, num_splits=3),
        PagedConfig(block_k=32, num_splits=1),
        PagedConfig(stream=True, block_k=16, programs_per_sm=1),
    ],
)
def test_prefetched_pages_change_no_output_bit(config):
    """Loading a step's block-table entries a step ahead only moves a load: outputs bitwise
    equal, sequences ending inside a step, on a step's edge and on the table's last page."""
    import dataclasses

    from pallas_kernels.paged_attention import _paged_attention

    lengths, max_pages = (17, 64, 1, 160, 33), 10
    rng = np.random.default_rng(5)
    kp, vp, table = make_cache(rng, lengths, 2, 64, 16, max_pages, jnp.float32)
    q = jnp.asarray(rng.standard_normal((len(lengths), 8, 64)), jnp.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    static = dict(sm_scale=0.125, interpret=True, num_sms=3)
    base = _paged_attention(q, kp, vp, table, lens, config=config, **static)
    ahead = dataclasses.replace(config, prefetch_pages=True)
    out = _paged_attention(q, kp, vp, table, lens, config=ahead, **static)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    assert np.isfinite(np.asarray(out)).all()


def test_paged_decode_equals_contiguous():
    rng = np.random.default_rng(7)
    lengths, page, max_pages = (37, 64), 16, 4
    kp, vp, table = make_cache(rng, lengths, 2, 64, page, max_pages, jnp.float32, spare_pages=0)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    tbl = clean_tables(table, kp.shape[1])
    k = clean(kp)[:, tbl].reshape(2, 2, max_pages * page, 64).transpose(1, 2, 0, 3)
    v = clean(vp)[:, tbl].reshape(2, 2, max_pages * page, 64).transpose(1, 2, 0, 3)
    out = paged_attention(q, kp, vp, table, lens)
    assert_close(out, contiguous_decode_reference(q, k, v, lens), jnp.float32)


# (lengths with the new token, N, K, H, L, max_pages, dtype, config): Llama-3's 32/8 at H 128,
# SmolLM2's 9/3 at H 64, splits (the new token in the last split's tail or full step), H 32.
ROPE_DECODE = [
    ((1023, 5, 64), 32, 8, 128, 16, 64, jnp.bfloat16, None),
    ((3, 17, 1, 40), 9, 3, 64, 16, 4, jnp.bfloat16, PagedConfig(num_splits=3)),
    ((256, 513, 100), 8, 2, 64, 64, 9, jnp.float16, PagedConfig(block_k=32)),
    ((64, 32, 65, 1), 8, 2, 32, 16, 5, jnp.float32, PagedConfig(block_k=16, num_splits=2)),
]


def _rope_decode_case(lengths, k, h, n, page, max_pages, dtype, seed):
    """Pools whose new-token slots hold NaN, the step's qkv, lengths, positions (angles well
    away from 0) and slots (the last row's -1: it writes nowhere), and every row's slot."""
    from jaxinfer.models.layers import rope_inv_freq

    rng = np.random.default_rng(seed)
    kp, vp, table = make_cache(rng, lengths, k, h, page, max_pages, dtype)
    tab = np.asarray(table)
    new_slot = [
        tab[b, (n_b - 1) // page] * page + (n_b - 1) % page for b, n_b in enumerate(lengths)
    ]
    rows = lambda pool: pool.reshape(k, -1, h)
    kp, vp = (rows(p).at[:, np.array(new_slot)].set(np.nan).reshape(p.shape) for p in (kp, vp))
    qkv = jnp.asarray(rng.standard_normal((len(lengths), k, n // k + 2, h)), dtype)
    lens = jnp.asarray(lengths, jnp.int32)
    step = dict(
        qkv=qkv,
        block_tables=table,
        lengths=lens,
        positions=lens - 1 + 1000,
        slots=jnp.asarray(new_slot[:-1] + [-1], jnp.int32),
        inv_freq=jnp.asarray(rope_inv_freq(h, 500000.0, None)),
    )
    return kp, vp, step, new_slot


def _rope_write(kp, vp, step, slots=None):
    from pallas_kernels.rope_write import rope_write

    slots = step["slots"] if slots is None else slots
    return rope_write(step["qkv"], kp.copy(), vp.copy(), step["positions"], slots, step["inv_freq"])


@pytest.mark.parametrize("lengths,n,k,h,page,max_pages,dtype,config", ROPE_DECODE)
def test_rope_paged_decode_is_rope_write_then_decode(
    lengths, n, k, h, page, max_pages, dtype, config
):
    """One kernel against the two it stands for: rope_write, then the decode kernel over the
    written pools (16-bit: bit for bit). The new token's slot holds NaN before the call, so
    reading it before the write lands would show; the last row writes nowhere (and reads the
    NaN, as the two kernels do)."""
    kp, vp, step, new_slot = _rope_decode_case(
        lengths, k, h, n, page, max_pages, dtype, sum(lengths) + h
    )
    out, k_new, v_new = rope_paged_decode(
        k_pages=kp.copy(), v_pages=vp.copy(), config=config, **step
    )
    q, k_want, v_want = _rope_write(kp, vp, step)
    want = paged_attention(q, k_want, v_want, step["block_tables"], step["lengths"], config=config)
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_array_equal(f32(k_new), f32(k_want))  # NaN where NaN
    np.testing.assert_array_equal(f32(v_new), f32(v_want))
    rows = f32(k_new).reshape(k, -1, h)
    assert not np.isnan(rows[:, np.array(new_slot[:-1])]).any()
    assert out.shape == q.shape and out.dtype == dtype
    tol = 0 if dtype != jnp.float32 else 1e-6  # f32: XLA may contract RoPE's ops differently
    np.testing.assert_allclose(f32(out), f32(want), rtol=tol, atol=tol)  # NaN where NaN
    assert np.isfinite(f32(out)[:-1]).all() and np.isnan(f32(out)[-1]).all()


@pytest.mark.parametrize("lengths,n,k,h,page,max_pages,dtype,config", ROPE_DECODE)
def test_rope_paged_decode_with_the_new_token_last(
    lengths, n, k, h, page, max_pages, dtype, config
):
    """`new_token_last`: the kv loop reads only the old tokens and the new one joins from
    registers after it. The pools are rope_write's bit for bit; the output is the float32
    reference's over the pools with every new row written (the row whose slot is -1 as well:
    its new token comes from registers, not from the pool), no further from it than the two
    kernels' output is."""
    config = dataclasses.replace(config or PagedConfig(), new_token_last=True)
    kp, vp, step, new_slot = _rope_decode_case(
        lengths, k, h, n, page, max_pages, dtype, sum(lengths) + h + 1
    )
    out, k_new, v_new = rope_paged_decode(
        k_pages=kp.copy(), v_pages=vp.copy(), config=config, **step
    )
    q, k_want, v_want = _rope_write(kp, vp, step)
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_array_equal(f32(k_new), f32(k_want))  # NaN where NaN
    np.testing.assert_array_equal(f32(v_new), f32(v_want))
    _, k_all, v_all = _rope_write(kp, vp, step, jnp.asarray(new_slot, jnp.int32))
    up = lambda x: jnp.asarray(x, jnp.float32)
    table, lens = step["block_tables"], step["lengths"]
    clean_table = clean_tables(table, kp.shape[1])
    ref = f32(
        paged_attention_reference(up(q), clean(up(k_all)), clean(up(v_all)), clean_table, lens)
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    two = f32(paged_attention(q, k_all, v_all, table, lens, config=config))
    err = lambda x: np.abs(f32(x) - ref).max()
    assert err(out) <= 2 * err(two) + 1e-6, (err(out), err(two))


@pytest.mark.parametrize("new_token_last", [False, True])
@pytest.mark.parametrize("case", [0, 1, 3])
def test_rope_paged_decode_with_qk_norm_is_rope_write_then_decode(case, new_token_last):
    """Qwen3's q/k norms in the fused kernel: the pools of `rope_write` with the same norms and
    its output within rounding of the two kernels' (the norm's float32 sum may add in another
    order); the norm really applies (scales far from 1 move the output)."""
    lengths, n, k, h, page, max_pages, dtype, config = ROPE_DECODE[case]
    config = dataclasses.replace(config or PagedConfig(), new_token_last=new_token_last)
    kp, vp, step, new_slot = _rope_decode_case(lengths, k, h, n, page, max_pages, dtype, 7 + case)
    rng = np.random.default_rng(case)
    scales = [jnp.asarray(1 + 0.5 * rng.standard_normal(h), dtype) for _ in range(2)]
    qk_norm = (*scales, 1e-6)
    out, k_new, v_new = rope_paged_decode(
        k_pages=kp.copy(), v_pages=vp.copy(), config=config, qk_norm=qk_norm, **step
    )
    from pallas_kernels.rope_write import rope_write

    all_slots = jnp.asarray(new_slot, jnp.int32)
    written = lambda slots: rope_write(
        step["qkv"], kp.copy(), vp.copy(), step["positions"], slots, step["inv_freq"], qk_norm
    )
    q, k_want, v_want = written(step["slots"])
    _, k_all, v_all = written(all_slots)
    f32 = lambda x: np.asarray(x, np.float32)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != jnp.float32 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f32(k_new), f32(k_want), **tol)  # NaN where NaN
    np.testing.assert_array_equal(f32(v_new), f32(v_want))
    table, lens = step["block_tables"], step["lengths"]
    want = paged_attention(q, k_all, v_all, table, lens)
    rows = slice(None) if new_token_last else slice(0, -1)  # the last row reads NaN otherwise
    np.testing.assert_allclose(f32(out)[rows], f32(want)[rows], **tol)
    plain = rope_paged_decode(k_pages=kp.copy(), v_pages=vp.copy(), config=config, **step)[0]
    assert np.abs(f32(plain)[rows] - f32(out)[rows]).max() > 0.1


def test_rope_paged_decode_bad_inputs_name_what_is_wrong():
    q, kp, vp, table, lens = _decode_args()  # K 2, H 64
    ints = jnp.zeros((2,), jnp.int32)
    good = dict(
        qkv=jnp.ones((2, 2, 6, 64), q.dtype),
        k_pages=kp,
        v_pages=vp,
        block_tables=table,
        lengths=lens,
        positions=ints,
        slots=ints,
        inv_freq=jnp.ones((32,), jnp.float32),
    )
    bad = [
        ("qkv", jnp.ones((2, 2, 2, 64)), r"qkv must be \[B, K, G \+ 2, H\]"),
        ("qkv", jnp.ones((2, 1, 6, 64)), "qkv has 1 kv heads, the pools 2"),
        ("positions", ints.astype(jnp.float32), "positions must be int32"),
        ("slots", jnp.zeros((3,), jnp.int32), r"slots must be int32 \[2\]"),
        ("inv_freq", jnp.ones((16,)), r"inv_freq must be \[32\]"),
        ("qk_norm", (jnp.ones(64), jnp.ones(32), 1e-6), r"qk_norm's k_scale must be \[64\]"),
    ]
    for name, value, message in bad:
        with pytest.raises(ValueError, match=message):
            rope_paged_decode(**{**good, name: value})


# (kv lens, q lens, N, K, H, L, max_pages, dtype, config, pad rows)
RAGGED = [
    ((1, 17, 40), (1, 3, 17), 8, 2, 64, 16, 3, jnp.float32, None, 0),
    ((513, 256, 9), (1, 256, 9), 8, 1, 128, 64, 9, jnp.bfloat16, None, 2),
    ((300, 5), (100, 1), 4, 4, 80, 128, 3, jnp.float32, PagedConfig(block_rows=16, block_k=32), 0),
    ((1023,), (30,), 32, 8, 256, 16, 64, jnp.bfloat16, PagedConfig(block_k=32), 1),
]


@pytest.mark.parametrize("kv_lens,q_lens,n,k,h,page,max_pages,dtype,config,pad", RAGGED)
def test_ragged(kv_lens, q_lens, n, k, h, page, max_pages, dtype, config, pad):
    rng = np.random.default_rng(sum(kv_lens) + sum(q_lens))
    kp, vp, table = make_cache(rng, kv_lens, k, h, page, max_pages, dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + pad, n, h)), dtype)
    lens = jnp.asarray(kv_lens, jnp.int32)
    out = ragged_paged_attention(q, kp, vp, table, lens, cu, config=config)
    ref = ragged_paged_attention_reference(
        q, clean(kp), clean(vp), clean_tables(table, kp.shape[1]), lens, cu
    )
    assert_close(out, ref, dtype)


def test_ragged_skip_single_token_serves_only_longer_queries():
    """One-token sequences get no program (their rows stay as poisoned, NaN);
    every other row equals the reference."""
    rng = np.random.default_rng(5)
    kv_lens, q_lens = (40, 9, 33, 1), (1, 9, 5, 1)
    kp, vp, table = make_cache(rng, kv_lens, 2, 64, 16, 3, jnp.float32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + 2, 8, 64)), jnp.float32)
    lens = jnp.asarray(kv_lens, jnp.int32)
    # interpret mode on every backend: it poisons outputs with NaN, and the check relies on it
    out = ragged_paged_attention(q, kp, vp, table, lens, cu, skip_single_token=True, interpret=True)
    out = np.asarray(out)
    ref = ragged_paged_attention_reference(
        q, clean(kp), clean(vp), clean_tables(table, kp.shape[1]), lens, cu
    )
    single = np.zeros(len(q), bool)
    single[[0, 15]] = True  # the rows of sequences 0 and 3
    assert np.isnan(out[single]).all()  # interpret mode poisons with NaN
    assert_close(out[~single], np.asarray(ref)[~single], jnp.float32)


def test_ragged_decode_rows_equal_paged_decode():
    rng = np.random.default_rng(11)
    lengths = (70, 3, 129)
    kp, vp, table = make_cache(rng, lengths, 2, 64, 16, 9, jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    cu = jnp.arange(4, dtype=jnp.int32)
    a = ragged_paged_attention(q, kp, vp, table, lens, cu)
    b = paged_attention(q, kp, vp, table, lens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv(dtype):
    rng = np.random.default_rng(3)
    kp = jnp.asarray(rng.standard_normal((2, 6, 16, 64)), dtype)
    vp = jnp.asarray(rng.standard_normal((2, 6, 16, 64)), dtype)
    k_new = jnp.asarray(rng.standard_normal((7, 2, 64)), dtype)
    v_new = jnp.asarray(rng.standard_normal((7, 2, 64)), dtype)
    slots = jnp.asarray([3, -1, 95, 17, 40, -7, 0], jnp.int32)
    k_out, v_out = write_kv(kp, vp, k_new, v_new, slots)
    k_ref, v_ref = write_kv_reference(kp, vp, k_new, v_new, slots)
    np.testing.assert_array_equal(np.asarray(k_out), k_ref)
    np.testing.assert_array_equal(np.asarray(v_out), v_ref)


def _decode_args(b=2, n=4, k=2, h=64, p=8, l=16, mp=3):
    return (
        jnp.ones((b, n, h)),
        jnp.ones((k, p, l, h)),
        jnp.ones((k, p, l, h)),
        jnp.zeros((b, mp), jnp.int32),
        jnp.ones((b,), jnp.int32),
    )


@pytest.mark.parametrize(
    "which,bad",
    [
        (0, jnp.ones((2, 4, 32))),  # head dim differs
        (0, jnp.ones((2, 3, 64))),  # N % K != 0
        (0, jnp.ones((4, 64))),  # rank
        (1, jnp.ones((2, 8, 16, 64, 1))),  # pages rank
        (2, jnp.ones((2, 8, 32, 64))),  # k/v pages differ
        (1, jnp.ones((2, 8, 12, 64))),  # page size not 2^k
        (3, jnp.zeros((3, 3), jnp.int32)),  # block table batch
        (3, jnp.zeros((2, 3), jnp.float32)),  # block table dtype
        (4, jnp.ones((3,), jnp.int32)),  # lengths batch
    ],
)
def test_paged_bad_shapes_raise(which, bad):
    args = list(_decode_args())
    if which == 1:
        args[2] = bad
    args[which] = bad
    with pytest.raises(ValueError):
        paged_attention(*args)


def test_ragged_and_write_bad_shapes_raise():
    q, kp, vp, table, _ = _decode_args()
    with pytest.raises(ValueError):  # cu_q_lens size
        ragged_paged_attention(
            q, kp, vp, table, jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
        )
    with pytest.raises(ValueError):  # kv_lens size
        ragged_paged_attention(
            q, kp, vp, table, jnp.ones((3,), jnp.int32), jnp.zeros((3,), jnp.int32)
        )
    with pytest.raises(ValueError):  # k_new shape
        write_kv(kp, vp, jnp.ones((3, 2, 32)), jnp.ones((3, 2, 32)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError):  # slot_mapping size
        write_kv(kp, vp, jnp.ones((3, 2, 64)), jnp.ones((3, 2, 64)), jnp.zeros((4,), jnp.int32))


def test_config_validates():
    with pytest.raises(ValueError):
        PagedConfig(block_k=48)
    with pytest.raises(ValueError):
        PagedConfig(num_splits=0)
    with pytest.raises(ValueError, match="programs_per_sm"):
        PagedConfig(stream=True, programs_per_sm=0)
