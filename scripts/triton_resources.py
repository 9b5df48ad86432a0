"""What Triton makes of the paged decode kernels for sm_90, without a GPU: each form is lowered
to Triton IR by Pallas on the CPU (as `tests/test_triton_lowering.py` does), then compiled by
an installed `triton` package's own passes and ptxas, and its registers, shared memory, stack
and the pipelined loops' async copies and waits are reported.

The GPU build runs XLA's copy of Triton, which may differ from the installed one in version and
options, so the figures are an estimate of the GPU's; the Triton IR itself is the GPU's. Needs
`pip install triton` (Linux x86-64; it ships ptxas), in an environment of its own if its
version clashes.

    python scripts/triton_resources.py --batch 100 --out /tmp/decode-resources.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import pallas_call_registration as registration

from pallas_kernels.paged_attention import PagedConfig, paged_attention, rope_paged_decode

K, G, H, PAGE = 8, 4, 128, 16  # Llama-3-8B's heads, pages of 16 tokens


def lowered_modules(batch: int, pages_per_seq: int, block_k: int | None) -> dict[str, str]:
    """{form: Triton IR text} of the plain decode kernel and the fused one with the new token
    read back in the loop or joined after it (one split, as the engine runs 100+ sequences)."""
    texts, lower = {}, registration.lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts[str(result.module.operation.attributes["sym_name"]).strip('"')] = str(result.module)
        return result

    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    pool = spec((K, batch * pages_per_seq + 8, PAGE, H))
    ints, table = spec((batch,), jnp.int32), spec((batch, pages_per_seq), jnp.int32)
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    build = lambda fn, *args: export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(
        *args
    )
    forms = {}
    registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        for name, config in (
            ("plain", None),
            ("fused", PagedConfig(num_splits=1, block_k=block_k)),
            ("fused_last", PagedConfig(num_splits=1, block_k=block_k, new_token_last=True)),
        ):
            texts.clear()
            if config is None:
                fn = functools.partial(
                    paged_attention,
                    config=PagedConfig(num_splits=1, block_k=block_k),
                    interpret=False,
                )
                build(fn, spec((batch, K * G, H)), pool, pool, table, ints)
            else:
                fn = functools.partial(rope_paged_decode, config=config, interpret=False)
                qkv, freq = spec((batch, K, G + 2, H)), spec((H // 2,), jnp.float32)
                build(fn, qkv, pool, pool, table, ints, ints, ints, freq)
            (forms[name],) = [t for n, t in texts.items() if "combine" not in n]
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return forms


def compiled(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Registers, shared memory, stack and the loops' async copies / waits of one module."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(
            path,
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "-res-usage", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    ttgir = kernel.asm["ttgir"]
    threads = 32 * num_warps
    # registers are granted per warp in units of 256; 64 K a SM
    per_warp = -(-regs * 32 // 256) * 256
    return dict(
        triton=triton.__version__,
        registers=regs,
        stack_bytes=stack,
        shared_bytes=kernel.metadata.shared,
        programs_per_sm_by_registers=65536 // (per_warp * num_warps),
        threads=threads,
        async_copies=ttgir.count("async_copy_global_to_local"),
        async_waits=ttgir.count("ttg.async_wait"),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--pages-per-seq", type=int, default=128)
    p.add_argument("--block-k", type=int, default=None, help="kv tokens a step (None: auto)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    modules = lowered_modules(args.batch, args.pages_per_seq, args.block_k)
    loops = {}
    for name, text in modules.items():
        # the kv loops' bodies with SSA names dropped: equal strings, equal code
        body = re.sub(r"%[\w#]+", "%v", text[text.index("scf.for") :])
        loops[name] = re.sub(r"loc\([^)]*\)", "", body)
    rows = []
    for name, text in modules.items():
        row = dict(
            form=name,
            loop_as_plain=loops[name].split("scf.yield")[0] == loops["plain"].split("scf.yield")[0],
        )
        row.update(compiled(text, args.warps, args.stages))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
