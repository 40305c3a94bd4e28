"""Weight and cache data types: names people type, bytes per element, and bits per weight for quantized formats."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import WorkloadError

__all__ = ["DType", "resolve_dtype", "DTYPES", "dtype_bytes", "NF4_BLOCK", "Q8_0_BLOCK", "KV_DTYPES",
           "resolve_kv_dtype"]

NF4_BLOCK = 64   # weights per fp32 absmax in bitsandbytes' 4-bit storage (transformers' default, no double quant)
Q8_0_BLOCK = 32  # values per fp16 scale in GGUF / llama.cpp Q8_0 blocks (34 bytes a block)


@dataclass(frozen=True)
class DType:
    """``bits_per_weight`` is the average storage of a 2-D weight matrix, scales included
    (GGUF Q4_K is 144 bytes per 256 weights = 4.5 bits). ``compute`` is the float type the
    matmuls, activations and KV cache use with it."""

    name: str
    bits_per_weight: float
    compute: str
    quantized: bool = False
    torch_name: str | None = None
    # False where embeddings and the LM head stay at the compute dtype (bitsandbytes, GPTQ/AWQ
    # int4 replace nn.Linear layers only, and skip the output embedding); True for GGUF, where
    # token_embd and output are block-quantized like every other matrix.
    quantize_embeddings: bool = True
    # How one 2-D weight of shape (rows, cols) is stored when quantized on load (runtime/quant/):
    # "nf4": bitsandbytes Params4bit, two weights per byte + an fp32 absmax per block of 64 + its
    # 16-entry fp32 code table ("fp4": the same storage, FP4 levels); "int8": bitsandbytes Int8Params
    # or torchao Int8Tensor, one int8 per weight + an fp32 scale
    # per row (SCB). None: ``bits_per_weight`` averaged over the matrix (GGUF, sizing only).
    on_load: str | None = None

    @property
    def compute_bytes(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}[self.compute]

    def cache_bytes(self, n_elems: int) -> int:
        """Bytes of ``n_elems`` KV-cache values stored in this dtype (``--kv-dtype``): q8_0 is 32
        int8 values + one fp16 scale per block along the head dimension (34 bytes a block; heads
        are whole blocks, so ``n_elems`` is a multiple of 32), fp8 one byte a value, a float type
        its own size."""
        if self.name == "q8_0":
            return -(-n_elems // Q8_0_BLOCK) * (Q8_0_BLOCK + 2)
        if self.name == "fp8":
            return n_elems
        return n_elems * self.compute_bytes

    def matrix_bytes(self, n_weights: int) -> int:
        """Bytes of a 2-D weight of ``n_weights`` elements stored in this dtype (rounded up)."""
        return -(-int(n_weights * self.bits_per_weight) // 8)

    def weight_bytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of a >= 2-D weight of ``shape`` as the on-load quantizer stores it (scales
        included); ``matrix_bytes`` for formats without an on-load quantizer."""
        n = 1
        for d in shape:
            n *= int(d)
        if self.on_load in ("nf4", "fp4"):
            return -(-n // 2) + 4 * -(-n // NF4_BLOCK) + 4 * 16
        if self.on_load == "int8":
            return n + 4 * int(shape[0])
        return self.matrix_bytes(n)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in [
        DType("float32", 32, "float32", torch_name="float32"),
        DType("float16", 16, "float16", torch_name="float16"),
        DType("bfloat16", 16, "bfloat16", torch_name="bfloat16"),
        # bitsandbytes LLM.int8: int8 weights + one fp32 scale per row (exact: weight_bytes)
        DType("int8", 8, "bfloat16", quantized=True, quantize_embeddings=False, on_load="int8"),
        # bitsandbytes NF4/FP4, block 64, fp32 absmax -> 4 + 32/64 = 4.5 bits (exact: weight_bytes)
        DType("nf4", 4.5, "bfloat16", quantized=True, quantize_embeddings=False, on_load="nf4"),
        # bitsandbytes FP4 on load (runtime/quant/): NF4's storage, 4-bit floats instead of normal-float levels
        DType("int4", 4.5, "bfloat16", quantized=True, quantize_embeddings=False, on_load="fp4"),
        # GGUF block formats (ggml-common.h): bytes per block / weights per block * 8
        DType("q8_0", 34 * 8 / 32, "float16", quantized=True),
        # float8_e4m3fn: a KV-cache format (--kv-dtype fp8); as weights, sized only
        DType("fp8", 8, "bfloat16", quantized=True, torch_name="float8_e4m3fn"),
        DType("q6_k", 210 * 8 / 256, "float16", quantized=True),
        DType("q5_k_m", 5.69, "float16", quantized=True),  # mixed Q5_K/Q6_K, llama.cpp's quantize table
        DType("q4_k_m", 4.89, "float16", quantized=True),  # mixed Q4_K/Q6_K, llama.cpp's quantize table
        DType("q4_0", 18 * 8 / 32, "float16", quantized=True),
        DType("q3_k_m", 3.91, "float16", quantized=True),
        DType("q2_k", 84 * 8 / 256, "float16", quantized=True),
    ]
}

_ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "4bit": "nf4", "fp4": "int4", "8bit": "int8",
    "float8": "fp8", "float8_e4m3fn": "fp8", "f8_e4m3": "fp8", "e4m3": "fp8",
    "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m",
}


def resolve_dtype(name: str) -> DType:
    key = str(name).strip().lower().replace("torch.", "")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise WorkloadError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[key]


# what --kv-dtype accepts (llama.cpp -ctk/-ctv: f32, f16, bf16, q8_0; fp8 as vLLM's e4m3)
KV_DTYPES = ("bfloat16", "float16", "float32", "q8_0", "fp8")


def resolve_kv_dtype(name: str) -> DType:
    """A KV-cache dtype by the name people type (``q8_0``, ``fp8``, ``bf16``, ...); one line
    (WorkloadError, exit 2) for any other."""
    try:
        d = resolve_dtype(name)
    except WorkloadError:
        d = None
    if d is None or d.name not in KV_DTYPES:
        raise WorkloadError(f"--kv-dtype {name}: the KV cache is stored as one of {', '.join(KV_DTYPES)}")
    return d


def dtype_bytes(name: str) -> int:
    """Bytes per element of a float dtype name ("bfloat16" -> 2)."""
    return resolve_dtype(name).compute_bytes
