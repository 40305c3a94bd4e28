"""Write a transformers model of the Llama family (Llama, Mistral, Qwen2/3, Phi-3, Gemma2) as a GGUF file the way
llama.cpp's ``convert_hf_to_gguf.py`` does: llama.cpp tensor names (``blk.N.attn_q.weight``), the
q/k rows of Llama and Mistral permuted to llama.cpp's rotary layout, Gemma2's norms stored as 1 + w,
1-D tensors in F32, matrices in
the requested type (a matrix whose rows are not whole blocks of it falls back to ``fallback``), the
architecture's hyperparameters and a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``,
with its chat template) in the metadata.

Used by the tests and the benchmark to make real GGUF files from small random models; the
quantization itself is gguf-py's (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) or ours (K-quants, see
quantize.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BadInputError
from .dequant import gguf_type

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import nn

__all__ = ["GGUFExport", "write_gguf", "llama_cpp_permute"]

# transformers model_type -> (GGUF general.architecture, q/k rows permuted as llama.cpp does)
_ARCHES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                        "qwen2": ("qwen2", False), "qwen3": ("qwen3", False), "phi3": ("phi3", False),
                                        "gemma2": ("gemma2", False)}
# llama.cpp stores these architectures' RMSNorm weights as 1 + w (transformers' Gemma norms scale by 1 + w)
_NORM_PLUS_ONE = ("gemma2",)


@dataclass(frozen=True)
class GGUFExport:
    """What was written: the file, and each tensor's GGUF type name by GGUF tensor name."""

    path: Path
    tensor_types: dict[str, str]

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved (the inverse of
    transformers' LlamaTensorProcessor._reverse_permute_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _encode(values: np.ndarray, type_name: str) -> np.ndarray:
    """``values`` (float32 [rows, cols]) as the bytes or array GGUFWriter stores for ``type_name``."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    qt = GGMLQuantizationType[type_name]
    try:
        return quantize(values, qt)
    except NotImplementedError:
        from .quantize import quantize_k

        return quantize_k(values, type_name)


def _tokenizer_fields(writer: Any, tokenizer: Any) -> None:
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast over a tokenizers BPE model) as llama.cpp
    writes one: tokens in id order, token types (3 = control for special tokens), merges."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise BadInputError("only byte-level BPE tokenizers can be written to GGUF here")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: nn.Module, path: str | Path, qtype: str = "F32", *, tokenizer: Any = None,
               fallback: str = "F32", name: str | None = None) -> GGUFExport:
    """Write ``model`` (a transformers Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma2 causal LM) to ``path`` with its
    matrices in ``qtype`` (any type of dequant.GGUF_TYPES)."""
    import numpy as np
    import torch
    from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map

    cfg = model.config
    if cfg.model_type not in _ARCHES:
        raise BadInputError(f"cannot write {cfg.model_type} models to GGUF (supported: {', '.join(_ARCHES)})")
    arch, permute = _ARCHES[cfg.model_type]
    want = gguf_type(qtype).name
    fb = gguf_type(fallback).name
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name or f"{cfg.model_type}-vramancer")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(int(cfg.sliding_window))
    for attr, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                      ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(cfg, attr, None) is not None:
            add(float(getattr(cfg, attr)))
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        _tokenizer_fields(writer, tokenizer)
    types: dict[str, str] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    with torch.no_grad():
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            base, _, suffix = hf_name.rpartition(".")
            gname = names.get_name(base)
            if gname is None:
                raise BadInputError(f"no GGUF name for {hf_name}")
            gname = f"{gname}.{suffix}"
            values = t.detach().to(torch.float32).cpu().numpy()
            if permute and suffix == "weight" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                values = llama_cpp_permute(values, heads, heads if base.endswith("q_proj") else kv_heads)
            if cfg.model_type in _NORM_PLUS_ONE and base.endswith("norm") and suffix == "weight":
                values = values + np.float32(1.0)
            if values.ndim < 2:
                tname = "F32"
            else:
                tname = want if values.shape[-1] % gguf_type(want).block_values == 0 else fb
            data = _encode(np.ascontiguousarray(values), tname)
            from gguf import GGMLQuantizationType

            writer.add_tensor(gname, data, raw_dtype=GGMLQuantizationType[tname] if data.dtype == np.uint8 else None)
            types[gname] = tname
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFExport(path, types)


def main(argv: list[str] | None = None) -> int:
    """``python -m vramancer.runtime.gguf.write SRC DST [QTYPE]``: a transformers folder written as a
    GGUF file (its byte-level BPE tokenizer and chat template included when it has one)."""
    import argparse
    import sys

    from ...errors import VramancerError

    ap = argparse.ArgumentParser(prog="python -m vramancer.runtime.gguf.write", description=main.__doc__)
    ap.add_argument("src", help="transformers folder (config.json + safetensors)")
    ap.add_argument("dst", help="the .gguf file to write")
    ap.add_argument("qtype", nargs="?", default="Q8_0", help="type of the matrices (F32, F16, Q8_0, Q4_K, ...)")
    ap.add_argument("--fallback", default="F16", help="type of matrices whose rows are not whole blocks")
    args = ap.parse_args(argv)
    try:
        import transformers

        folder = Path(args.src)
        if not (folder / "config.json").is_file():
            raise BadInputError(f"{folder}: not a transformers folder (no config.json)")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            tok = None
        out = write_gguf(model, args.dst, args.qtype, tokenizer=tok, fallback=args.fallback)
    except VramancerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{out.path}: {out.nbytes:,} bytes, {len(out.tensor_types)} tensors "
          f"({', '.join(sorted(set(out.tensor_types.values())))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
