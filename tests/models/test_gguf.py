"""GGUF profiles: files written with the gguf package's GGUFWriter (tiny llama-shaped tensors,
Q8_0-quantized with gguf's own quants, F16 and F32) profile with exact bytes per block."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from vramancer.errors import MalformedCheckpointError  # noqa: E402
from vramancer.models.resolve import profile  # noqa: E402

H, L, HEADS, KV_HEADS, FF, V, CTX = 64, 2, 4, 2, 96, 160, 256
HD = H // HEADS
Q8 = gguf.GGMLQuantizationType.Q8_0


def _q8(rows: int, cols: int, rng) -> np.ndarray:
    return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q8)


def write_llama_gguf(path: Path, *, tied: bool = False, sliding_window: int | None = None) -> dict[str, int]:
    """A llama-arch GGUF; returns the expected bytes per block name."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_embedding_length(H)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(CTX)
    w.add_feed_forward_length(FF)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    expect = {"embed": 0, "head": 0, **{f"layer{i}": 0 for i in range(L)}}

    def add(name: str, arr: np.ndarray, block: str, qtype=None, shape=None) -> None:
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qtype)
        expect[block] += arr.nbytes

    add("token_embd.weight", rng.standard_normal((V, H)).astype(np.float16), "embed")
    for i in range(L):
        b = f"layer{i}"
        for n, rows, cols in (("attn_q", H, H), ("attn_k", KV_HEADS * HD, H), ("attn_v", KV_HEADS * HD, H),
                              ("attn_output", H, H), ("ffn_gate", FF, H), ("ffn_up", FF, H), ("ffn_down", H, FF)):
            add(f"blk.{i}.{n}.weight", _q8(rows, cols, rng), b, Q8)
        add(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32), b)
        add(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32), b)
    add("output_norm.weight", np.ones(H, np.float32), "head")
    if not tied:
        add("output.weight", _q8(V, H, rng), "head", Q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


def test_gguf_exact_bytes_per_block(tmp_path) -> None:
    f = tmp_path / "tiny-q8_0.gguf"
    expect = write_llama_gguf(f)
    # Q8_0 really is 34 bytes per 32 weights
    assert expect["layer0"] == (2 * H * H + 2 * KV_HEADS * HD * H + 3 * FF * H) // 32 * 34 + 2 * H * 4
    prof = profile(str(f))
    assert prof.source == "gguf" and prof.arch == "llama" and prof.dtype == "q8_0"
    assert prof.quantization == "MOSTLY_Q8_0"
    assert [b.weights_bytes for b in prof.blocks] == \
        [expect["embed"], *(expect[f"layer{i}"] for i in range(L)), expect["head"]]
    assert prof.weights_bytes == sum(expect.values())
    assert prof.num_layers == L and prof.hidden_size == H and prof.vocab_size == V
    assert prof.max_position_embeddings == CTX
    # KV in llama.cpp's default f16 cache: 2 x kv_heads x head_dim x 2 bytes per layer
    assert prof.kv_dtype == "float16"
    assert [b.kv_bytes_per_token for b in prof.blocks] == [0] + [2 * KV_HEADS * HD * 2] * L + [0]
    # transformers module names, so a runtime loading it through transformers can map devices
    assert prof.layers_prefix == "model.layers" and prof.blocks[1].modules == ["model.layers.0"]
    assert prof.config["num_key_value_heads"] == KV_HEADS


def test_gguf_tied_output_is_shared(tmp_path) -> None:
    f = tmp_path / "tied.gguf"
    expect = write_llama_gguf(f, tied=True)
    prof = profile(str(f))
    embed_bytes = V * H * 2
    assert prof.blocks[0].shared == prof.blocks[-1].shared == {"token_embd.weight": embed_bytes}
    assert prof.blocks[0].weights_bytes == 0 and prof.blocks[-1].weights_bytes == H * 4
    assert prof.weights_bytes == sum(expect.values())
    assert prof.blocks[-1].logits_bytes_per_token == V * 4


def test_gguf_sliding_window_and_requested_dtype(tmp_path) -> None:
    f = tmp_path / "swa.gguf"
    write_llama_gguf(f, sliding_window=32)
    prof = profile(str(f))
    assert all(b.kv_window == 32 for b in prof.blocks[1:-1])
    f16 = profile(str(f), dtype="float16")
    params = prof.params
    assert f16.weights_bytes == params * 2 and f16.dtype == "float16"


def test_malformed_gguf_raises_naming_the_file(tmp_path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all, only words" * 4)
    with pytest.raises(MalformedCheckpointError, match="garbage.gguf"):
        profile(str(garbage))
    good = tmp_path / "good.gguf"
    write_llama_gguf(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(MalformedCheckpointError, match="truncated.gguf"):
        profile(str(truncated))
