"""Per-device bytes under tensor parallelism, from the declarations alone: a 70B model's weights
split evenly but for its replicated norms, and `scripts/tp_memory.py` prints and writes them."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from conftest import load_script
from jax.sharding import PartitionSpec

from jaxinfer.benchmark import shape
from jaxinfer.config import ModelConfig
from jaxinfer.model import abstract_params
from jaxinfer.sharding import param_specs, weight_bytes_per_device


def leaves_with_specs(cfg, size):
    """(path, bytes, spec) of every param of `cfg` in bf16 at tensor-parallel `size`."""
    shapes, axes = abstract_params(cfg, "bfloat16")
    specs = param_specs(cfg, shapes, axes, size)
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return [
        (jax.tree_util.keystr(path), math.prod(s.shape) * np.dtype(s.dtype).itemsize, spec)
        for (path, s), spec in zip(flat, spec_leaves)
    ]


def test_70b_weights_split_evenly_but_for_the_norms():
    cfg = ModelConfig(**shape("llama3-70b"))
    for size in (2, 4, 8):
        leaves = leaves_with_specs(cfg, size)
        total = sum(b for _, b, _ in leaves)
        replicated = [(p, b) for p, b, spec in leaves if all(a is None for a in spec)]
        assert all("norm" in p for p, _ in replicated), replicated  # norms alone are replicated
        norms = sum(b for _, b in replicated)
        assert norms == (2 * cfg.num_layers + 1) * cfg.hidden_size * 2
        assert (total - norms) % size == 0
        assert weight_bytes_per_device(cfg, "bfloat16", size) == (total - norms) // size + norms
    assert total == cfg.num_params * 2


def test_script_prints_and_writes_the_table(tmp_path, capsys):
    script = load_script("tp_memory")
    out = tmp_path / "tp.json"
    assert script.main(["--models", "llama2-70b", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Llama-2-70B | 1 | 128.5 GiB | 320 KiB | does not fit" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    assert not rows[0]["cards"]["141 GB"]["fits"] and rows[1]["cards"]["80 GB"]["fits"]
    tokens = [r["cards"]["80 GB"]["kv_tokens"] for r in rows[1:]]
    assert tokens == sorted(tokens)  # more devices: more room for KV on each
    two = rows[1]
    free = int(script.CARDS["80 GB"] * 0.9) - two["weight_bytes_per_device"]
    assert two["cards"]["80 GB"]["kv_tokens"] == free // two["kv_bytes_per_token_per_device"]


@pytest.mark.parametrize("size, heads", [(2, 4), (8, 1), (16, 1)])
def test_kv_bytes_per_token_per_device(size, heads):
    """Llama-3-70B's 8 kv heads: split while they last, then one repeated head per device."""
    from jaxinfer.sharding import kv_bytes_per_token_per_device

    cfg = ModelConfig(**shape("llama3-70b"))
    assert kv_bytes_per_token_per_device(cfg, "bfloat16", size) == 2 * 80 * heads * 128 * 2
