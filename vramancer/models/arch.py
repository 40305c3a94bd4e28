"""The architecture table: from a transformers config dict (no torch, no transformers) the exact
parameter layout of the transformers model class (AutoModelForCausalLM for decoders, AutoModel
for encoders), split into blocks, with the per-token KV / activation / FLOP figures.

Blocks (docs/architecture.md): block 0 = what runs before the repeated layers (token embeddings, GPT-2's
position embeddings, BERT's embeddings, the rotary-embedding buffers), blocks 1..L = the layers
(``model.layers.i``, ``transformer.h.i``, ``gpt_neox.layers.i``, ``encoder.layer.i``), last block =
final norm + LM head (BERT: the pooler). ``modules`` are the module-name prefixes of the
transformers model, so a device_map built from them covers every parameter and buffer.

Per-layer formulas (documented once here; ``H`` hidden, ``q = heads x head_dim``,
``kv = kv_heads x head_dim``, ``I`` MLP intermediate, ``E`` experts, ``k`` experts per token):
    kv_elems_per_token  2 x kv_heads x head_dim      (K and V; GQA/MQA by kv_heads; MoE as dense;
                                                      encoders cache nothing)
    kv_window           the layer's sliding window (transformers' layer_types, or the config
                        rule that builds them: gemma2 every other layer, gemma3 pattern,
                        qwen2 use_sliding_window + max_window_layers, mistral v0.1 global window)
    act_elems_per_token 2H (residual + normed input) + q + 2kv (q, k, v) + q (attention output)
                        + H (o_proj output) + MLP: 3I gated (gate, up, act(gate)*up),
                        2I plain (fc, act); MoE: k x 3I_expert + E router logits (+ 3I_shared + 1)
    score_heads         heads (one (query x key) score each)
    attn_flops_per_token_per_ctx  4 x heads x head_dim  (QK^T: 2·q, AV: 2·q per context token)
    weights, flops, read bytes: from the parameters (see layout.py)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedCheckpointError, VramancerError
from .dtypes import DType, resolve_dtype
from .layout import ArchLayout, BlockLayout, TensorSpec, assemble_profile
from .profile import ModelProfile

__all__ = [
    "ARCHITECTURES",
    "MAX_LAYERS",
    "ArchSpec",
    "arch_spec",
    "check_config_values",
    "config_dtype",
    "config_errors",
    "config_quantization",
    "layer_windows",
    "layout_from_config",
    "profile_from_config",
]


@dataclass(frozen=True)
class ArchSpec:
    """One row of the table. ``defaults``: the transformers config class defaults for the keys
    used here, applied where a config.json leaves a key out. Bias flags are a config key to read
    or a constant."""

    model_type: str
    family: str                       # "llama" | "gpt2" | "gpt_neox" | "bert"
    defaults: dict[str, Any]
    kind: str = "causal-lm"
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    qk_norm: bool = False             # per-head RMSNorm on q and k (qwen3, gemma3)
    ffn_norms: bool = False           # pre/post feed-forward norms (gemma2, gemma3)
    fused: bool = False               # qkv_proj and gate_up_proj (phi3)
    moe: str | None = None            # "mixtral" | "qwen2_moe"
    head_dim_default: int | None = None  # head_dim when the config leaves it out (None: H / heads)


_LLAMA = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
              intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None)
_QWEN2 = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
              intermediate_size=22016, vocab_size=151936, max_position_embeddings=32768,
              tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28)

_TABLE: list[ArchSpec] = [
    ArchSpec("llama", "llama", _LLAMA, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    ArchSpec("mistral", "llama", dict(_LLAMA, num_key_value_heads=8, intermediate_size=14336,
                                      max_position_embeddings=131072, sliding_window=4096)),
    ArchSpec("qwen2", "llama", _QWEN2, qkv_bias=True),
    ArchSpec("qwen3", "llama", dict(_QWEN2, head_dim=128, attention_bias=False), qkv_bias="attention_bias",
             o_bias="attention_bias", qk_norm=True, head_dim_default=128),
    ArchSpec("gemma", "llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                    num_key_value_heads=16, intermediate_size=24576, vocab_size=256000,
                                    max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False),
             qkv_bias="attention_bias", o_bias="attention_bias", head_dim_default=256),
    ArchSpec("gemma2", "llama", dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                                     num_key_value_heads=4, intermediate_size=9216, vocab_size=256000,
                                     max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False,
                                     sliding_window=4096),
             qkv_bias="attention_bias", o_bias="attention_bias", ffn_norms=True, head_dim_default=256),
    ArchSpec("gemma3_text", "llama", dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                                          num_key_value_heads=4, intermediate_size=9216, vocab_size=262208,
                                          max_position_embeddings=131072, tie_word_embeddings=True,
                                          attention_bias=False, sliding_window=4096, sliding_window_pattern=6),
             qkv_bias="attention_bias", o_bias="attention_bias", ffn_norms=True, qk_norm=True, head_dim_default=256),
    ArchSpec("phi3", "llama", dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=None, intermediate_size=8192, vocab_size=32064,
                                   max_position_embeddings=4096, tie_word_embeddings=False, sliding_window=None),
             fused=True),
    ArchSpec("mixtral", "llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                      max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=None,
                                      num_local_experts=8, num_experts_per_tok=2),
             moe="mixtral"),
    ArchSpec("qwen2_moe", "llama", dict(_QWEN2, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                        num_key_value_heads=16, intermediate_size=5632, num_experts=60,
                                        num_experts_per_tok=4, moe_intermediate_size=1408,
                                        shared_expert_intermediate_size=5632, decoder_sparse_step=1,
                                        mlp_only_layers=[], qkv_bias=True),
             qkv_bias="qkv_bias", moe="qwen2_moe"),
    ArchSpec("gpt2", "gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                                  n_inner=None, tie_word_embeddings=True)),
    ArchSpec("gpt_neox", "gpt_neox", dict(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                                          intermediate_size=24576, vocab_size=50432, max_position_embeddings=2048,
                                          tie_word_embeddings=False, attention_bias=True)),
    ArchSpec("bert", "bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=30522, max_position_embeddings=512,
                                  type_vocab_size=2), kind="encoder"),
]
_SPECS: dict[str, ArchSpec] = {s.model_type: s for s in _TABLE}
ARCHITECTURES: tuple[str, ...] = tuple(_SPECS)


def arch_spec(model_type: str | None) -> ArchSpec | None:
    """The table row for a transformers ``model_type``, or None when it is not in the table."""
    return _SPECS.get(str(model_type)) if model_type else None


# Sizes a config may give: each, where present and not null, an integer in [low, high]. The highs
# are far beyond any published model (the largest have ~100 layers, 256 experts, 256k vocabularies)
# and keep every loop over layers, heads or experts short: a config saying 10**9 layers is refused
# in one line instead of building a billion blocks.
MAX_LAYERS = 1024
_SIZE_LIMITS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), (1, 2**20)),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers"), (1, MAX_LAYERS)),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads"), (1, 2**14)),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv"), (1, 2**14)),
    "head_dim": (1, 2**16),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"), (1, 2**24)),
    "shared_expert_intermediate_size": (0, 2**24),
    "vocab_size": (1, 2**26),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), (1, 2**31)),
    "type_vocab_size": (1, 2**16),
    **dict.fromkeys(("num_local_experts", "n_routed_experts"), (1, 2**14)),
    "num_experts": (0, 2**14),
    "num_experts_per_tok": (1, 2**14),
    "decoder_sparse_step": (0, MAX_LAYERS),
    "max_window_layers": (0, 2**31),
    **dict.fromkeys(("sliding_window", "attention_chunk_size"), (0, 2**31)),
    "sliding_window_pattern": (1, MAX_LAYERS),
}
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "qkv_bias",
          "use_bidirectional_attention")
_NUMERIC = (int, float)


def _size(origin: str, key: str, v: Any, low: int, high: int) -> int:
    """``v`` as an int in [low, high], or MalformedCheckpointError naming ``key`` and ``origin``.
    An integral float (4096.0) is accepted; NaN, infinities, fractions, booleans, strings are not."""
    if isinstance(v, bool) or not isinstance(v, _NUMERIC):
        raise MalformedCheckpointError(f"{origin}: {key} must be an integer, got {v!r:.60}")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise MalformedCheckpointError(f"{origin}: {key} must be an integer, got {v!r}")
    n = int(v)
    if not low <= n <= high:
        if n < low:
            need = "positive" if low == 1 else f"at least {low}"
            raise MalformedCheckpointError(f"{origin}: {key} must be {need}, got {n}")
        raise MalformedCheckpointError(f"{origin}: {key} = {n} is beyond any real model (at most {high})")
    return n


def check_config_values(config: dict, origin: str = "config") -> None:
    """Refuse, in one line naming the key, a config whose sizes are not integers in range (see
    ``_SIZE_LIMITS``), whose flags are not booleans, or whose ``layer_types`` / ``mlp_only_layers``
    are not lists of the right things. Applies to any model_type (the meta-device fallback too)
    and to a multimodal config's ``text_config``."""
    if not isinstance(config, dict):
        raise MalformedCheckpointError(f"{origin}: a config must be a JSON object")
    for key, (low, high) in _SIZE_LIMITS.items():
        v = config.get(key)
        if v is not None:
            _size(origin, key, v, low, high)
    for key in _FLAGS:
        v = config.get(key)
        if v is not None and not isinstance(v, bool) and v not in (0, 1):
            raise MalformedCheckpointError(f"{origin}: {key} must be true or false, got {v!r:.60}")
    types = config.get("layer_types")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        raise MalformedCheckpointError(f"{origin}: layer_types must be a list of strings")
    only = config.get("mlp_only_layers")
    if only is not None and (not isinstance(only, list)
                             or not all(isinstance(i, int) and not isinstance(i, bool) for i in only)):
        raise MalformedCheckpointError(f"{origin}: mlp_only_layers must be a list of layer numbers")
    text = config.get("text_config")
    if isinstance(text, dict) and text is not config:
        check_config_values(text, f"{origin} (text_config)")


