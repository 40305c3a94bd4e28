"""KV bytes per token against what transformers' own DynamicCache holds after a forward of T
tokens of a tiny random model of each decoder architecture."""
from __future__ import annotations

import pytest

from vramancer.models.arch import profile_from_config
from vramancer.models.resolve import profile

from .tiny import DECODERS, cache_layer_bytes, config, config_dict, random_model, torch


def _forward(model, tokens: int, batch: int = 1):
    ids = torch.randint(3, 128, (batch, tokens))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", DECODERS)
def test_kv_bytes_equal_dynamic_cache(arch: str, dtype: str) -> None:
    cfg = config(arch)
    model = random_model(cfg, dtype)
    prof = profile_from_config(config_dict(cfg), dtype)
    T, batch = 7, 2  # below every tiny sliding window (16)
    held = cache_layer_bytes(_forward(model, T, batch))
    layers = prof.blocks[1:-1]
    assert len(held) == len(layers)
    assert held == [b.kv_bytes(T, batch) for b in layers]
    assert sum(held) == prof.kv_bytes_per_token * T * batch == prof.kv_bytes(T, batch)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "mistral"])
def test_sliding_window_bounds_what_the_cache_holds(arch: str) -> None:
    """Past the window a sliding layer keeps ``window - 1`` tokens (and sees ``window`` with the
    new one); the profile caps it at ``window``, never below what the cache holds."""
    window, T = 5, 12
    cfg = config(arch, sliding_window=window)
    model = random_model(cfg)
    prof = profile_from_config(config_dict(cfg), "float32")
    held = cache_layer_bytes(_forward(model, T))
    windows = [b.kv_window for b in prof.blocks[1:-1]]
    assert window in windows
    for b, got in zip(prof.blocks[1:-1], held):
        if b.kv_window is None:
            assert got == b.kv_bytes_per_token * T
        else:
            assert got == b.kv_bytes_per_token * (window - 1) <= b.kv_bytes(T, 1)
            assert b.kv_bytes(T, 1) - got == b.kv_bytes_per_token  # one token of slack


def test_module_profile_kv_equals_cache() -> None:
    """The nn.Module path reads KV from the model's config: same figures as the table."""
    cfg = config("qwen2_moe")
    model = random_model(cfg)
    prof = profile(model)
    assert prof.source == "module" and prof.dtype == "float32"
    held = cache_layer_bytes(_forward(model, 4))
    assert held == [b.kv_bytes(4, 1) for b in prof.blocks[1:-1]]
