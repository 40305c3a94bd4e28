"""A model's parameter layout split into placement blocks, and how it becomes a ModelProfile.

Every source (architecture table, safetensors headers, GGUF header, nn.Module, meta-device
fallback) produces an ``ArchLayout``: per block, the tensors it owns (name, shape, role and,
when read from a checkpoint, their stored bytes), the tied tensors it uses, and the per-token
figures of its computation. ``assemble_profile`` turns a layout into the ModelProfile that the
planner and runtime read. No torch import here.

Formulas (all per token of one sequence; ``cb`` = bytes of the compute dtype):
    weights_bytes      sum of own tensors' bytes (see ``tensor_bytes``)
    kv_bytes_per_token kv_elems_per_token x bytes of the KV dtype (``DType.cache_bytes``: q8_0 is
                       34 bytes per 32 values, fp8 one byte a value)
    act_bytes_per_token act_elems_per_token x cb
    attn_score_bytes   score_heads x cb (one (query x key) score per head, as the eager / SDPA-math
                       path materialises it; fused flash / memory-efficient kernels hold none)
    logits_bytes_per_token  logits_elems_per_token x 4 (transformers upcasts logits to fp32)
    flops_per_token    2 x parameters a token multiplies with: embedding tables are looked up
                       (0 FLOPs), a tied embedding used as LM head is a matmul, MoE experts count
                       ``expert_fraction`` (num_experts_per_tok / num_experts) of their weights
    read_bytes_per_token bytes a decode step reads: one row of each embedding table, all other
                       tensors fully, MoE experts ``expert_fraction`` of theirs
    params             parameters the block owns; a tied tensor counts on the first block using it
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod

from .dtypes import DType
from .profile import BlockProfile, ModelKind, ModelProfile

__all__ = [
    "ROLES",
    "TensorSpec",
    "BlockLayout",
    "ArchLayout",
    "tensor_bytes",
    "assemble_profile",
    "with_kv_dtype",
]

# embed: an embedding table (looked up); head: the LM head matrix; expert: MoE expert weights
# (a token uses expert_fraction of them); router: an MoE layer's router; matrix: any other >= 2-D
# weight; vector: 1-D params.
ROLES = ("embed", "head", "matrix", "vector", "expert", "router")


@dataclass(frozen=True)
class TensorSpec:
    """One parameter. ``nbytes``: bytes as stored in a checkpoint when known (exact); None means
    size it from ``shape`` in the profile's dtype."""

    name: str
    shape: tuple[int, ...]
    role: str = "matrix"
    nbytes: int | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape) if self.shape else 1


def tensor_bytes(t: TensorSpec, dtype: DType) -> int:
    """Bytes of ``t``: its stored bytes when known, else its shape in ``dtype``.

    A quantized dtype stores >= 2-D weights (matrices, 3-D fused experts) at
    ``dtype.matrix_bytes``; embedding tables and the LM head too when
    ``dtype.quantize_embeddings`` (GGUF), else at the compute dtype (bitsandbytes, GPTQ);
    1-D parameters (norms, biases) always at the compute dtype. Routed MoE experts under a
    quantizer that runs on load (bitsandbytes, torchao) stay at the compute dtype too: transformers
    fuses them into 3-D parameters of an ``experts`` module, which those quantizers (``nn.Linear``
    only) leave as they are; so is their router (a ``TopKRouter`` parameter, not an ``nn.Linear``)."""
    if t.nbytes is not None:
        return t.nbytes
    n = t.numel
    if dtype.on_load is not None and t.role in ("expert", "router"):
        return n * dtype.compute_bytes
    if dtype.quantized and len(t.shape) >= 2 and (t.role not in ("embed", "head") or dtype.quantize_embeddings):
        return dtype.weight_bytes(t.shape) if len(t.shape) == 2 else dtype.matrix_bytes(n)
    return n * dtype.compute_bytes


@dataclass
class BlockLayout:
    """One block. ``shared``: tied tensors this block uses, each with its role in this block
    (the same key on every block that uses it). Per-token element counts are multiplied by the
    dtype's bytes in ``assemble_profile``."""

    name: str
    modules: list[str]
    tensors: list[TensorSpec] = field(default_factory=list)
    shared: list[TensorSpec] = field(default_factory=list)
    kv_elems_per_token: int = 0            # K + V elements cached per token (all kv heads)
    kv_window: int | None = None           # sliding window, None = the whole context
    act_elems_per_token: int = 0           # live activations per prefill token, compute dtype
    score_heads: int = 0                   # heads whose (query x key) scores may be materialised
    attn_flops_per_token_per_ctx: float = 0.0  # 2*heads*qk_dim (QK^T) + 2*heads*v_dim (AV)
    logits_elems_per_token: int = 0        # vocabulary size on the LM-head block
    expert_fraction: float = 1.0           # share of role "expert" weights one token uses

    @property
    def all_tensors(self) -> list[TensorSpec]:
        return self.tensors + self.shared


@dataclass
class ArchLayout:
    """A whole model: blocks in order (0 = before the repeated layers, 1..L = the layers,
    last = after them). ``tied_key``: the tensor shared by block 0 and the head, if any;
    ``head_name``: the LM-head parameter a tied checkpoint may carry and the model ignores."""

    model_type: str
    kind: ModelKind
    layers_prefix: str
    blocks: list[BlockLayout]
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    max_position_embeddings: int | None = None
    tied_key: str | None = None
    head_name: str | None = None
    config: dict | None = None
    notes: list[str] = field(default_factory=list)

    def with_block_tensors(self, tensors: list[list[TensorSpec]], shared: list[list[TensorSpec]]) -> ArchLayout:
        """A copy whose blocks own ``tensors[i]`` and use ``shared[i]`` (e.g. read from a checkpoint)."""
        blocks = [replace(b, tensors=list(t), shared=list(s)) for b, t, s in zip(self.blocks, tensors, shared)]
        return replace(self, blocks=blocks, notes=list(self.notes))


