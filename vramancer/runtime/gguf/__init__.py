"""GGUF (llama.cpp) files run as they are, weights kept quantized in the split runtime.

    dequant.py   GGUF blocks -> float32 in torch, on any device, bit for bit gguf-py's reference
    modules.py   GGUFWeight (a parametrization) and GGUFEmbedding: weights held as GGUF blocks
    load.py      a file's config, tensor names and tokenizer through transformers' GGUF support, its
                 weights swapped for their blocks (keep_quantized); runtime/loader.py load_gguf places
                 each tensor's blocks on its stage's device and attaches the split runtime
    write.py     write_gguf(model, path, qtype): a transformers Llama / Mistral / Qwen2/3 / Phi-3 /
                 Gemma2 written as llama.cpp's converter writes it
    quantize.py  K-quant encoders (Q4_K, Q5_K, Q6_K, ...) for write.py, where gguf-py has none

Nothing here is imported by ``import vramancer``.
"""