@contextmanager
def config_errors(origin: str) -> Iterator[None]:
    """Any other way a config's values break the arithmetic that reads them (a type, a division,
    an overflow) is a malformed config, said in one line; VRAMancer's own errors pass."""
    try:
        yield
    except VramancerError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError, AttributeError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise MalformedCheckpointError(f"{origin}: malformed config ({type(e).__name__}"
                                       f"{': ' + detail[:200] if detail else ''})") from None


class _Cfg:
    """A config dict over the architecture's defaults; reading a missing required key is a
    malformed config."""

    def __init__(self, config: dict, defaults: dict, origin: str):
        self.d = dict(defaults)
        self.d.update(config)
        self.origin = origin

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key, default)
        return default if v is None else v

    def has_value(self, key: str) -> bool:
        return self.d.get(key) is not None

    def int(self, key: str, default: int | None = None, low: int | None = None) -> int:
        """An integer size; ``low`` defaults to the key's limit in ``_SIZE_LIMITS`` (else 0)."""
        v = self.d.get(key, default)
        if v is None:
            v = default
        if v is None:
            raise MalformedCheckpointError(f"{self.origin}: {key} is missing")
        lo, hi = _SIZE_LIMITS.get(key, (0, 2**40))
        return _size(self.origin, key, v, lo if low is None else low, hi)

    def flag(self, key_or_value: str | bool) -> bool:
        return bool(self.get(key_or_value, False)) if isinstance(key_or_value, str) else key_or_value


