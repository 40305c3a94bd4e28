"""The model catalog: published hyperparameters of popular models, so planning works with no download.

Each causal LM carries the fields of its published Hugging Face ``config.json`` that a profile needs,
with the published values (``transformers.AutoConfig.for_model(**entry.config)`` builds it). Each
diffusion model carries its diffusers config and its parameter count per placement block (counted
once from the published config on the meta device; ``tests/catalog`` re-derives them).
This module is pure data: it imports neither torch nor transformers.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CatalogModel", "DiffusionBlock", "MODELS", "find_model", "list_models", "suggest_models"]

CatalogKind = Literal["causal-lm", "diffusion"]

# (block name, module name prefixes in the model, parameter count), in placement order
DiffusionBlock = tuple[str, tuple[str, ...], int]


@dataclass(frozen=True)
class CatalogModel:
    """One catalog model. ``config``: the published config fields (transformers for causal LMs,
    diffusers for diffusion models, with ``_class_name``); use :meth:`config_copy` to get a dict you
    may change. ``params_published``: the parameter count the model card states. ``blocks``: for
    diffusion models, the parameter count of each placement block."""

    key: str
    hf_id: str
    kind: CatalogKind
    config: dict[str, Any] = field(hash=False)
    description: str
    params_published: int
    aliases: tuple[str, ...] = ()
    default_dtype: str = "bfloat16"
    blocks: tuple[DiffusionBlock, ...] = ()

    def config_copy(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)

    @property
    def arch(self) -> str:
        """The model class: ``LlamaForCausalLM``, ``FluxTransformer2DModel``, ..."""
        if "_class_name" in self.config:
            return str(self.config["_class_name"])
        return str(self.config["architectures"][0])


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, *, tie: bool = False,
           rope_factor: float = 8.0, head_dim: int | None = None) -> dict[str, Any]:
    """meta-llama/Llama-3.x config.json (the fields a profile needs, published values)."""
    cfg: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": tie, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "rope_scaling": _llama3_rope(rope_factor), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, *, rms: float,
            max_window_layers: int) -> dict[str, Any]:
    """Qwen/Qwen2.5-*-Instruct config.json."""
    return {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 152064,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": rms,
        "rope_theta": 1000000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": max_window_layers,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }


def _gemma2(hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int,
            query_pre_attn_scalar: int) -> dict[str, Any]:
    """google/gemma-2-*-it config.json."""
    return {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": 256000, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        "query_pre_attn_scalar": query_pre_attn_scalar, "sliding_window": 4096,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "cache_implementation": "hybrid", "torch_dtype": "bfloat16",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    }


def _phi3(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    """microsoft/Phi-3-*-4k-instruct config.json."""
    return {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 32064,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "sliding_window": 2047, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    }


def _mistral(hidden: int, layers: int, vocab: int, max_pos: int, head_dim: int | None = None) -> dict[str, Any]:
    """mistralai/Mistral-*-Instruct config.json."""
    cfg: dict[str, Any] = {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": hidden, "intermediate_size": 14336, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "hidden_act": "silu", "sliding_window": None, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


# --- diffusion: published diffusers configs and per-block parameter counts ---------------------

# black-forest-labs/FLUX.1-dev, transformer/config.json
_FLUX_DEV_CONFIG: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
# Parameter counts of FluxTransformer2DModel(**_FLUX_DEV_CONFIG) on meta (diffusers 0.42):
# embedders 12,585,984 (context) + 199,680 (x) + 32,262,144 (time/guidance/text) = 45,047,808;
# each double-stream block 339,831,296; each single-stream block 141,591,808;
# norm_out 18,880,512 + proj_out 196,672 = 19,077,184. Total 11,901,408,320.
_FLUX_DEV_BLOCKS: tuple[DiffusionBlock, ...] = (
    ("embed", ("x_embedder", "context_embedder", "time_text_embed", "pos_embed"), 45_047_808),
    *((f"transformer_blocks.{i}", (f"transformer_blocks.{i}",), 339_831_296) for i in range(19)),
    *((f"single_transformer_blocks.{i}", (f"single_transformer_blocks.{i}",), 141_591_808) for i in range(38)),
    ("out", ("norm_out", "proj_out"), 19_077_184),
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
_SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# Parameter counts of UNet2DConditionModel(**_SDXL_UNET_CONFIG) on meta (diffusers 0.42), total 2,567,463,684.
_SDXL_UNET_BLOCKS: tuple[DiffusionBlock, ...] = (
    ("embed", ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding"),
     11_840 + 2_050_560 + 5_245_440),
    ("down_blocks.0", ("down_blocks.0",), 5_432_000),
    ("down_blocks.1", ("down_blocks.1",), 60_105_600),
    ("down_blocks.2", ("down_blocks.2",), 757_404_160),
    ("mid_block", ("mid_block",), 413_117_440),
    ("up_blocks.0", ("up_blocks.0",), 1_206_568_960),
    ("up_blocks.1", ("up_blocks.1",), 106_343_680),
    ("up_blocks.2", ("up_blocks.2",), 11_171_840),
    ("out", ("conv_norm_out", "conv_act", "conv_out"), 640 + 11_524),
)


# fmt: off
_ENTRIES: tuple[CatalogModel, ...] = (
    CatalogModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "causal-lm",
                 _llama(4096, 14336, 32, 32, 8),
                 "Meta Llama 3.1 8B Instruct: 32 layers, GQA 32/8 heads, 128k context", 8_030_000_000,
                 ("llama3.1-8b", "llama-3.1-8b-instruct", "meta-llama-3.1-8b-instruct")),
    CatalogModel("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", "causal-lm",
                 _llama(8192, 28672, 80, 64, 8),
                 "Meta Llama 3.1 70B Instruct: 80 layers, GQA 64/8 heads, 128k context", 70_600_000_000,
                 ("llama3.1-70b", "llama-3.1-70b-instruct", "meta-llama-3.1-70b-instruct")),
    CatalogModel("llama-3.1-405b", "meta-llama/Llama-3.1-405B-Instruct", "causal-lm",
                 _llama(16384, 53248, 126, 128, 8),
                 "Meta Llama 3.1 405B Instruct: 126 layers, GQA 128/8 heads, 128k context", 405_900_000_000,
                 ("llama3.1-405b", "llama-3.1-405b-instruct", "meta-llama-3.1-405b-instruct")),
    CatalogModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "causal-lm",
                 _llama(2048, 8192, 16, 32, 8, tie=True, rope_factor=32.0, head_dim=64),
                 "Meta Llama 3.2 1B Instruct: 16 layers, tied embeddings, 128k context", 1_240_000_000,
                 ("llama3.2-1b", "llama-3.2-1b-instruct")),
    CatalogModel("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "causal-lm",
                 _llama(3072, 8192, 28, 24, 8, tie=True, rope_factor=32.0, head_dim=128),
                 "Meta Llama 3.2 3B Instruct: 28 layers, tied embeddings, 128k context", 3_210_000_000,
                 ("llama3.2-3b", "llama-3.2-3b-instruct")),
    CatalogModel("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", "causal-lm",
                 _llama(8192, 28672, 80, 64, 8),
                 "Meta Llama 3.3 70B Instruct: the 3.1 70B architecture, 128k context", 70_600_000_000,
                 ("llama3.3-70b", "llama-3.3-70b-instruct")),
    CatalogModel("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "causal-lm",
                 _mistral(4096, 32, 32768, 32768),
                 "Mistral 7B Instruct v0.3: 32 layers, GQA 32/8 heads, 32k context", 7_250_000_000,
                 ("mistral-7b-v0.3", "mistral-7b-instruct", "mistral-7b-instruct-v0.3")),
    CatalogModel("mistral-nemo-12b", "mistralai/Mistral-Nemo-Instruct-2407", "causal-lm",
                 _mistral(5120, 40, 131072, 1024000, head_dim=128),
                 "Mistral NeMo 12B Instruct (2407): 40 layers, GQA 32/8 heads, 128k context", 12_200_000_000,
                 ("mistral-nemo", "mistral-nemo-instruct-2407", "nemo-12b")),
    CatalogModel("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", "causal-lm",
                 {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                  "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-05,
                  "rope_theta": 1000000.0, "hidden_act": "silu", "sliding_window": None,
                  "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
                  "output_router_logits": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
                 "Mixtral 8x7B Instruct v0.1: sparse MoE, 8 experts (2 active), 32k context", 46_700_000_000,
                 ("mixtral", "mixtral-8x7b-instruct", "mixtral-8x7b-instruct-v0.1")),
    CatalogModel("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "causal-lm",
                 _qwen25(3584, 18944, 28, 28, 4, rms=1e-06, max_window_layers=28),
                 "Qwen2.5 7B Instruct: 28 layers, GQA 28/4 heads, QKV bias", 7_610_000_000,
                 ("qwen2.5-7b-instruct", "qwen-2.5-7b")),
    CatalogModel("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", "causal-lm",
                 _qwen25(5120, 13824, 48, 40, 8, rms=1e-06, max_window_layers=70),
                 "Qwen2.5 14B Instruct: 48 layers, GQA 40/8 heads, QKV bias", 14_700_000_000,
                 ("qwen2.5-14b-instruct", "qwen-2.5-14b")),
    CatalogModel("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", "causal-lm",
                 _qwen25(5120, 27648, 64, 40, 8, rms=1e-06, max_window_layers=70),
                 "Qwen2.5 32B Instruct: 64 layers, GQA 40/8 heads, QKV bias", 32_500_000_000,
                 ("qwen2.5-32b-instruct", "qwen-2.5-32b")),
    CatalogModel("qwen2.5-72b", "Qwen/Qwen2.5-72B-Instruct", "causal-lm",
                 _qwen25(8192, 29568, 80, 64, 8, rms=1e-06, max_window_layers=70),
                 "Qwen2.5 72B Instruct: 80 layers, GQA 64/8 heads, QKV bias", 72_700_000_000,
                 ("qwen2.5-72b-instruct", "qwen-2.5-72b")),
    CatalogModel("qwen3-8b", "Qwen/Qwen3-8B", "causal-lm",
                 {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                  "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "max_position_embeddings": 40960, "tie_word_embeddings": False, "rms_norm_eps": 1e-06,
                  "rope_theta": 1000000, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
                  "sliding_window": None, "use_sliding_window": False, "max_window_layers": 36,
                  "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645},
                 "Qwen3 8B: 36 layers, GQA 32/8 heads, QK-norm, 40k context", 8_200_000_000,
                 ("qwen-3-8b",)),
    CatalogModel("gemma-2-9b", "google/gemma-2-9b-it", "causal-lm",
                 _gemma2(3584, 14336, 42, 16, 8, head_dim=256, query_pre_attn_scalar=256),
                 "Gemma 2 9B IT: 42 layers, alternating 4k sliding-window / global attention", 9_240_000_000,
                 ("gemma2-9b", "gemma-2-9b-it")),
    CatalogModel("gemma-2-27b", "google/gemma-2-27b-it", "causal-lm",
                 _gemma2(4608, 36864, 46, 32, 16, head_dim=128, query_pre_attn_scalar=144),
                 "Gemma 2 27B IT: 46 layers, alternating 4k sliding-window / global attention", 27_200_000_000,
                 ("gemma2-27b", "gemma-2-27b-it")),
    CatalogModel("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "causal-lm",
                 _phi3(3072, 8192, 32, 32, 32),
                 "Phi-3 mini 4k instruct: 3.8B, 32 layers, full multi-head attention", 3_821_079_552,
                 ("phi3-mini", "phi-3-mini-4k", "phi-3-mini-4k-instruct")),
    CatalogModel("phi-3-medium", "microsoft/Phi-3-medium-4k-instruct", "causal-lm",
                 _phi3(5120, 17920, 40, 40, 10),
                 "Phi-3 medium 4k instruct: 14B, 40 layers, GQA 40/10 heads", 14_000_000_000,
                 ("phi3-medium", "phi-3-medium-4k", "phi-3-medium-4k-instruct")),
    CatalogModel("gpt2", "openai-community/gpt2", "causal-lm",
                 {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12,
                  "n_head": 12, "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "tie_word_embeddings": True,
                  "bos_token_id": 50256, "eos_token_id": 50256},
                 "GPT-2 small (124M): 12 layers, learned positions, tied embeddings; float32 checkpoint",
                 124_000_000, ("gpt2-small", "gpt-2"), default_dtype="float32"),
    CatalogModel("flux.1-dev", "black-forest-labs/FLUX.1-dev", "diffusion", _FLUX_DEV_CONFIG,
                 "FLUX.1 [dev] transformer: 19 double-stream + 38 single-stream MMDiT blocks, 12B",
                 12_000_000_000, ("flux-dev", "flux1-dev", "flux", "flux.1-dev-transformer"),
                 blocks=_FLUX_DEV_BLOCKS),
    CatalogModel("sdxl-unet", "stabilityai/stable-diffusion-xl-base-1.0", "diffusion", _SDXL_UNET_CONFIG,
                 "Stable Diffusion XL base 1.0 UNet (2.6B): 3 down, mid, 3 up blocks",
                 2_567_463_684, ("sdxl", "sdxl-base", "stable-diffusion-xl-base-1.0", "sdxl-base-1.0"),
                 blocks=_SDXL_UNET_BLOCKS),
)
# fmt: on

MODELS: dict[str, CatalogModel] = {m.key: m for m in _ENTRIES}


def _norm(name: str) -> str:
    """Case-insensitive, punctuation-insensitive key: "Llama-3.1-70B-Instruct" -> "llama3170binstruct"."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _build_index() -> dict[str, CatalogModel]:
    index: dict[str, CatalogModel] = {}
    for m in _ENTRIES:
        repo_name = m.hf_id.split("/", 1)[-1]
        for text in (m.key, m.hf_id, repo_name, *m.aliases):
            index.setdefault(_norm(text), m)
    return index


_INDEX = _build_index()


def find_model(name: str) -> CatalogModel | None:
    """The catalog model ``name`` means: key, alias, HF id or HF repo name, any case
    ("llama-3.1-70b", "llama3.1-70b", "Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B-Instruct").
    None if it is not in the catalog."""
    if not isinstance(name, str) or not name.strip():
        return None
    return _INDEX.get(_norm(name.strip()))


def suggest_models(name: str, n: int = 2) -> list[str]:
    """Catalog keys close to ``name`` (a typo, another spelling), best first; [] when none is close.
    Compared on the normalized forms of every key, alias and HF name (difflib's ratio >= 0.75);
    a runner-up is kept only when it is about as close as the best (within 0.05)."""
    import difflib

    text = _norm(name)
    if not text:
        return []
    best: dict[str, float] = {}
    for candidate, model in _INDEX.items():
        ratio = difflib.SequenceMatcher(None, text, candidate).ratio()
        if ratio >= 0.75 and ratio > best.get(model.key, 0.0):
            best[model.key] = ratio
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    return [key for key, ratio in ranked if ratio >= ranked[0][1] - 0.05][:n]


def list_models() -> list[CatalogModel]:
    """Every catalog model, causal LMs first, in catalog order."""
    return list(_ENTRIES)
