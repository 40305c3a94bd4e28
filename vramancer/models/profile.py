"""ModelProfile: what a model needs, per block, without loading its weights.

Blocks follow docs/architecture.md: block 0 is what runs before the first repeated layer
(embeddings), blocks 1..L the repeated layers in order, block L+1 what runs after
(final norm, LM head, pooler). Units are bytes and FLOPs; "per token" means per
token of one sequence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["BlockProfile", "ModelProfile", "ModelKind"]

ModelKind = Literal["causal-lm", "encoder", "diffusion"]


@dataclass
class BlockProfile:
    """One placement unit.

    weights_bytes        bytes of the parameters this block owns (as stored / as loaded in the dtype)
    shared               tied parameters this block uses: {param name: bytes}; counted once on every
                         stage holding any block that lists it (tied embeddings + LM head)
    modules              module name prefixes (transformers names) that belong to the block
    kv_bytes_per_token   KV cache for one token of one sequence (K and V, all heads, this block)
    kv_window            sliding window in tokens (the cache never holds more), None = full context
    act_bytes_per_token  activation workspace per prefill token while this block runs
                         (hidden in/out, MLP intermediate, q/k/v), excluding attention scores
    attn_score_bytes     bytes per (query token x key token) for attention scores; 0 if no attention
    logits_bytes_per_token  LM-head logits per token (fp32), only on the block with the head
    flops_per_token      forward FLOPs per token excluding attention over the context
    attn_flops_per_token_per_ctx  extra FLOPs per token per context token (QK^T and AV)
    read_bytes_per_token bytes read per decode step (weights actually used: active experts only for MoE)
    experts_bytes        of weights_bytes, the MoE routed experts' (role "expert" tensors), 0 if none
    experts_read_bytes_per_token  of read_bytes_per_token, the routed experts' (the top-k used per token)
    experts_flops_per_token       of flops_per_token, the routed experts'
    experts_module       module name of the routed experts (e.g. ``model.layers.3.mlp.experts``), "" if none
    dequant_bytes        a block kept quantized (GGUF): its largest weight dequantized while it runs
                         (float32 values + their cast to the compute dtype), 0 for float weights
    """

    name: str
    weights_bytes: int
    modules: list[str] = field(default_factory=list)
    shared: dict[str, int] = field(default_factory=dict)
    kv_bytes_per_token: int = 0
    kv_window: int | None = None
    act_bytes_per_token: int = 0
    attn_score_bytes: int = 0
    logits_bytes_per_token: int = 0
    flops_per_token: float = 0.0
    attn_flops_per_token_per_ctx: float = 0.0
    read_bytes_per_token: int = 0
    params: int = 0
    experts_bytes: int = 0
    experts_read_bytes_per_token: int = 0
    experts_flops_per_token: float = 0.0
    experts_module: str = ""
    dequant_bytes: int = 0

    @property
    def total_weights_bytes(self) -> int:
        """Own weights plus shared ones (what the block needs when alone on a stage)."""
        return self.weights_bytes + sum(self.shared.values())

    def kv_bytes(self, context: int, batch: int) -> int:
        tokens = context if self.kv_window is None else min(context, self.kv_window)
        return self.kv_bytes_per_token * tokens * batch

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelProfile:
    """A model's needs. ``config`` is the transformers config dict when there is one, so the
    runtime can build the model; ``path`` the local folder/file with weights, if any."""

    name: str
    arch: str
    kind: ModelKind
    dtype: str
    blocks: list[BlockProfile]
    source: str = "catalog"
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    max_position_embeddings: int | None = None
    kv_dtype: str = "bfloat16"
    layers_prefix: str = ""
    config: dict | None = None
    path: str | None = None
    quantization: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        shared: dict[str, int] = {}
        for b in self.blocks:
            shared.update(b.shared)
        return sum(b.weights_bytes for b in self.blocks) + sum(shared.values())

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(b.kv_bytes_per_token for b in self.blocks)

    def kv_bytes(self, context: int, batch: int = 1) -> int:
        return sum(b.kv_bytes(context, batch) for b in self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights_bytes"] = self.weights_bytes
        d["kv_bytes_per_token"] = self.kv_bytes_per_token
        return d
