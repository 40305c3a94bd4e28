"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: gguf-py's
GGUFWriter, architecture "llama" with its ``llama.*`` hyperparameters, tensor names
``token_embd`` / ``blk.N.attn_q`` / ... / ``output``, q and k rows permuted to llama.cpp's rotary
layout, 1-D tensors in F32 and matrices in Q8_0 (quantised by gguf-py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_llama_gguf", "llama_cpp_permute"]

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, quantize: bool = True) -> Path:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")
            i, mod, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
            gname = f"blk.{i}.{_LAYER[mod]}.{suffix}"
            if mod == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if quantize and a.ndim == 2 and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
