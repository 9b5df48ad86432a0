"""Damaged checkpoints: every truncated, garbage or incomplete file is one ValueError that names
the file and says what is wrong, and the CLI turns it into one line on stderr and exit code 2.
The tests damage tiny checkpoints they write themselves."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import build_hf_model
from safetensors.numpy import load_file, save_file
from test_gguf import tiny_hf_tensors, write_gguf

import jaxinfer
from jaxinfer.__main__ import main


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF directory, its jaxinfer (orbax) checkpoint and a tiny GGUF file."""
    root = tmp_path_factory.mktemp("damage-sources")
    build_hf_model("llama2", root / "hf")
    jaxinfer.save_checkpoint(jaxinfer.load_model(root / "hf", dtype="float32"), root / "ckpt")
    write_gguf(root / "tiny.gguf", tiny_hf_tensors(False))
    return root


def copy_of(sources, name, tmp_path):
    src, dst = sources / name, tmp_path / name
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def refused(path, *patterns: str) -> str:
    """Loads `path`, expects one ValueError naming `patterns` (the file first); checks the CLI."""
    with pytest.raises(ValueError) as info:
        jaxinfer.load_model(path, dtype="float32")
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


def cut(file, keep: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors(sources, tmp_path, keep):
    model = copy_of(sources, "hf", tmp_path)
    cut(model / "model.safetensors", keep)
    refused(model, f"{model / 'model.safetensors'} is not a readable safetensors file")


def test_garbage_safetensors(sources, tmp_path):
    model = copy_of(sources, "hf", tmp_path)
    (model / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    refused(model, f"{model / 'model.safetensors'} is not a readable safetensors file")


def test_integer_tensor_is_refused(sources, tmp_path):
    model = copy_of(sources, "hf", tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, model / "model.safetensors")
    refused(
        model,
        str(model / "model.safetensors"),
        "tensor model.norm.weight has dtype int32, expected a floating-point dtype",
    )


def shard(model) -> dict:
    """Splits model.safetensors into two shards with an index; returns the weight map."""
    tensors = load_file(model / "model.safetensors")
    os.remove(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, model / file)
        weight_map |= {n: file for n in part}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(sources, tmp_path):
    model = copy_of(sources, "hf", tmp_path)
    shard(model)
    jaxinfer.load_model(model, dtype="float32")  # intact: loads
    os.remove(model / "model-00002-of-00002.safetensors")
    refused(
        model,
        str(model / "model-00002-of-00002.safetensors"),
        "shard listed in model.safetensors.index.json is missing",
    )


def test_damaged_shard_index(sources, tmp_path):
    model = copy_of(sources, "hf", tmp_path)
    shard(model)
    cut(model / "model.safetensors.index.json", 0.5)
    refused(model, str(model / "model.safetensors.index.json"), "not a safetensors index")


def test_generation_config_eos_ids_are_added(sources, tmp_path):
    """An instruct model's end-of-turn token listed only in generation_config.json stops it,
    as HF's `generate` stops; a damaged or out-of-vocabulary list is refused, naming the file."""
    model = copy_of(sources, "hf", tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["eos_token_id"] = 3
    (model / "config.json").write_text(json.dumps(config))
    file = model / "generation_config.json"
    file.write_text(json.dumps({"eos_token_id": [3, 7, 5, 7]}))
    assert jaxinfer.load_model(model, dtype="float32").config.eos_token_ids == (3, 7, 5)
    file.write_text(json.dumps({"eos_token_id": 10**6}))
    refused(model, str(file), "eos_token_id 1000000 is outside the vocabulary")
    file.write_text(json.dumps({"eos_token_id": ["</s>"]}))
    refused(model, f"{file} is damaged", "eos_token_id[0] must be an integer >= 0")
    file.write_text("{")
    refused(model, f"{file} is damaged")


def test_truncated_config(sources, tmp_path):
    model = copy_of(sources, "hf", tmp_path)
    cut(model / "config.json", 0.5)
    refused(model, str(model / "config.json"), "not valid JSON")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.02, 0.5, 0.999])
def test_truncated_gguf(sources, tmp_path, keep):
    file = copy_of(sources, "tiny.gguf", tmp_path)
    cut(file, keep)
    refused(file, str(file), "truncated or damaged")


def test_garbage_gguf(sources, tmp_path):
    file = copy_of(sources, "tiny.gguf", tmp_path)
    file.write_bytes(np.random.default_rng(1).bytes(5000))
    refused(file, f"{file} is not a readable GGUF file")


def orbax_data_files(ckpt) -> list:
    return sorted(
        (p for p in (ckpt / "params" / "ocdbt.process_0" / "d").iterdir()),
        key=lambda p: p.stat().st_size,
    )


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_orbax_checkpoint(sources, tmp_path, damage):
    ckpt = copy_of(sources, "ckpt", tmp_path)
    largest = orbax_data_files(ckpt)[-1]
    if damage == "truncate":
        cut(largest, 0.5)
    elif damage == "garble":
        largest.write_bytes(np.random.default_rng(2).bytes(largest.stat().st_size))
    else:
        shutil.rmtree(ckpt / "params" / "ocdbt.process_0")
    message = refused(ckpt, f"{ckpt / 'params'}: the params cannot be restored")
    assert "\n" not in message and len(message) < 600


def test_orbax_checkpoint_of_another_shape(sources, tmp_path):
    ckpt = copy_of(sources, "ckpt", tmp_path)
    meta = json.loads((ckpt / "jaxinfer.json").read_text())
    meta["config"]["hidden_size"] *= 2
    (ckpt / "jaxinfer.json").write_text(json.dumps(meta))
    refused(ckpt, f"{ckpt / 'params'}: the params cannot be restored")


def test_checkpoint_of_an_older_format_is_refused(sources, tmp_path):
    """Version 2 stored q/k/v and o with their input axes first: read as they are, they would
    be wrong weights of the same sizes (o's are square), so the version decides."""
    ckpt = copy_of(sources, "ckpt", tmp_path)
    meta = json.loads((ckpt / "jaxinfer.json").read_text())
    assert meta["version"] == 3
    meta["version"] = 2
    (ckpt / "jaxinfer.json").write_text(json.dumps(meta))
    refused(ckpt, f"{ckpt} is a jaxinfer checkpoint of format version 2", "convert it again")


def test_damaged_checkpoint_metadata(sources, tmp_path):
    ckpt = copy_of(sources, "ckpt", tmp_path)
    cut(ckpt / "jaxinfer.json", 0.5)
    refused(ckpt, f"{ckpt / 'jaxinfer.json'} is not a valid jaxinfer checkpoint file")


@pytest.mark.parametrize("what", ["safetensors", "gguf", "orbax", "missing"])
def test_cli_prints_one_line_and_exits_2(sources, tmp_path, capsys, what):
    if what == "safetensors":
        path = copy_of(sources, "hf", tmp_path)
        cut(path / "model.safetensors", 0.5)
    elif what == "gguf":
        path = copy_of(sources, "tiny.gguf", tmp_path)
        cut(path, 0.5)
    elif what == "orbax":
        path = copy_of(sources, "ckpt", tmp_path)
        cut(orbax_data_files(path)[-1], 0.5)
    else:
        path = tmp_path / "nowhere"
    assert main(["generate", "--model", str(path), "hello"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxinfer: error: ") and str(path) in lines[0]
    assert captured.out == ""


def test_cli_refuses_a_lone_surrogate_in_one_line(sources, capsys):
    # The CLI gets such text from undecodable bytes in argv (Python's surrogateescape).
    assert main(["generate", "--model", str(sources / "hf"), "caf\udce9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt has a lone surrogate" in err[0]
