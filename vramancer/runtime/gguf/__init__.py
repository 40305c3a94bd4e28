"""GGUF (llama.cpp) files run as they are, weights kept quantized in the split runtime.

    dequant.py   GGUF blocks -> float32 in torch, on any device, bit for bit gguf-py's reference
    modules.py   GGUFWeight (a parametrization) and GGUFEmbedding: weights held as GGUF blocks
    load.py      load_gguf(path, devices|plan): config, names and tokenizer through transformers' GGUF
                 support, each tensor's blocks read onto its stage's device, the split runtime attached
    write.py     write_gguf(model, path, qtype): a transformers Llama/Mistral/Qwen2 as llama.cpp writes it
    quantize.py  K-quant encoders (Q4_K, Q5_K, Q6_K, ...) for write.py, where gguf-py has none

Nothing here is imported by ``import vramancer``.
"""
