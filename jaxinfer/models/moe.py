"""Mixture-of-experts block (Mixtral, Qwen2-MoE): a router and a dropless sparse dispatch.

route -> sort the (token, expert) pairs by expert -> gather the token rows -> one grouped matmul
per weight over contiguous row groups -> scatter-add the weight-scaled results to their tokens.
No token is dropped, no capacity pads the work, and no [tokens, experts, capacity] one-hot
exists outside `moe_reference`; an expert that gets no rows does no work.

Over a mesh the dispatch runs on each device through `shard_map`, one of two ways
(`Parallel.moe`): "expert", each device owns E / tp experts and computes the pairs routed to
them; "ffn", each device holds every expert's 1 / tp share of F. The tokens are the same on
every device (tensor parallelism keeps activations whole), so no token travels: the per-device
partial sums meet in one all-reduce, the one a dense MLP needs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import MLP, declare
from jaxinfer.sharding import MODEL, Parallel
from pallas_kernels import expert_matmul as em


def route(logits: Float[Array, "T E"], k: int, normalize: bool):
    """Top-k experts of each token and their weights (softmax over all E, optionally renormalised)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)  # [T, k] each
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_matmul(
    lhs: Float[Array, "R I"], rhs: Float[Array, "E I O"], group_sizes: Int[Array, "E"], impl: str
) -> Float[Array, "R O"]:
    """Row group g of `lhs` times rhs[g]; the one dispatch point for the grouped matmul kernels.

    "pallas" runs our kernel (interpret mode on the CPU), which reads only the experts that got
    rows; other impls take `jax.lax.ragged_dot`.
    """
    if impl == "pallas":
        from pallas_kernels.grouped_matmul import grouped_matmul as kernel

        return kernel(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(
        lhs.dtype
    )


def dispatch(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    gate_up: Float[Array, "E D 2 F"],
    down: Float[Array, "E F D"],
    impl: str,
    first_expert: Int[Array, ""] | int = 0,
) -> Float[Array, "T D"]:
    """Sparse expert computation of every (token, chosen expert) pair, summed per token in f32.

    gate_up / down hold experts first_expert .. first_expert + E - 1 (all of them unless a
    device owns a share); pairs routed elsewhere sort last, fall outside every row group (the
    grouped matmul writes zeros there) and add nothing.
    """
    num_experts, d, _, f = gate_up.shape
    k = experts.shape[1]
    local = experts.reshape(-1) - first_expert  # [R], R = T * k
    mine = (local >= 0) & (local < num_experts)
    flat = jnp.where(mine, local, num_experts)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, others last
    token = order // k  # the token of each sorted pair
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]; others dropped
    h = grouped_matmul(x[token], gate_up.reshape(num_experts, d, 2 * f), sizes, impl)
    h = h.reshape(-1, 2, f)
    h = jax.nn.silu(h[:, 0]) * h[:, 1]  # [R, F]
    out = grouped_matmul(h, down, sizes, impl).astype(jnp.float32)  # [R, D]
    scale = jnp.where(mine, weights.reshape(-1), 0.0)[order]
    return jnp.zeros(x.shape, jnp.float32).at[token].add(out * scale[:, None])


def aligned_dispatch(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    gate_up: Float[Array, "E D 2 F"],
    down: Float[Array, "E F D"],
    interpret: bool | None = None,
) -> Float[Array, "T D"]:
    """`dispatch` through the Hopper expert kernels (`pallas_kernels.expert_matmul`): each
    expert's pairs start at a 128-row block, gate/up and SiLU x up are one kernel, down reads
    its output in the same layout. Pairs routed outside [0, E) add nothing. f32 out."""
    t, k = experts.shape
    num_experts = gate_up.shape[0]
    layout = em.aligned_layout(experts.reshape(-1), num_experts)
    token = jnp.arange(t * k, dtype=jnp.int32) // k  # pair p is (token p // k, choice p % k)
    gate_cfg, down_cfg = em.default_configs(t * k, num_experts, gate_up.shape[3])
    xa = em.to_layout(x, token, layout)  # [P, D]
    h = em.expert_swiglu(layout.block_expert, xa, gate_up, config=gate_cfg, interpret=interpret)
    out = em.expert_matmul(layout.block_expert, h, down, config=down_cfg, interpret=interpret)
    out = em.from_layout(out, layout).reshape(t, k, -1).astype(jnp.float32)  # [T, k, D]
    # A pair routed nowhere comes back 0, so its weight needs no mask.
    return jnp.einsum("TkD,Tk->TD", out, weights.astype(jnp.float32))


