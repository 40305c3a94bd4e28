"""What the GGUF tests compare against, made without our GGUF code: a float model whose weights are
gguf-py's numpy dequantization of a file's tensors, and the byte check of a loaded GGUF model."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

__all__ = ["dequantize_into", "check_gguf_bytes"]


def dequantize_into(model, path: Path):
    """``model`` (a transformers model of the file's architecture) with every weight replaced, in
    place, by gguf-py's numpy dequantization of the file's tensor, put through transformers' tensor
    processor of the architecture (Llama's q/k un-permutation, Gemma2's norms - 1); Mixtral's
    stacked experts ``[experts, rows, cols]`` as gate rows then up rows. Returns ``model``."""
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    arch = str(reader.fields["general.architecture"].contents())
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    tensors = {str(t.name): t for t in reader.tensors}
    proc = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={"num_attention_heads": cfg.num_attention_heads,
                                                                "num_key_value_heads": cfg.num_key_value_heads})

    def values_of(gname: str) -> np.ndarray:
        t = tensors[gname]
        return proc.process(dequantize(t.data, t.tensor_type), gname).weights

    with torch.no_grad():
        for name, p in model.named_parameters():          # tied weights once
            base, _, suffix = name.rpartition(".")
            if base.endswith(".mlp.experts"):
                blk = f"blk.{base.split('.')[2]}"
                parts = ("ffn_gate_exps", "ffn_up_exps") if suffix == "gate_up_proj" else ("ffn_down_exps",)
                values = np.concatenate([values_of(f"{blk}.{w}.weight") for w in parts], axis=1)
            else:
                values = values_of(f"{names.get_name(base)}.{suffix}")
            p.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(p.shape))
    return model


def check_gguf_bytes(model, path: Path) -> None:
    """Measured weights per stage == the plan's, byte for byte, and their sum == the file's tensor
    bytes (the tied table counted once per stage that holds a user of it)."""
    rep = model.vramancer.memory_report()
    assert [s.weights_bytes for s in rep.stages] == [s.weights_bytes for s in model.vramancer.plan.stages]
    file_bytes = {str(t.name): int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = 0
    if "output.weight" not in file_bytes:
        tied = file_bytes["token_embd.weight"] * (len({rep.stages[0].stage, rep.stages[-1].stage}) - 1)
    assert rep.weights_bytes == sum(file_bytes.values()) + tied
    assert all(not s.misplaced for s in rep.stages)
