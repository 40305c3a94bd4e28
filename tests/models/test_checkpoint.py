"""Profiles from saved checkpoints: tiny random models written with ``save_pretrained``; weight
bytes equal the tensor bytes in the safetensors files (measured from the file itself)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from vramancer.errors import MalformedCheckpointError, UnknownModelError
from vramancer.models.arch import profile_from_config
from vramancer.models.checkpoint import profile_from_folder, profile_from_safetensors_file
from vramancer.models.resolve import profile

from .tiny import config, random_model

SAVED = ["llama", "gemma2", "gpt2", "mixtral", "bert", "phi3"]


def file_tensor_bytes(path: Path) -> int:
    """Tensor data bytes of a .safetensors file: file size - 8 - header length."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch in SAVED:
        d = tmp_path_factory.mktemp(arch)
        random_model(config(arch), "bfloat16").save_pretrained(d)
        out[arch] = d
    return out


@pytest.mark.parametrize("arch", SAVED)
def test_folder_bytes_equal_safetensors_file(saved, arch: str) -> None:
    d = saved[arch]
    prof = profile(str(d))
    assert prof.source == "hf-folder" and prof.dtype == "bfloat16" and prof.path == str(d)
    assert prof.weights_bytes == file_tensor_bytes(d / "model.safetensors")
    # per block equal to the architecture table's sizing of the same config
    table = profile_from_config(json.loads((d / "config.json").read_text()), "bfloat16")
    assert [(b.name, b.weights_bytes, b.shared, b.modules) for b in prof.blocks] == \
        [(b.name, b.weights_bytes, b.shared, b.modules) for b in table.blocks]
    assert [b.kv_bytes_per_token for b in prof.blocks] == [b.kv_bytes_per_token for b in table.blocks]
    assert prof.layers_prefix == table.layers_prefix and prof.config["model_type"] == arch


def test_requested_dtype_resizes_from_shapes(saved) -> None:
    d = saved["llama"]
    bf16 = profile(str(d))
    fp32 = profile(str(d), dtype="float32")
    assert fp32.weights_bytes == 2 * bf16.weights_bytes and fp32.dtype == "float32"
    assert any("sized in the requested float32" in n for n in fp32.notes)
    nf4 = profile(str(d), dtype="nf4")
    assert nf4.weights_bytes < bf16.weights_bytes and nf4.quantization == "nf4"


def test_sharded_checkpoint_with_index(saved, tmp_path) -> None:
    d = tmp_path / "sharded"
    random_model(config("llama", num_hidden_layers=3), "bfloat16").save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert (d / "model.safetensors.index.json").is_file() and len(shards) > 1
    prof = profile(str(d))
    assert prof.weights_bytes == sum(file_tensor_bytes(s) for s in shards)
    assert prof.num_blocks == 5
    # a missing shard: sized from the config instead, and said so
    shards[-1].unlink()
    partial = profile(str(d))
    assert partial.weights_bytes == prof.weights_bytes and any("missing" in n for n in partial.notes)


def test_config_only_folder_is_sized_from_config_and_plans(saved, tmp_path) -> None:
    import vramancer

    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(saved["gemma2"] / "config.json", d / "config.json")
    prof = profile(str(d))
    assert prof.source == "config" and prof.dtype == "bfloat16"
    assert prof.weights_bytes == profile(str(saved["gemma2"])).weights_bytes
    assert profile(str(d), "float32").weights_bytes == 2 * prof.weights_bytes
    plan = vramancer.plan(str(d), devices="rtx3060", context=32)
    assert plan.fits and plan.stages[0].weights_bytes == prof.weights_bytes


def test_single_safetensors_file_with_config_beside(saved) -> None:
    d = saved["gemma2"]
    prof = profile(str(d / "model.safetensors"))
    assert prof.source == "safetensors" and prof.arch == "gemma2"
    assert prof.weights_bytes == file_tensor_bytes(d / "model.safetensors")
    assert prof.blocks[0].shared == prof.blocks[-1].shared != {}


def test_single_safetensors_file_alone_infers_layers(saved, tmp_path) -> None:
    f = tmp_path / "alone.safetensors"
    shutil.copy(saved["llama"] / "model.safetensors", f)
    prof = profile_from_safetensors_file(f)
    assert prof.weights_bytes == file_tensor_bytes(f)
    assert prof.layers_prefix == "model.layers" and prof.num_layers == 2 and prof.num_blocks == 4
    assert [b.name for b in prof.blocks[1:-1]] == ["model.layers.0", "model.layers.1"]
    # KV from the k/v projections: 2 kv heads x 8 dims each for K and V, bf16
    assert prof.blocks[1].kv_bytes_per_token == (16 + 16) * 2
    assert "model.embed_tokens" in prof.blocks[0].modules and "lm_head" in prof.blocks[-1].modules


def test_base_model_prefix_is_matched(saved, tmp_path) -> None:
    """A BertForMaskedLM-style checkpoint stores ``bert.``-prefixed names; they land in the same blocks."""
    import numpy as np
    from safetensors.numpy import save_file

    src = saved["bert"]
    d = tmp_path / "prefixed"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    plain = profile(str(src))
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
        for k in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
            shape = f.get_slice(k).get_shape()
            tensors["bert." + k] = np.zeros(shape, np.float16)  # same bytes as bf16
    save_file(tensors, str(d / "model.safetensors"))
    prof = profile(str(d), dtype="float16")
    assert [b.weights_bytes for b in prof.blocks] == [b.weights_bytes for b in plain.blocks]


def test_malformed_files_raise_naming_the_file(saved, tmp_path) -> None:
    # truncated safetensors header
    d = tmp_path / "truncated"
    d.mkdir()
    shutil.copy(saved["llama"] / "config.json", d / "config.json")
    data = (saved["llama"] / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:40])
    with pytest.raises(MalformedCheckpointError, match="model.safetensors"):
        profile(str(d))
    # bad JSON config
    b = tmp_path / "badjson"
    b.mkdir()
    (b / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(MalformedCheckpointError, match="config.json"):
        profile(str(b))
    # a config that is JSON but not a model config
    (b / "config.json").write_text('["llama"]')
    with pytest.raises(MalformedCheckpointError, match="not a JSON object"):
        profile(str(b))
    (b / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    with pytest.raises(MalformedCheckpointError, match="hidden_size"):
        profile(str(b))
    # an index with no weight_map
    i = tmp_path / "badindex"
    i.mkdir()
    shutil.copy(saved["llama"] / "config.json", i / "config.json")
    (i / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(MalformedCheckpointError, match="index"):
        profile(str(i))
    # a file that is not a safetensors file at all
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(MalformedCheckpointError, match="junk.safetensors"):
        profile(str(f))


def test_folder_without_config_is_unknown(tmp_path) -> None:
    with pytest.raises(UnknownModelError, match="no config.json"):
        profile_from_folder(tmp_path)
