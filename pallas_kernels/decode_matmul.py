"""A decode batch's matmul on Hopper: x [M <= 128, K] times a weight, through Pallas's Mosaic GPU
backend, with K split over CTAs so that a few output tiles still fill the GPU.

At 100-128 rows a weight byte carries 128 multiply-adds: streaming the weight at the HBM's read
bandwidth also keeps the tensor cores ~70% busy, and cuBLAS's tiles for Llama-3-8B's q/k/v, o
and down projections reached only 0.48-0.70 of that bandwidth on an H200 (bench/README.md). This
kernel streams the weight through a ring of TMA copies that one memory warpgroup keeps full,
while two compute warpgroups (64 rows of x each) run wgmma on each slot:

  grid (splits, N // tile_n): CTA (s, j) owns output columns [j * tile_n, +tile_n) and the s-th
  of `splits` equal ranges of K; it writes bf16 out when splits == 1, else float32 partials
  [splits, M, N] that the wrapper sums (one small XLA kernel). The output leaves in 64-column
  chunks through one or two small shared-memory slots, so wide tiles leave room for a deep ring.
  `cluster` CTAs of neighbouring columns load each x tile once, multicast to all of them: every
  CTA needs the same x, and with narrow tiles x's bytes would outnumber the weight's.

The weight comes either as [K, N] (a wgmma B operand as is) or as [N, K], as HF stores a linear
layer (B read through a transposed view of the shared-memory tile): both are layouts of
jaxinfer's decoders (`jaxinfer.models.layers.dense`). x is padded to 128 rows.

Measured on an H200 at 128 rows over Llama-3-8B's weights, its best configs run at cuBLAS's
speed, not faster (NOTES.md), so the engine keeps cuBLAS for plain matmuls. `decode_swiglu` is
the fused form it runs: gate/up with SiLU x up in the epilogue, for decode steps of 65-128
tokens (`jaxinfer.models.layers.MLP`).

`decode_matmul_chain` is one persistent form: L dependent matmuls in one kernel, the CTAs
meeting at a grid barrier between layers. Over [8192, 8192] weights on an H200 it ran at the
speed of the same tiles as L kernels: a dependency costs cuBLAS ~7 us a matmul, but with the
64-column tiles that fill one wave there this kernel streams below cuBLAS's rate even with
none, so there was nothing to win (NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    SM90_SMEM_LIMIT,
    mosaic_gpu_interpreter,
    num_sms,
    resolve_interpret,
)

ROWS = 128  # x's rows in the kernel: two compute warpgroups of 64
SMEM_LIMIT = SM90_SMEM_LIMIT
SMEM_OVERHEAD = 2048  # barriers and alignment beyond the buffers


def _plgpu():
    # Imported on use: the Mosaic GPU module pulls in CUDA-only pieces that a
    # CPU-only install may lack.
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


@dataclasses.dataclass(frozen=True)
class DecodeMatmulConfig:
    """Tiles: output columns per CTA, K per pipeline step, ring slots, the K splits, and the
    CTAs of a cluster (neighbouring columns) that share each x tile."""

    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    splits: int = 1
    cluster: int = 1
    # Programmatic dependent launch: let the next kernel launch at once, and load the first
    # weight tiles before waiting for the kernel before (x may be its output; W is not).
    pdl: bool = False

    def __post_init__(self):
        for name in ("tile_n", "tile_k"):
            value = getattr(self, name)
            if value <= 0 or value % 64 or value > 256:
                raise ValueError(f"{name}={value} must be a multiple of 64 up to 256")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")
        if self.splits < 1:
            raise ValueError(f"splits={self.splits} must be >= 1")
        if self.cluster not in (1, 2, 4):
            raise ValueError(f"cluster={self.cluster} must be 1, 2 or 4")


EPI_N = 64  # output columns a warpgroup stores at a time


def out_slots(cfg: DecodeMatmulConfig) -> int:
    """Output chunks a warpgroup keeps in flight: two in turn, one when a single chunk is all."""
    return min(2, cfg.tile_n // EPI_N)


def smem_bytes(cfg: DecodeMatmulConfig, parts: int = 1) -> int:
    """The ring (x and `parts` weight tiles a slot, bf16) and the output chunks (bf16 or f32)."""
    ring = cfg.stages * (ROWS + parts * cfg.tile_n) * cfg.tile_k * 2
    out = 2 * out_slots(cfg) * 64 * EPI_N * (2 if cfg.splits == 1 else 4)
    return ring + out + SMEM_OVERHEAD


def why_not(m: int, k: int, n: int, dtype, cfg: DecodeMatmulConfig, parts: int = 1) -> str | None:
    """Why the kernel can't take these shapes with this config (None when it can); `parts`
    weight tiles a ring slot (2: `decode_swiglu`'s gate and up)."""
    if dtype != jnp.bfloat16:
        return f"dtype {dtype} (bf16 only)"
    if m > ROWS:
        return f"{m} rows (at most {ROWS})"
    if n % (cfg.tile_n * cfg.cluster):
        return f"N={n} is not a multiple of tile_n * cluster = {cfg.tile_n * cfg.cluster}"
    if k % (cfg.tile_k * cfg.splits):
        return f"K={k} is not a multiple of tile_k * splits = {cfg.tile_k * cfg.splits}"
    if smem_bytes(cfg, parts) > SMEM_LIMIT:
        need = smem_bytes(cfg, parts)
        return f"{cfg} needs {need} bytes of shared memory (limit {SMEM_LIMIT})"
    return None


def decode_matmul_reference(x, w, *, w_nk: bool):
    """x [M, K] @ w ([K, N], or [N, K] when w_nk), float32 accumulation, x's dtype out."""
    dims = (((1,), (1,)), ((), ())) if w_nk else (((1,), (0,)), ((), ()))
    y = lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def decode_swiglu_reference(x, w_gate_up):
    """silu(x @ gate) * (x @ up) for w_gate_up [K, 2, F]: float32 accumulation, each product
    rounded to x's dtype, silu and the product in float32, x's dtype out."""
    gu = jnp.einsum("MK,KCF->CMF", x, w_gate_up, preferred_element_type=jnp.float32)
    gate, up = gu.astype(x.dtype).astype(jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _tiled(dtype):
    """128-byte swizzled (8, 128 bytes) tiles: what wgmma and TMA read."""
    plgpu = _plgpu()
    elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


def _weight_view(w_smem, slot, w_nk: bool):
    """The wgmma B operand of a ring slot, [tile_k, tile_n]."""
    if w_nk:  # transpose_ref: what ran on the GPU (as in flash_attention_mgpu)
        return _plgpu().transpose_ref(w_smem.at[slot], (1, 0))
    return w_smem.at[slot]


def _mma_steps(ring, barriers, *, rows, first, k_steps, cfg, w_nk, parts=1):
    """wgmma over the ring's steps [first, first + k_steps) for 64 rows of x, releasing each
    slot once its wgmmas are done; returns `parts` [64, tile_n] float32 products, one per
    weight tile of a slot (slot s holds tiles s * parts + p of w_smem).

    `first` counts steps across the whole kernel (a chain's layers follow each other in the
    ring, each from step l * k_steps), so every slot's barriers are waited on in order.
    """
    plgpu = _plgpu()
    x_smem, w_smem = ring
    x_loaded, w_loaded, consumed = barriers

    def run(*acc_refs):
        def step(i, _):
            stages = jnp.int32(cfg.stages)
            slot = lax.rem(first + i, stages)
            plgpu.barrier_wait(x_loaded.at[slot])
            for p, acc_ref in enumerate(acc_refs):
                plgpu.barrier_wait(w_loaded.at[slot * parts + p])
                w_view = _weight_view(w_smem, slot * parts + p, w_nk)
                plgpu.wgmma(acc_ref, x_smem.at[slot].at[rows], w_view)
            plgpu.wgmma_wait(parts)  # the previous step's wgmmas are done: free its slot

            @pl.when(i > 0)
            def _():
                plgpu.barrier_arrive(consumed.at[lax.rem(first + i + stages - 1, stages)])

        lax.fori_loop(0, k_steps, step, None)
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[(first + k_steps - 1) % cfg.stages])
        return tuple(acc_ref[...] for acc_ref in acc_refs)

    acc = plgpu.ACC((64, cfg.tile_n), jnp.float32)
    return pl.run_scoped(run, *([acc] * parts))


def _store_tile(acc, out_smem, wg, dst, col, cfg):
    """acc [64, tile_n] f32 -> dst[:, col:col + tile_n] (GMEM), 64 columns at a time through
    the warpgroup's output slots in turn; returns once the copies have left shared memory."""
    plgpu = _plgpu()
    for c in range(cfg.tile_n // EPI_N):
        slot = out_smem.at[wg, c % out_slots(cfg)]
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the slot's last store has read it
        slot[...] = acc[:, c * EPI_N : (c + 1) * EPI_N].astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(slot, dst.at[:, pl.ds(col + c * EPI_N, EPI_N)])


def _silu_times(gate, up):
    """SwiGLU's silu(gate) * up over float32 products, each rounded to bf16 first as the
    unfused form stores them."""
    gate = gate.astype(jnp.bfloat16).astype(jnp.float32)
    up = up.astype(jnp.bfloat16).astype(jnp.float32)
    return gate / (1.0 + jnp.exp(-gate)) * up


def _kernel(x_ref, w_ref, out_ref, scoped, *, cfg, w_nk, k_steps, swiglu=False):
    """One CTA: columns [j * tile_n, +tile_n), K steps [s * k_steps, +k_steps).

    x_ref [128, K] bf16; w_ref [K, N] or [N, K] bf16; out_ref [128, N] bf16 or
    [splits, 128, N] f32 (GMEM). With `swiglu`, w_ref is [K, 2 * N] (gate then up) and each
    slot holds the tile's gate and up columns; the CTA stores silu(gate) * up.
    """
    plgpu = _plgpu()
    tn, tk, stages = cfg.tile_n, cfg.tile_k, cfg.stages
    parts = 2 if swiglu else 1
    (x_smem, w_smem, out_smem), (x_loaded, w_loaded), consumed = scoped
    tile = lax.axis_index("n")
    if cfg.cluster > 1:
        tile = tile * cfg.cluster + lax.axis_index("cluster")
    col = tile * tn
    split = lax.axis_index("k")
    wg = lax.axis_index("wg")

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(wg * 64, 64)
        accs = _mma_steps(
            (x_smem, w_smem),
            (x_loaded, w_loaded, consumed),
            rows=rows,
            first=0,
            k_steps=k_steps,
            cfg=cfg,
            w_nk=w_nk,
            parts=parts,
        )
        acc = _silu_times(*accs) if swiglu else accs[0]
        dst = out_ref.at[rows] if cfg.splits == 1 else out_ref.at[split, rows]
        _store_tile(acc, out_smem, wg, dst, col, cfg)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        first = split * k_steps
        width = w_ref.shape[1] // 2  # swiglu: where up's columns start

        def load_x(i, slot):
            plgpu.copy_gmem_to_smem(
                x_ref.at[:, pl.ds((first + i) * tk, tk)],
                x_smem.at[slot],
                x_loaded.at[slot],
                collective_axes="cluster" if cfg.cluster > 1 else None,  # multicast
            )

        def load_w(i, slot):
            k0 = (first + i) * tk
            for p in range(parts):
                if w_nk:
                    src = w_ref.at[pl.ds(col, tn), pl.ds(k0, tk)]
                else:
                    src = w_ref.at[pl.ds(k0, tk), pl.ds(p * width + col, tn)]
                dst = slot * parts + p
                plgpu.copy_gmem_to_smem(src, w_smem.at[dst], w_loaded.at[dst])

        def load(i, slot):
            load_x(i, slot)
            load_w(i, slot)

        if cfg.pdl:
            plgpu.griddepcontrol_launch_dependents()
            for i in range(min(stages, k_steps)):
                load_w(i, i)
            plgpu.griddepcontrol_wait()  # x (and this kernel's output) may be the kernel before's
            for i in range(min(stages, k_steps)):
                load_x(i, i)
        else:
            for i in range(min(stages, k_steps)):
                load(i, i)

        if k_steps > stages:

            @pl.loop(0, k_steps - stages)
            def _(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(consumed.at[slot])
                load(i + stages, slot)

        # Every step's release has arrived before this CTA may exit: in a cluster the other
        # CTAs' warpgroups arrive on this CTA's barriers, and an arrival on a CTA that has
        # exited is a fault.
        for i in range(max(0, k_steps - stages), k_steps):
            plgpu.barrier_wait(consumed.at[i % stages])


def decode_matmul(
    x, w, *, w_nk: bool, config: DecodeMatmulConfig | None = None, interpret: bool | None = None
):
    """x [M, K] @ w ([K, N], or [N, K] when w_nk) -> [M, N] bf16, M <= 128. Hopper GPUs, or
    JAX's Mosaic GPU interpreter on the CPU (`interpret`; None: on the CPU), which runs the
    same kernel for W [K, N] without clusters or `pdl`."""
    cfg = config or DecodeMatmulConfig()
    m, k = x.shape
    n = w.shape[0] if w_nk else w.shape[1]
    if (w.shape[1] if w_nk else w.shape[0]) != k:
        raise ValueError(f"x {x.shape} and w {w.shape} (w_nk={w_nk}) disagree on K")
    if reason := why_not(m, k, n, x.dtype, cfg):
        raise ValueError(f"decode_matmul can't take this call: {reason}")
    interpret = _interpret_or_refuse("decode_matmul", interpret, w_nk, cfg)
    return _decode_matmul(x, w, w_nk=w_nk, config=cfg, interpret=interpret)


def decode_swiglu(
    x, w_gate_up, *, config: DecodeMatmulConfig | None = None, interpret: bool | None = None
):
    """silu(x @ gate) * (x @ up) -> [M, F] bf16 for x [M, K] and w_gate_up [K, 2, F] (gate,
    then up: `jaxinfer.models.layers.MLP`'s weight), M <= 128, in one kernel: each CTA streams
    tile_n columns of gate and the same columns of up, and stores their SwiGLU, so the [M, 2F]
    product never leaves the SMs. gate and up are rounded to bf16 before silu, as the unfused
    form stores them. K is not split (the product is not linear in the partials)."""
    cfg = config or DecodeMatmulConfig()
    m, k = x.shape
    if w_gate_up.ndim != 3 or w_gate_up.shape[:2] != (k, 2):
        raise ValueError(f"w_gate_up {w_gate_up.shape} must be [K, 2, F] with K = {k}, x's columns")
    if cfg.splits != 1:
        raise ValueError(f"decode_swiglu can't split K: {cfg}")
    n = w_gate_up.shape[2]
    if reason := why_not(m, k, n, x.dtype, cfg, parts=2):
        raise ValueError(f"decode_swiglu can't take this call: {reason}")
    interpret = _interpret_or_refuse("decode_swiglu", interpret, False, cfg)
    w = w_gate_up.reshape(k, 2 * n)  # gate's columns, then up's
    return _decode_matmul(x, w, w_nk=False, config=cfg, interpret=interpret, swiglu=True)


def _interpret_or_refuse(name: str, interpret: bool | None, w_nk: bool, cfg) -> bool:
    """Whether to run in JAX's Mosaic GPU interpreter; refuses what it can't simulate."""
    if not resolve_interpret(interpret):
        return False
    lacks = [
        what for what, on in (("w_nk", w_nk), ("cluster", cfg.cluster > 1), ("pdl", cfg.pdl)) if on
    ]
    if lacks or mosaic_gpu_interpreter() is None:
        raise ValueError(f"the Mosaic GPU interpreter can't run {name} with {lacks or 'this jax'}")
    return True


def _scratch(cfg: DecodeMatmulConfig, x_dtype, w_dtype, out_dtype, parts: int, w_nk: bool):
    """What `_kernel`'s CTA allocates, for `pl.run_scoped`: shared memory (the ring's x and
    weight tiles, the output chunks), the loaded barriers (x, weight) and the consumed one."""
    plgpu = _plgpu()
    w_tile = (cfg.tile_n, cfg.tile_k) if w_nk else (cfg.tile_k, cfg.tile_n)
    smem = (
        plgpu.SMEM((cfg.stages, ROWS, cfg.tile_k), x_dtype, transforms=_tiled(x_dtype)),
        plgpu.SMEM((cfg.stages * parts, *w_tile), w_dtype, transforms=_tiled(w_dtype)),
        plgpu.SMEM((2, out_slots(cfg), 64, EPI_N), out_dtype, transforms=_tiled(out_dtype)),
    )
    if cfg.cluster > 1:  # a slot is free once every CTA sharing its x tile is done with it
        consumed = plgpu.ClusterBarrier(
            collective_axes=("cluster",), num_arrivals=2, num_barriers=cfg.stages
        )
    else:  # once both compute warpgroups are
        consumed = plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages)
    loaded = (
        plgpu.Barrier(num_barriers=cfg.stages),
        plgpu.Barrier(num_barriers=cfg.stages * parts),
    )
    return smem, loaded, consumed


@functools.partial(jax.jit, static_argnames=("w_nk", "config", "interpret", "swiglu"))
def _decode_matmul(
    x, w, *, w_nk: bool, config: DecodeMatmulConfig, interpret: bool, swiglu: bool = False
):
    """decode_matmul and decode_swiglu (w [K, 2N]: gate then up), their calls checked."""
    plgpu = _plgpu()
    cfg = config
    parts = 2 if swiglu else 1
    m, k = x.shape
    n = w.shape[0] if w_nk else w.shape[1] // parts
    xp = jnp.pad(x, ((0, ROWS - m), (0, 0))) if m < ROWS else x
    k_steps = k // (cfg.tile_k * cfg.splits)
    out_dtype = jnp.bfloat16 if cfg.splits == 1 else jnp.float32
    out_shape = (ROWS, n) if cfg.splits == 1 else (cfg.splits, ROWS, n)
    kernel = functools.partial(_kernel, cfg=cfg, w_nk=w_nk, k_steps=k_steps, swiglu=swiglu)

    def entry(x_ref, w_ref, out_ref):
        pl.run_scoped(
            lambda *scoped: kernel(x_ref, w_ref, out_ref, scoped),
            *_scratch(cfg, x.dtype, w.dtype, out_dtype, parts, w_nk),
            collective_axes="wg",
        )

    # The cluster multiplies the last grid axis: clusters of neighbouring column tiles.
    clusters = {"cluster": (cfg.cluster,), "cluster_names": ("cluster",)} if cfg.cluster > 1 else {}
    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(cfg.splits, n // (cfg.tile_n * cfg.cluster)),
        grid_names=("k", "n"),
        num_threads=3,
        thread_name="wg",
        interpret=mosaic_gpu_interpreter() if interpret else False,
        **clusters,
    )(xp, w)
    if cfg.splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:m]


def _chain_kernel(x_ref, ws_ref, buf_ref, scoped, *, cfg, layers, k_steps, num_ctas):
    """One CTA of the persistent chain: columns [j * tile_n, +tile_n) of every layer.

    x_ref [128, K] bf16 (layer 0's input); ws_ref [L, K, K] bf16; buf_ref [2, 128, K] bf16
    (GMEM): layer l reads buf[l % 2] (x for l = 0) and writes buf[(l + 1) % 2].
    """
    plgpu = _plgpu()
    tn, tk, stages = cfg.tile_n, cfg.tile_k, cfg.stages
    (x_smem, w_smem, out_smem), (x_loaded, w_loaded), consumed = scoped
    col = lax.axis_index("n") * tn
    wg = lax.axis_index("wg")
    done = pl.get_global(plgpu.SemaphoreType.REGULAR)  # layers' tiles stored, all CTAs

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(wg * 64, 64)
        for layer in range(layers):
            (acc,) = _mma_steps(
                (x_smem, w_smem),
                (x_loaded, w_loaded, consumed),
                rows=rows,
                first=layer * k_steps,
                k_steps=k_steps,
                cfg=cfg,
                w_nk=False,
            )
            _store_tile(acc, out_smem, wg, buf_ref.at[(layer + 1) % 2, rows], col, cfg)
            plgpu.wait_smem_to_gmem(0, wait_read_only=False)  # in GMEM, not just read
            if layer + 1 < layers:
                pl.semaphore_signal(done)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def load_x(layer, i, slot):
            src = x_ref if layer == 0 else buf_ref.at[layer % 2]
            plgpu.copy_gmem_to_smem(
                src.at[:, pl.ds(i * tk, tk)], x_smem.at[slot], x_loaded.at[slot]
            )

        def load_w(layer, i, slot):
            src = ws_ref.at[layer, pl.ds(i * tk, tk), pl.ds(col, tn)]
            plgpu.copy_gmem_to_smem(src, w_smem.at[slot], w_loaded.at[slot])

        for layer in range(layers):
            first = layer * k_steps
            ahead = min(stages, k_steps)
            for i in range(ahead):  # the weights first: they do not wait for the layer before
                if first + i >= stages:
                    plgpu.barrier_wait(consumed.at[(first + i) % stages])
                load_w(layer, i, (first + i) % stages)
            if layer > 0:  # every CTA's two warpgroups have stored the layer before
                pl.semaphore_wait(done, 2 * num_ctas * layer, decrement=False)
            for i in range(ahead):
                load_x(layer, i, (first + i) % stages)
            if k_steps > ahead:

                @pl.loop(ahead, k_steps)
                def _(i, layer=layer, first=first):
                    slot = lax.rem(first + i, jnp.int32(stages))
                    plgpu.barrier_wait(consumed.at[slot])
                    load_x(layer, i, slot)
                    load_w(layer, i, slot)

        total = layers * k_steps
        for g in range(max(0, total - stages), total):  # all released before the CTA exits
            plgpu.barrier_wait(consumed.at[g % stages])


def decode_matmul_chain(x, ws, *, config: DecodeMatmulConfig | None = None):
    """x [M, K] @ ws[0] @ ws[1] ... (ws [L, K, K] bf16, each product rounded to bf16) as one
    persistent kernel, M <= 128. Hopper GPUs only.

    An experiment on what a decode layer in one kernel could gain: the CTAs of one wave stay
    resident across the L matmuls, each CTA loads its first weight tiles of a layer before it
    waits (on a global semaphore) for every CTA to have stored the layer before, so the
    kernel boundaries' ramp-up and tail overlap. Every CTA must be resident at once (a grid
    barrier): N // tile_n CTAs, at most the GPU's SM count.
    """
    cfg = config or DecodeMatmulConfig()
    m, k = x.shape
    if ws.shape[1:] != (k, k):
        raise ValueError(f"ws {ws.shape} must be [L, K, K] with K = {k}, x's columns")
    if cfg.splits != 1 or cfg.cluster != 1 or cfg.pdl:
        raise ValueError(f"the chain takes neither splits, clusters nor pdl: {cfg}")
    if reason := why_not(m, k, k, x.dtype, cfg):
        raise ValueError(f"decode_matmul_chain can't take this call: {reason}")
    num_ctas = k // cfg.tile_n
    if num_ctas > num_sms():
        raise ValueError(
            f"{num_ctas} CTAs can't all be resident on {num_sms()} SMs (a grid barrier)"
        )
    return _decode_matmul_chain(x, ws, config=cfg)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode_matmul_chain(x, ws, *, config: DecodeMatmulConfig):
    """decode_matmul_chain, its call checked."""
    plgpu = _plgpu()
    cfg = config
    m, k = x.shape
    layers = ws.shape[0]
    num_ctas = k // cfg.tile_n
    xp = jnp.pad(x, ((0, ROWS - m), (0, 0))) if m < ROWS else x
    kernel = functools.partial(
        _chain_kernel, cfg=cfg, layers=layers, k_steps=k // cfg.tile_k, num_ctas=num_ctas
    )

    def entry(x_ref, ws_ref, buf_ref):
        bf16 = jnp.bfloat16
        smem = (
            plgpu.SMEM((cfg.stages, ROWS, cfg.tile_k), bf16, transforms=_tiled(bf16)),
            plgpu.SMEM((cfg.stages, cfg.tile_k, cfg.tile_n), bf16, transforms=_tiled(bf16)),
            plgpu.SMEM((2, out_slots(cfg), 64, EPI_N), bf16, transforms=_tiled(bf16)),
        )
        pl.run_scoped(
            lambda *scoped: kernel(x_ref, ws_ref, buf_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=cfg.stages), plgpu.Barrier(num_barriers=cfg.stages)),
            plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages),
            collective_axes="wg",
        )

    buf = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((2, ROWS, k), jnp.bfloat16),
        grid=(num_ctas,),
        grid_names=("n",),
        num_threads=3,
        thread_name="wg",
    )(xp, ws)
    return buf[layers % 2, :m]