def expert_kernel_fits(d: int, f: int, dtype) -> bool:
    """Whether `aligned_dispatch` takes experts of width D and F in this dtype."""
    # Down's K splits are only taken where they divide F's steps: its unsplit tiles decide.
    return (
        em.why_not(d, f, jnp.dtype(dtype), em.TILES, swiglu=True) is None
        and em.why_not(f, d, jnp.dtype(dtype), em.TILES) is None
    )


def sharded_dispatch(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    gate_up: Float[Array, "E D 2 F"],
    down: Float[Array, "E F D"],
    impl: str,
    parallel: Parallel,
    expert_kernel: bool = False,
) -> Float[Array, "T D"]:
    """`dispatch` on one device or, over `parallel.mesh`, on each device's experts ("expert") or
    share of F ("ffn"), the partial sums all-reduced; `expert_kernel` on one device:
    `aligned_dispatch`. Returns x's dtype."""
    if parallel.mesh is None:
        if expert_kernel:
            return aligned_dispatch(x, weights, experts, gate_up, down).astype(x.dtype)
        return dispatch(x, weights, experts, gate_up, down, impl).astype(x.dtype)
    if parallel.moe == "expert":
        w_specs = (PartitionSpec(MODEL), PartitionSpec(MODEL))
    else:
        w_specs = (PartitionSpec(None, None, None, MODEL), PartitionSpec(None, MODEL))

    def local(x, weights, experts, gate_up, down):
        first = jax.lax.axis_index(MODEL) * gate_up.shape[0] if parallel.moe == "expert" else 0
        partial = dispatch(x, weights, experts, gate_up, down, impl, first)
        return jax.lax.psum(partial, MODEL).astype(x.dtype)

    rep = PartitionSpec()
    return jax.shard_map(
        local,
        mesh=parallel.mesh,
        in_specs=(rep, rep, rep, *w_specs),
        out_specs=rep,
        check_vma=False,
    )(x, weights, experts, gate_up, down)


class MoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert behind a sigmoid gate).

    `expert_kernel` (one Hopper GPU, bf16): the experts through `aligned_dispatch`'s Mosaic GPU
    kernels, where they take the shapes; else `dispatch`'s grouped matmul."""

    cfg: ModelConfig
    dtype: jnp.dtype
    impl: str
    parallel: Parallel = Parallel()
    expert_kernel: bool = False

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"] | None = None
    ) -> Float[Array, "B T D"]:
        """valid: which tokens are real; the others (a bucket's padding) are routed to no expert,
        so they add no rows to the grouped matmuls, and their output is 0."""
        c, dt = self.cfg, self.dtype
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        router = declare(self, "router", (d, e), ("embed", "router"), dt)
        gate_up = declare(
            self, "gate_up", (e, d, 2, f), ("experts", "embed", "gate_up", "expert_mlp"), dt
        )
        down = declare(self, "down", (e, f, d), ("experts", "expert_mlp", "embed"), dt)
        b, t, _ = x.shape
        flat = x.reshape(b * t, d)
        weights, experts = route(flat @ router, c.num_experts_per_tok, c.norm_topk_prob)
        # The routing, for whoever applies with mutable=["intermediates"] (benchmarks count
        # the distinct experts a batch picks); a no-op otherwise.
        self.sow("intermediates", "experts", experts.reshape(b, t, -1))
        if valid is not None:  # expert index E is no device's: the pair sorts last, does nothing
            experts = jnp.where(valid.reshape(b * t, 1), experts, c.num_experts)
        aligned = self.expert_kernel and expert_kernel_fits(d, f, x.dtype)
        y = sharded_dispatch(
            flat, weights, experts, gate_up, down, self.impl, self.parallel, aligned
        )
        y = y.reshape(b, t, d)
        if c.shared_expert_intermediate_size:
            shared = MLP(c, dt, c.shared_expert_intermediate_size, name="shared")(x)
            gate = declare(self, "shared_gate", (d,), ("embed",), dt)
            y = y + jax.nn.sigmoid(jnp.einsum("BTD,D->BT", x, gate))[..., None] * shared
        return y


def moe_reference(x: Float[Array, "T D"], weights, experts, gate_up, down) -> Float[Array, "T D"]:
    """Every token through every expert, masked by the routing (f32; for tests only)."""
    x = x.astype(jnp.float32)
    h = jnp.einsum("TD,EDCF->TECF", x, gate_up.astype(jnp.float32))
    h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]  # [T, E, F]
    out = jnp.einsum("TEF,EFD->TED", h, down.astype(jnp.float32))
    mask = jnp.zeros(out.shape[:2]).at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    return jnp.einsum("TED,TE->TD", out, mask)
