"""The model catalog: look-ups, and every causal-LM config builds in transformers with the published
parameter count (meta device, no weights)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from vramancer.models.catalog import MODELS, CatalogModel, find_model, list_models

CAUSAL = [m for m in list_models() if m.kind == "causal-lm"]
REQUIRED_CAUSAL = [
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b",
    "mistral-7b", "mistral-nemo-12b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
    "qwen2.5-72b", "qwen3-8b", "gemma-2-9b", "gemma-2-27b", "phi-3-mini", "phi-3-medium", "gpt2",
]


def test_catalog_covers_the_required_models():
    assert [k for k in REQUIRED_CAUSAL if k not in MODELS] == []
    assert len(CAUSAL) >= 17
    assert {m.key for m in list_models() if m.kind == "diffusion"} == {"flux.1-dev", "sdxl-unet"}
    assert list_models() == list(MODELS.values())


@pytest.mark.parametrize("text", [
    "llama-3.1-70b", "LLAMA-3.1-70B", "llama3.1-70b", "Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct", " llama_3.1_70b ",
])
def test_find_model_by_key_alias_repo_and_hf_id(text):
    assert find_model(text).key == "llama-3.1-70b"


@pytest.mark.parametrize("text,key", [
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"), ("mixtral", "mixtral-8x7b"), ("flux-dev", "flux.1-dev"),
    ("black-forest-labs/FLUX.1-dev", "flux.1-dev"), ("sdxl", "sdxl-unet"), ("gpt2", "gpt2"),
    ("openai-community/gpt2", "gpt2"), ("Phi-3-mini-4k-instruct", "phi-3-mini"), ("gemma-2-27b-it", "gemma-2-27b"),
    ("mistral-7b-instruct-v0.3", "mistral-7b"), ("Mistral-Nemo-Instruct-2407", "mistral-nemo-12b"),
])
def test_find_model_more_names(text, key):
    assert find_model(text).key == key


@pytest.mark.parametrize("text", ["", "llama-9", "gpt5", "meta-llama/Llama-3.1-7B-Instruct", None, 42])
def test_unknown_models_are_none(text):
    assert find_model(text) is None


def test_names_are_unique_after_normalisation():
    seen: dict[str, str] = {}
    for m in list_models():
        for text in {re.sub(r"[^a-z0-9]", "", t.lower()) for t in (m.key, m.hf_id, m.hf_id.split("/")[-1], *m.aliases)}:
            assert text not in seen, f"{text!r} names both {seen[text]} and {m.key}"
            seen[text] = m.key


@pytest.mark.parametrize("m", list_models(), ids=lambda m: m.key)
def test_entries_are_complete(m: CatalogModel):
    assert re.fullmatch(r"[\w.\-]+/[\w.\-]+", m.hf_id)
    assert m.description and "\n" not in m.description
    assert m.params_published > 10**8
    assert m.default_dtype in ("bfloat16", "float16", "float32")
    if m.kind == "causal-lm":
        assert m.config["model_type"] and m.config["architectures"] and not m.blocks
        assert m.arch == m.config["architectures"][0]
    else:
        assert m.arch == m.config["_class_name"] and m.blocks


def test_config_copy_is_independent():
    m = find_model("llama-3.1-8b")
    c = m.config_copy()
    c["rope_scaling"]["factor"] = 1.0
    c["hidden_size"] = 1
    assert m.config["rope_scaling"]["factor"] == 8.0 and m.config["hidden_size"] == 4096


# Attention shapes the KV cache depends on, as the model cards state them:
# (layers, query heads, KV heads, head dim, sliding window in effect)
MODEL_CARD_ATTENTION = {
    "llama-3.1-8b": (32, 32, 8, 128, None), "llama-3.1-70b": (80, 64, 8, 128, None),
    "llama-3.1-405b": (126, 128, 8, 128, None), "llama-3.2-1b": (16, 32, 8, 64, None),
    "llama-3.2-3b": (28, 24, 8, 128, None), "mistral-7b": (32, 32, 8, 128, None),
    "mistral-nemo-12b": (40, 32, 8, 128, None), "mixtral-8x7b": (32, 32, 8, 128, None),
    "qwen2.5-7b": (28, 28, 4, 128, None), "qwen2.5-14b": (48, 40, 8, 128, None),
    "qwen2.5-32b": (64, 40, 8, 128, None), "qwen2.5-72b": (80, 64, 8, 128, None),
    "qwen3-8b": (36, 32, 8, 128, None), "gemma-2-9b": (42, 16, 8, 256, 4096), "gemma-2-27b": (46, 32, 16, 128, 4096),
    "phi-3-mini": (32, 32, 32, 96, 2047), "phi-3-medium": (40, 40, 10, 128, 2047), "gpt2": (12, 12, 12, 64, None),
}


@pytest.mark.parametrize("m", CAUSAL, ids=lambda m: m.key)
def test_config_builds_and_parameter_count_matches_published(m: CatalogModel):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**m.config_copy())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == m.config["architectures"][0]
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / m.params_published - 1) < 0.01, (params, m.params_published)

    if m.key in MODEL_CARD_ATTENTION:
        layers, heads, kv_heads, head_dim, window = MODEL_CARD_ATTENTION[m.key]
        assert cfg.num_hidden_layers == layers and cfg.num_attention_heads == heads
        assert getattr(cfg, "num_key_value_heads", heads) == kv_heads
        assert (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) == head_dim
        assert getattr(cfg, "sliding_window", None) == window
    assert cfg.tie_word_embeddings == m.config.get("tie_word_embeddings", True)


def test_catalog_modules_do_not_import_torch():
    code = ("import sys; from vramancer.models.catalog import find_model; "
            "from vramancer.models.diffusion import diffusion_profile; "
            "diffusion_profile(find_model('flux.1-dev'), 'bfloat16'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules "
            "and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
