"""The architecture table against the real transformers models built on the meta device: exact
parameter bytes per block and in total, module prefixes that cover every parameter and buffer
exactly once, tied embeddings shared by block 0 and the head, and the config class defaults."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.models.arch import ARCHITECTURES, layer_windows, profile_from_config
from vramancer.models.dtypes import resolve_dtype

from .tiny import TINY, config, config_dict, meta_model, under, unique_parameter_bytes


def _check_against_model(prof, model) -> None:
    """Every parameter and buffer lies under exactly one block's modules; a block's own bytes are
    the bytes of the parameters under it that no other block uses; a tied parameter is in
    ``shared`` with its bytes on every block that uses it."""
    blocks_of: dict[int, set[int]] = {}
    names_of: dict[int, str] = {}
    size_of: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners = [i for i, b in enumerate(prof.blocks) if under(name, b.modules)]
        assert len(owners) == 1, f"{name} is under blocks {owners}"
        blocks_of.setdefault(id(p), set()).add(owners[0])
        names_of.setdefault(id(p), name)
        size_of[id(p)] = p.numel() * p.element_size()
    for name, _ in model.named_buffers():
        owners = [i for i, b in enumerate(prof.blocks) if under(name, b.modules)]
        assert len(owners) == 1, f"buffer {name} is under blocks {owners}"
    for i, b in enumerate(prof.blocks):
        own = sum(size_of[pid] for pid, bl in blocks_of.items() if bl == {i})
        assert b.weights_bytes == own, (b.name, b.weights_bytes, own)
        shared = {names_of[pid]: size_of[pid] for pid, bl in blocks_of.items() if len(bl) > 1 and i in bl}
        assert b.shared == shared, (b.name, b.shared, shared)
    assert prof.weights_bytes == unique_parameter_bytes(model)
    assert prof.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(TINY))
def test_table_bytes_equal_meta_model(arch: str, dtype: str) -> None:
    cfg = config(arch)
    model = meta_model(cfg, dtype)
    prof = profile_from_config(config_dict(cfg), dtype)
    assert prof.arch == arch and prof.dtype == dtype
    assert prof.num_blocks == cfg.get_text_config().num_hidden_layers + 2
    _check_against_model(prof, model)


@pytest.mark.parametrize("arch", list(TINY))
def test_config_defaults_match_transformers(arch: str) -> None:
    """A config.json that leaves keys out gets transformers' class defaults: the diff dict (only
    non-default keys) and the bare default config (full-size model, on meta) size exactly."""
    cfg = config(arch)
    diff = cfg.to_diff_dict()
    diff["model_type"] = arch
    _check_against_model(profile_from_config(diff, "bfloat16"), meta_model(cfg, "bfloat16"))
    big = profile_from_config({"model_type": arch}, "bfloat16")
    _check_against_model(big, meta_model(transformers_default(arch), "bfloat16"))


def transformers_default(arch: str):
    import transformers

    kw = {"pad_token_id": None} if arch == "phi3" else {}
    return transformers.AutoConfig.for_model(arch, **kw)


def test_table_covers_the_issue_architectures() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
            "qwen2_moe", "gpt2", "gpt_neox", "bert"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_tied_embedding_is_shared_by_first_and_last_block(arch: str) -> None:
    prof = profile_from_config(config_dict(config(arch, tie_word_embeddings=True)), "bfloat16")
    first, last = prof.blocks[0], prof.blocks[-1]
    assert first.shared and first.shared == last.shared
    key, nbytes = next(iter(first.shared.items()))
    assert nbytes == 128 * 32 * 2
    # counted once in the model total, and once for a stage holding both ends
    assert prof.weights_bytes == sum(b.weights_bytes for b in prof.blocks) + nbytes
    # the head multiplies with it, the embedding only looks a row up
    assert last.flops_per_token >= 2 * 128 * 32 and first.flops_per_token < 2 * 128 * 32
    assert first.read_bytes_per_token < nbytes <= last.read_bytes_per_token


def test_untied_head_is_its_own_weight() -> None:
    prof = profile_from_config(config_dict(config("llama", tie_word_embeddings=False)), "float32")
    assert not prof.blocks[0].shared and not prof.blocks[-1].shared
    assert prof.blocks[0].weights_bytes == 128 * 32 * 4
    assert prof.blocks[-1].weights_bytes == 128 * 32 * 4 + 32 * 4  # lm_head + final norm
    assert prof.blocks[-1].logits_bytes_per_token == 128 * 4


def test_quantized_dtype_sizes_matrices_by_bits_per_weight() -> None:
    cfg = config_dict(config("mistral"))
    nf4, q8 = resolve_dtype("nf4"), resolve_dtype("q8_0")
    H, I, V, q, kv = 32, 64, 128, 32, 16
    layer_shapes = [(q, H), (kv, H), (kv, H), (H, q), (I, H), (I, H), (H, I)]
    layer_mats = [a * b for a, b in layer_shapes]
    # bitsandbytes NF4: packed 4-bit + fp32 absmax per 64 + its 16-entry code; embeddings / head / norms bf16
    p = profile_from_config(cfg, "nf4")
    assert p.blocks[1].weights_bytes == sum(nf4.weight_bytes(s) for s in layer_shapes) + 2 * H * 2
    assert nf4.weight_bytes((q, H)) == q * H // 2 + 4 * (q * H // 64) + 4 * 16
    assert p.blocks[0].weights_bytes == V * H * 2
    assert p.blocks[-1].weights_bytes == V * H * 2 + H * 2
    assert p.kv_dtype == "bfloat16" and p.blocks[1].kv_bytes_per_token == 2 * kv * 2
    # GGUF Q8_0: embeddings and head quantized too; compute / KV in float16
    p = profile_from_config(cfg, "q8_0")
    assert p.blocks[0].weights_bytes == q8.matrix_bytes(V * H) == V * H // 32 * 34
    assert p.blocks[1].weights_bytes == sum(q8.matrix_bytes(n) for n in layer_mats) + 2 * H * 2


def test_moe_counts_all_experts_resident_and_active_experts_per_token() -> None:
    cfg = config_dict(config("mixtral"))
    p = profile_from_config(cfg, "float32")
    layer = p.blocks[1]
    H, I, E = 32, 64, 4
    experts = E * 3 * H * I
    dense = 32 * 32 + 2 * 16 * 32 + 32 * 32 + E * H + 2 * H   # attention, router, norms
    assert layer.params == dense + experts
    assert layer.flops_per_token == 2 * (dense + experts * 2 / 4)
    assert layer.read_bytes_per_token == 4 * (dense + experts // 2)
    assert layer.kv_bytes_per_token == 2 * 2 * 8 * 4  # same as the dense model: 2 x kv_heads x head_dim x 4


def test_kv_and_attention_figures_per_layer() -> None:
    p = profile_from_config(config_dict(config("qwen3")), "bfloat16")  # 4 heads, 2 kv heads, head_dim 8
    b = p.blocks[1]
    assert b.kv_bytes_per_token == 2 * 2 * 8 * 2
    assert b.attn_flops_per_token_per_ctx == 4 * 4 * 8
    assert b.attn_score_bytes == 4 * 2
    assert p.kv_bytes(100, 3) == 2 * b.kv_bytes_per_token * 100 * 3
    assert p.blocks[0].kv_bytes_per_token == 0 == p.blocks[-1].kv_bytes_per_token
    enc = profile_from_config(config_dict(config("bert")), "float32")
    assert enc.kind == "encoder" and enc.kv_bytes_per_token == 0 and enc.blocks[-1].logits_bytes_per_token == 0


def test_sliding_window_rules_match_transformers_layer_types() -> None:
    import transformers

    cases = [
        ("gemma2", dict(num_hidden_layers=5, sliding_window=64)),
        ("gemma3_text", dict(num_hidden_layers=13, sliding_window=64, sliding_window_pattern=6)),
        ("qwen2", dict(num_hidden_layers=6, use_sliding_window=True, sliding_window=64, max_window_layers=2)),
        ("qwen2", dict(num_hidden_layers=6, use_sliding_window=False, sliding_window=64)),
        ("mistral", dict(num_hidden_layers=3, sliding_window=64)),
        ("mistral", dict(num_hidden_layers=3, sliding_window=None)),
        ("qwen2_moe", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=3)),
    ]
    for arch, kw in cases:
        cfg = transformers.AutoConfig.for_model(arch, **kw)
        raw = {"model_type": arch, **kw}  # as a published config.json: no layer_types
        ours = layer_windows(arch, raw, kw["num_hidden_layers"])
        types = cfg.layer_types if getattr(cfg, "layer_types", None) else [
            "sliding_attention" if cfg.sliding_window is not None else "full_attention"] * kw["num_hidden_layers"]
        want = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
        assert ours == want, (arch, kw, ours, want)
        # and the profile carries them
        prof = profile_from_config(raw, "bfloat16")
        assert [b.kv_window for b in prof.blocks[1:-1]] == want


@settings(max_examples=60, deadline=None)
@given(
    hidden_heads=st.sampled_from([(32, 4), (48, 6), (64, 8), (64, 4)]),
    kv_div=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 5),
    vocab=st.integers(16, 300),
    inter=st.integers(8, 200),
    tied=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "nf4", "int8", "q4_k_m", "q8_0"]),
)
def test_block_weights_sum_to_profile_total(hidden_heads, kv_div, layers, vocab, inter, tied, dtype) -> None:
    H, heads = hidden_heads
    kvh = max(1, heads // kv_div)
    cfg = {"model_type": "llama", "hidden_size": H, "num_attention_heads": heads, "num_key_value_heads": kvh,
           "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter,
           "tie_word_embeddings": tied}
    p = profile_from_config(cfg, dtype)
    shared = {}
    for b in p.blocks:
        shared.update(b.shared)
    assert p.weights_bytes == sum(b.weights_bytes for b in p.blocks) + sum(shared.values())
    assert p.num_blocks == layers + 2
    hd = H // heads
    per_layer = H * heads * hd + 2 * H * kvh * hd + heads * hd * H + 3 * H * inter + 2 * H
    params = vocab * H * (1 if tied else 2) + layers * per_layer + H
    assert p.params == params
    dt = resolve_dtype(dtype)
    if not dt.quantized:
        assert p.weights_bytes == params * dt.compute_bytes
    else:
        assert p.weights_bytes < params * 2
    assert all(b.kv_bytes_per_token == 2 * kvh * hd * dt.compute_bytes for b in p.blocks[1:-1])