def layer_windows(model_type: str, config: dict, num_layers: int, defaults: dict | None = None) -> list[int | None]:
    """Sliding window (tokens) of each layer, None for full attention, following the rule
    transformers' config class uses to build ``layer_types`` (and DynamicCache from them)."""
    c = dict(defaults or {})
    c.update(config)
    sw = c.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        sw = sw if c.get("use_sliding_window") else None
    if model_type == "gemma3_text" and c.get("use_bidirectional_attention") and sw:
        sw = sw // 2 + 1
    types = c.get("layer_types")
    if not types:
        mwl = c.get("max_window_layers", 28)
        if model_type in ("qwen2", "qwen3"):
            types = ["sliding_attention" if sw is not None and i >= mwl else "full_attention"
                     for i in range(num_layers)]
        elif model_type == "qwen2_moe":
            types = ["sliding_attention" if (i + 1) % 2 and i < mwl and sw else "full_attention"
                     for i in range(num_layers)]
        elif model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        elif model_type == "gemma3_text":
            pattern = c.get("sliding_window_pattern") or 6
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        else:  # transformers' generic rule: a config-level sliding_window makes every layer sliding
            chunk = c.get("attention_chunk_size")
            types = ["sliding_attention" if sw is not None else
                     "chunked_attention" if chunk is not None else "full_attention"] * num_layers
    out: list[int | None] = []
    for i in range(num_layers):
        t = types[i] if i < len(types) else "full_attention"
        if t == "sliding_attention" and sw:
            out.append(int(sw))
        elif t == "chunked_attention" and c.get("attention_chunk_size"):
            out.append(int(c["attention_chunk_size"]))
        else:
            out.append(None)
    return out


