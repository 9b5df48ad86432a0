"""Pallas kernels of jaxinfer, each beside its plain-jnp reference."""

from pallas_kernels.flash_attention import FlashConfig, flash_attention, flash_attention_reference
from pallas_kernels.flash_attention_mgpu import MgpuFlashConfig
from pallas_kernels.grouped_matmul import (
    GroupedMatmulConfig,
    grouped_matmul,
    grouped_matmul_dense_loop,
    grouped_matmul_reference,
)
from pallas_kernels.paged_attention import (
    PagedConfig,
    contiguous_decode_reference,
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference
from pallas_kernels.rope_write import rope_write, rope_write_reference

__all__ = [
    "FlashConfig",
    "MgpuFlashConfig",
    "flash_attention",
    "flash_attention_reference",
    "PagedConfig",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "contiguous_decode_reference",
    "write_kv",
    "write_kv_reference",
    "GroupedMatmulConfig",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_dense_loop",
    "rms_norm",
    "rms_norm_reference",
    "rope_write",
    "rope_write_reference",
]
