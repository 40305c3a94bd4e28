"""Tiny transformers configs for each architecture in the table, and helpers that build the real
models (on the meta device, or random on the CPU) and measure them independently of VRAMancer."""
from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=64, **_IDS)
_PLAIN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=128, max_position_embeddings=64, **_IDS)

TINY: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE, attention_bias=True, mlp_bias=True),
    "mistral": dict(_BASE),
    "qwen2": dict(_BASE, num_hidden_layers=3),
    "qwen3": dict(_BASE, head_dim=8),
    "gemma": dict(_BASE, head_dim=8),
    "gemma2": dict(_BASE, num_hidden_layers=3, head_dim=8, sliding_window=16),
    "gemma3_text": dict(_BASE, num_hidden_layers=3, head_dim=8, sliding_window=16, sliding_window_pattern=2),
    "phi3": dict(_BASE),
    "mixtral": dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, **_IDS),
    "gpt_neox": dict(_PLAIN),
    "bert": dict(_PLAIN),
}
DECODERS = [a for a in TINY if a != "bert"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def config(arch: str, **overrides: Any):
    return transformers.AutoConfig.for_model(arch, **{**TINY[arch], **overrides})


def config_dict(cfg) -> dict:
    d = cfg.to_dict()
    d["model_type"] = cfg.model_type
    return d


def model_class(arch: str):
    return transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM


def meta_model(cfg, dtype: str = "float32"):
    arch = cfg.model_type
    with torch.device("meta"):
        model = model_class(arch).from_config(cfg)
    return model.to(TORCH_DTYPES[dtype])


def random_model(cfg, dtype: str = "float32", seed: int = 0):
    torch.manual_seed(seed)
    return model_class(cfg.model_type).from_config(cfg).to(TORCH_DTYPES[dtype]).eval()


def unique_parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() de-duplicates


def under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cache_layer_bytes(out) -> list[int]:
    """Bytes transformers' DynamicCache holds per layer after a forward (keys + values)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return [int(layer.keys.nbytes + layer.values.nbytes) for layer in cache.layers]


def chat_llama(num_hidden_layers: int = 4, hidden_size: int = 32, intermediate_size: int = 48,
               max_position_embeddings: int = 256, std: float | None = 0.2, seed: int = 0):
    """(model, tokenizer): a tiny Llama with the demo's real tokenizer and chat template, random
    weights (matrices drawn with ``std`` so greedy output is not one repeated token), in eval mode."""
    from vramancer.runtime.demo_model import build_demo_tokenizer

    tok = build_demo_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model, tok