def _read_bytes(t: TensorSpec, nbytes: int, expert_fraction: float) -> int:
    if t.role == "embed":
        rows = t.shape[0] if t.shape else 1
        return -(-nbytes // max(rows, 1))  # one row per lookup
    if t.role == "expert":
        return int(round(nbytes * expert_fraction))
    return nbytes


def _flops(t: TensorSpec, expert_fraction: float) -> float:
    if t.role == "embed":
        return 0.0
    if t.role == "expert":
        return 2.0 * t.numel * expert_fraction
    return 2.0 * t.numel


def _experts_module(names: list[str]) -> str:
    """The module holding routed experts named ``names`` (``...mlp.experts.gate_up_proj`` ->
    ``...mlp.experts``; per-expert checkpoint names ``...experts.0.w1.weight`` too), "" if none or
    if they are not under one ``experts`` module."""
    mods = set()
    for n in names:
        parts = n.split(".")
        if "experts" not in parts:
            return ""
        mods.add(".".join(parts[:parts.index("experts") + 1]))
    return mods.pop() if len(mods) == 1 else ""


def assemble_profile(layout: ArchLayout, dtype: DType, *, name: str, source: str,
                     kv_dtype: DType | None = None, path: str | None = None,
                     quantization: str | None = None, notes: list[str] | None = None,
                     dtype_name: str | None = None) -> ModelProfile:
    """The ModelProfile of ``layout`` in ``dtype`` (formulas in the module docstring).
    ``kv_dtype`` defaults to the compute dtype of ``dtype``."""
    from .dtypes import resolve_dtype

    kv = kv_dtype or resolve_dtype(dtype.compute)
    cb = dtype.compute_bytes
    seen_shared: set[str] = set()
    blocks: list[BlockProfile] = []
    for b in layout.blocks:
        own = [(t, tensor_bytes(t, dtype)) for t in b.tensors]
        shared = [(t, tensor_bytes(t, dtype)) for t in b.shared]
        params = sum(t.numel for t, _ in own)
        for t, _ in shared:
            if t.name not in seen_shared:
                seen_shared.add(t.name)
                params += t.numel
        used = own + shared
        experts = [(t, n) for t, n in own if t.role == "expert"]
        blocks.append(BlockProfile(
            name=b.name,
            weights_bytes=sum(n for _, n in own),
            modules=list(b.modules),
            shared={t.name: n for t, n in shared},
            kv_bytes_per_token=kv.cache_bytes(b.kv_elems_per_token),
            kv_window=b.kv_window,
            act_bytes_per_token=b.act_elems_per_token * cb,
            attn_score_bytes=b.score_heads * cb,
            logits_bytes_per_token=b.logits_elems_per_token * 4,
            flops_per_token=sum(_flops(t, b.expert_fraction) for t, _ in used),
            attn_flops_per_token_per_ctx=float(b.attn_flops_per_token_per_ctx),
            read_bytes_per_token=sum(_read_bytes(t, n, b.expert_fraction) for t, n in used),
            params=params,
            experts_bytes=sum(n for _, n in experts),
            experts_read_bytes_per_token=sum(_read_bytes(t, n, b.expert_fraction) for t, n in experts),
            experts_flops_per_token=sum(_flops(t, b.expert_fraction) for t, _ in experts),
            experts_module=_experts_module([t.name for t, _ in experts]),
        ))
    return ModelProfile(
        name=name,
        arch=layout.model_type,
        kind=layout.kind,
        dtype=dtype_name or dtype.name,
        blocks=blocks,
        source=source,
        hidden_size=layout.hidden_size,
        num_layers=layout.num_layers,
        vocab_size=layout.vocab_size,
        max_position_embeddings=layout.max_position_embeddings,
        kv_dtype=kv.name,
        layers_prefix=layout.layers_prefix,
        config=layout.config,
        path=path,
        quantization=quantization,
        notes=list(layout.notes) + list(notes or []),
    )


def _kv_head_dim(config: dict | None) -> int | None:
    """The head size the KV cache stores (``head_dim``, else hidden / heads), None if unknown."""
    if not config:
        return None
    cfg = config.get("text_config") or config
    hd = cfg.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def with_kv_dtype(profile: ModelProfile, kv: DType) -> ModelProfile:
    """``profile`` with its KV cache stored as ``kv`` (``--kv-dtype``): every block's
    ``kv_bytes_per_token`` recomputed from its element count (its bytes in the profile's own KV
    dtype). A q8_0 cache needs whole 32-value blocks per head: refused (WorkloadError) for a head
    size that is not a multiple of 32, as llama.cpp does."""
    from ..errors import WorkloadError
    from .dtypes import Q8_0_BLOCK, resolve_dtype

    old = resolve_dtype(profile.kv_dtype)
    if old.name == kv.name:
        return profile
    if kv.name == "q8_0":
        hd = _kv_head_dim(profile.config)
        if hd is not None and hd % Q8_0_BLOCK:
            raise WorkloadError(f"--kv-dtype q8_0 stores blocks of {Q8_0_BLOCK} values per head; "
                                f"{profile.name}'s head size is {hd} (use --kv-dtype fp8 or bf16)")
    per_elem = old.cache_bytes(Q8_0_BLOCK)   # bytes of 32 values in the old format
    blocks = [replace(b, kv_bytes_per_token=kv.cache_bytes(b.kv_bytes_per_token * Q8_0_BLOCK // per_elem))
              for b in profile.blocks]
    return replace(profile, blocks=blocks, kv_dtype=kv.name)