def _embedding_and_head(b0: BlockLayout, head: BlockLayout, embed_key: str, vocab: int, hidden: int,
                        tied: bool) -> None:
    """Put the token embedding in block 0 and the LM head in the last block; tied, one tensor
    listed as shared by both (an embedding lookup in block 0, the head matmul in the last)."""
    if tied:
        b0.shared.append(TensorSpec(embed_key, (vocab, hidden), "embed"))
        head.shared.append(TensorSpec(embed_key, (vocab, hidden), "head"))
    else:
        b0.tensors.insert(0, TensorSpec(embed_key, (vocab, hidden), "embed"))
        head.tensors.append(TensorSpec("lm_head.weight", (vocab, hidden), "head"))


def _causal_lm(model_type: str, layers_prefix: str, blocks: list[BlockLayout], *, hidden: int,
               vocab: int, embed_key: str, tied: bool, max_positions: int | None) -> ArchLayout:
    return ArchLayout(model_type=model_type, kind="causal-lm", layers_prefix=layers_prefix, blocks=blocks,
                      hidden_size=hidden, num_layers=len(blocks) - 2, vocab_size=vocab,
                      max_position_embeddings=max_positions, tied_key=embed_key if tied else None,
                      head_name="lm_head.weight")


def _llama_family(spec: ArchSpec, c: _Cfg) -> ArchLayout:
    H = c.int("hidden_size")
    L = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    kvh = c.int("num_key_value_heads", heads)
    if heads % kvh:
        raise MalformedCheckpointError(f"{c.origin}: num_key_value_heads ({kvh}) must divide "
                                       f"num_attention_heads ({heads})")
    if not c.has_value("head_dim") and not spec.head_dim_default and heads > H:
        raise MalformedCheckpointError(f"{c.origin}: hidden_size ({H}) is smaller than num_attention_heads "
                                       f"({heads}): no head_dim")
    hd = c.int("head_dim", spec.head_dim_default or H // heads)
    V = c.int("vocab_size")
    I = c.int("intermediate_size")
    q, kv = heads * hd, kvh * hd
    tied = bool(c.get("tie_word_embeddings", False))
    qkv_bias, o_bias, mlp_bias = c.flag(spec.qkv_bias), c.flag(spec.o_bias), c.flag(spec.mlp_bias)
    windows = layer_windows(spec.model_type, c.d, L)

    embed_key = "model.embed_tokens.weight"
    b0 = BlockLayout("model.embed_tokens", ["model.embed_tokens", "model.rotary_emb"], act_elems_per_token=H)
    head = BlockLayout("lm_head", ["model.norm", "lm_head"], [TensorSpec("model.norm.weight", (H,), "vector")],
                       act_elems_per_token=H, logits_elems_per_token=V)
    _embedding_and_head(b0, head, embed_key, V, H, tied)

    layers = []
    for i in range(L):
        p = f"model.layers.{i}"
        t: list[TensorSpec] = []
        a = f"{p}.self_attn"
        if spec.fused:
            t.append(TensorSpec(f"{a}.qkv_proj.weight", (q + 2 * kv, H)))
        else:
            for n, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                t.append(TensorSpec(f"{a}.{n}.weight", (out, H)))
                if qkv_bias:
                    t.append(TensorSpec(f"{a}.{n}.bias", (out,), "vector"))
        t.append(TensorSpec(f"{a}.o_proj.weight", (H, q)))
        if o_bias:
            t.append(TensorSpec(f"{a}.o_proj.bias", (H,), "vector"))
        if spec.qk_norm:
            t += [TensorSpec(f"{a}.q_norm.weight", (hd,), "vector"), TensorSpec(f"{a}.k_norm.weight", (hd,), "vector")]
        m = f"{p}.mlp"
        fraction = 1.0
        if spec.moe == "mixtral":
            E, k = c.int("num_local_experts"), c.int("num_experts_per_tok")
            t += [TensorSpec(f"{m}.gate.weight", (E, H), "router"),
                  TensorSpec(f"{m}.experts.gate_up_proj", (E, 2 * I, H), "expert"),
                  TensorSpec(f"{m}.experts.down_proj", (E, H, I), "expert")]
            fraction = k / E if E else 1.0
            mlp_act = k * 3 * I + E
        elif spec.moe == "qwen2_moe" and _qwen2_moe_sparse(c, i):
            E, k = c.int("num_experts"), c.int("num_experts_per_tok")
            mI, sI = c.int("moe_intermediate_size"), c.int("shared_expert_intermediate_size")
            t += [TensorSpec(f"{m}.gate.weight", (E, H), "router"),
                  TensorSpec(f"{m}.experts.gate_up_proj", (E, 2 * mI, H), "expert"),
                  TensorSpec(f"{m}.experts.down_proj", (E, H, mI), "expert"),
                  TensorSpec(f"{m}.shared_expert.gate_proj.weight", (sI, H)),
                  TensorSpec(f"{m}.shared_expert.up_proj.weight", (sI, H)),
                  TensorSpec(f"{m}.shared_expert.down_proj.weight", (H, sI)),
                  TensorSpec(f"{m}.shared_expert_gate.weight", (1, H))]
            fraction = k / E if E else 1.0
            mlp_act = k * 3 * mI + E + 3 * sI + 1
        else:
            if spec.fused:
                t.append(TensorSpec(f"{m}.gate_up_proj.weight", (2 * I, H)))
            else:
                t += [TensorSpec(f"{m}.gate_proj.weight", (I, H)), TensorSpec(f"{m}.up_proj.weight", (I, H))]
            t.append(TensorSpec(f"{m}.down_proj.weight", (H, I)))
            if mlp_bias and not spec.fused:
                t += [TensorSpec(f"{m}.gate_proj.bias", (I,), "vector"),
                      TensorSpec(f"{m}.up_proj.bias", (I,), "vector"),
                      TensorSpec(f"{m}.down_proj.bias", (H,), "vector")]
            mlp_act = 3 * I
        norms = ["input_layernorm", "post_attention_layernorm"]
        if spec.ffn_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        t += [TensorSpec(f"{p}.{n}.weight", (H,), "vector") for n in norms]
        layers.append(BlockLayout(
            p, [p], t,
            kv_elems_per_token=2 * kv, kv_window=windows[i],
            act_elems_per_token=2 * H + q + 2 * kv + q + H + mlp_act,
            score_heads=heads, attn_flops_per_token_per_ctx=4.0 * heads * hd,
            expert_fraction=fraction,
        ))
    return _causal_lm(spec.model_type, "model.layers", [b0, *layers, head], hidden=H, vocab=V,
                      embed_key=embed_key, tied=tied, max_positions=c.get("max_position_embeddings"))


def _heads_divide(c: _Cfg, hidden: int, heads: int, h_key: str = "hidden_size",
                  n_key: str = "num_attention_heads") -> int:
    """head_dim of a model whose transformers class requires heads to divide the hidden size."""
    if hidden % heads:
        raise MalformedCheckpointError(f"{c.origin}: {h_key} ({hidden}) is not a multiple of {n_key} ({heads})")
    return hidden // heads


def _qwen2_moe_sparse(c: _Cfg, i: int) -> bool:
    step = c.int("decoder_sparse_step", 1) or 1
    return i not in (c.get("mlp_only_layers") or []) and c.int("num_experts") > 0 and (i + 1) % step == 0


def _gpt2(spec: ArchSpec, c: _Cfg) -> ArchLayout:
    H, L, heads = c.int("n_embd"), c.int("n_layer"), c.int("n_head")
    V, P = c.int("vocab_size"), c.int("n_positions")
    inner = c.int("n_inner", 4 * H)
    tied = bool(c.get("tie_word_embeddings", True))
    hd = _heads_divide(c, H, heads, "n_embd", "n_head")
    embed_key = "transformer.wte.weight"
    b0 = BlockLayout("transformer.wte", ["transformer.wte", "transformer.wpe"],
                     [TensorSpec("transformer.wpe.weight", (P, H), "embed")], act_elems_per_token=2 * H)
    head = BlockLayout("lm_head", ["transformer.ln_f", "lm_head"],
                       [TensorSpec("transformer.ln_f.weight", (H,), "vector"),
                        TensorSpec("transformer.ln_f.bias", (H,), "vector")],
                       act_elems_per_token=H, logits_elems_per_token=V)
    _embedding_and_head(b0, head, embed_key, V, H, tied)
    layers = []
    for i in range(L):
        p = f"transformer.h.{i}"
        # GPT-2 Conv1D stores weights as (in, out)
        t = [TensorSpec(f"{p}.ln_1.weight", (H,), "vector"), TensorSpec(f"{p}.ln_1.bias", (H,), "vector"),
             TensorSpec(f"{p}.attn.c_attn.weight", (H, 3 * H)), TensorSpec(f"{p}.attn.c_attn.bias", (3 * H,), "vector"),
             TensorSpec(f"{p}.attn.c_proj.weight", (H, H)), TensorSpec(f"{p}.attn.c_proj.bias", (H,), "vector"),
             TensorSpec(f"{p}.ln_2.weight", (H,), "vector"), TensorSpec(f"{p}.ln_2.bias", (H,), "vector"),
             TensorSpec(f"{p}.mlp.c_fc.weight", (H, inner)), TensorSpec(f"{p}.mlp.c_fc.bias", (inner,), "vector"),
             TensorSpec(f"{p}.mlp.c_proj.weight", (inner, H)), TensorSpec(f"{p}.mlp.c_proj.bias", (H,), "vector")]
        layers.append(BlockLayout(p, [p], t, kv_elems_per_token=2 * H,
                                  act_elems_per_token=2 * H + 3 * H + H + H + 2 * inner,
                                  score_heads=heads, attn_flops_per_token_per_ctx=4.0 * heads * hd))
    return _causal_lm("gpt2", "transformer.h", [b0, *layers, head], hidden=H, vocab=V,
                      embed_key=embed_key, tied=tied, max_positions=P)


def _gpt_neox(spec: ArchSpec, c: _Cfg) -> ArchLayout:
    H, L, heads = c.int("hidden_size"), c.int("num_hidden_layers"), c.int("num_attention_heads")
    V, I = c.int("vocab_size"), c.int("intermediate_size")
    hd = _heads_divide(c, H, heads)
    tied = bool(c.get("tie_word_embeddings", False))
    bias = bool(c.get("attention_bias", True))
    embed_key = "gpt_neox.embed_in.weight"
    b0 = BlockLayout("gpt_neox.embed_in", ["gpt_neox.embed_in", "gpt_neox.rotary_emb"], act_elems_per_token=H)
    head = BlockLayout("lm_head", ["gpt_neox.final_layer_norm", "lm_head"],
                       [TensorSpec("gpt_neox.final_layer_norm.weight", (H,), "vector"),
                        TensorSpec("gpt_neox.final_layer_norm.bias", (H,), "vector")],
                       act_elems_per_token=H, logits_elems_per_token=V)
    _embedding_and_head(b0, head, embed_key, V, H, tied)
    layers = []
    for i in range(L):
        p = f"gpt_neox.layers.{i}"
        t = [TensorSpec(f"{p}.{n}.{w}", (H,), "vector")
             for n in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")]
        t.append(TensorSpec(f"{p}.attention.query_key_value.weight", (3 * H, H)))
        if bias:
            t.append(TensorSpec(f"{p}.attention.query_key_value.bias", (3 * H,), "vector"))
        t.append(TensorSpec(f"{p}.attention.dense.weight", (H, H)))
        if bias:
            t.append(TensorSpec(f"{p}.attention.dense.bias", (H,), "vector"))
        t += [TensorSpec(f"{p}.mlp.dense_h_to_4h.weight", (I, H)),
              TensorSpec(f"{p}.mlp.dense_h_to_4h.bias", (I,), "vector"),
              TensorSpec(f"{p}.mlp.dense_4h_to_h.weight", (H, I)),
              TensorSpec(f"{p}.mlp.dense_4h_to_h.bias", (H,), "vector")]
        layers.append(BlockLayout(p, [p], t, kv_elems_per_token=2 * H,
                                  act_elems_per_token=2 * H + 3 * H + H + H + 2 * I,
                                  score_heads=heads, attn_flops_per_token_per_ctx=4.0 * heads * hd))
    return _causal_lm("gpt_neox", "gpt_neox.layers", [b0, *layers, head], hidden=H, vocab=V,
                      embed_key=embed_key, tied=tied, max_positions=c.get("max_position_embeddings"))


def _bert(spec: ArchSpec, c: _Cfg) -> ArchLayout:
    """BertModel (AutoModel): no KV cache (an encoder), no LM head; the pooler is the last block."""
    H, L, heads = c.int("hidden_size"), c.int("num_hidden_layers"), c.int("num_attention_heads")
    V, I = c.int("vocab_size"), c.int("intermediate_size")
    P, T = c.int("max_position_embeddings"), c.int("type_vocab_size")
    hd = _heads_divide(c, H, heads)
    e = "embeddings"
    b0 = BlockLayout(e, [e], [TensorSpec(f"{e}.word_embeddings.weight", (V, H), "embed"),
                              TensorSpec(f"{e}.position_embeddings.weight", (P, H), "embed"),
                              TensorSpec(f"{e}.token_type_embeddings.weight", (T, H), "embed"),
                              TensorSpec(f"{e}.LayerNorm.weight", (H,), "vector"),
                              TensorSpec(f"{e}.LayerNorm.bias", (H,), "vector")], act_elems_per_token=2 * H)
    layers = []
    for i in range(L):
        p = f"encoder.layer.{i}"

        def lin(n: str, o: int, i_: int, p: str = p) -> list[TensorSpec]:
            return [TensorSpec(f"{p}.{n}.weight", (o, i_)), TensorSpec(f"{p}.{n}.bias", (o,), "vector")]

        t = (lin("attention.self.query", H, H) + lin("attention.self.key", H, H) + lin("attention.self.value", H, H)
             + lin("attention.output.dense", H, H) + lin("intermediate.dense", I, H) + lin("output.dense", H, I))
        t += [TensorSpec(f"{p}.{n}.LayerNorm.{w}", (H,), "vector")
              for n in ("attention.output", "output") for w in ("weight", "bias")]
        layers.append(BlockLayout(p, [p], t, act_elems_per_token=2 * H + 3 * H + H + H + 2 * I,
                                  score_heads=heads, attn_flops_per_token_per_ctx=4.0 * heads * hd))
    pooler = BlockLayout("pooler", ["pooler"], [TensorSpec("pooler.dense.weight", (H, H)),
                                                TensorSpec("pooler.dense.bias", (H,), "vector")],
                         act_elems_per_token=H)
    return ArchLayout(model_type="bert", kind="encoder", layers_prefix="encoder.layer",
                      blocks=[b0, *layers, pooler], hidden_size=H, num_layers=L, vocab_size=V,
                      max_position_embeddings=P)


_FAMILIES: dict[str, Callable[[ArchSpec, _Cfg], ArchLayout]] = {
    "llama": _llama_family, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "bert": _bert,
}


def layout_from_config(config: dict, origin: str = "config") -> ArchLayout:
    """The exact parameter layout of a table architecture. Raises KeyError for a model_type not in
    the table (callers fall back to the meta device), MalformedCheckpointError for a config whose
    sizes are missing or not integers (``origin`` names the file in the message)."""
    if not isinstance(config, dict):
        raise MalformedCheckpointError(f"{origin}: a config must be a JSON object")
    check_config_values(config, origin)
    spec = arch_spec(config.get("model_type"))
    if spec is None:
        raise KeyError(config.get("model_type"))
    with config_errors(origin):
        layout = _FAMILIES[spec.family](spec, _Cfg(config, spec.defaults, origin))
    layout.config = dict(config)
    return layout


def config_dtype(config: dict | None) -> str | None:
    """The dtype a config declares (``dtype`` in transformers 5, ``torch_dtype`` before), when it
    names one we know; None otherwise ("auto", missing)."""
    if not config:
        return None
    for key in ("dtype", "torch_dtype"):
        v = config.get(key)
        if isinstance(v, str):
            try:
                return resolve_dtype(v).name
            except Exception:
                continue
    return None


def config_quantization(config: dict | None) -> tuple[str | None, str | None]:
    """(quant_method, our dtype name for it) from a config's ``quantization_config``:
    bitsandbytes 4-bit -> nf4, 8-bit -> int8, 4-bit GPTQ/AWQ -> int4; (None, None) without one.
    A ``quantization_config`` that is not an object (transformers reads it as one) is malformed."""
    q = (config or {}).get("quantization_config")
    if q is None:
        return None, None
    if not isinstance(q, dict):
        raise MalformedCheckpointError(f"config.json: quantization_config is a {type(q).__name__} "
                                       f"({str(q)[:40]!r}), expected an object such as "
                                       '{"quant_method": "bitsandbytes", ...}')
    method = str(q.get("quant_method") or "unknown")
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return method, "nf4"
        if q.get("load_in_8bit"):
            return method, "int8"
    if method in ("gptq", "awq") and (q.get("bits") or q.get("w_bit") or 4) == 4:
        return method, "int4"
    return method, None


def profile_from_config(config: dict, dtype: str | DType | None = None, *, name: str | None = None,
                        source: str = "config", path: str | None = None, origin: str = "config") -> ModelProfile:
    """Profile of a table architecture sized from its config in ``dtype`` (None: the config's
    dtype, its quantization, else float32 as transformers loads it). KeyError when the
    model_type is not in the table."""
    layout = layout_from_config(config, origin)
    method, qdtype = config_quantization(config)
    notes: list[str] = []
    if dtype is None:
        dtype = qdtype or config_dtype(config)
        if dtype is None:
            dtype = "float32"
            notes.append("the config names no dtype; sized in float32, as transformers loads it")
    dt = dtype if isinstance(dtype, DType) else resolve_dtype(dtype)
    return assemble_profile(layout, dt, name=name or str(config.get("_name_or_path") or layout.model_type),
                            source=source, path=path, quantization=method if qdtype == dt.name else
                            (dt.name if dt.quantized else None), notes=notes)
