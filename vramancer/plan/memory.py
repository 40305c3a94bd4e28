"""The memory a stage must hold: weights + KV cache + activation workspace + reserve.

    weights     sum of the blocks' own weights + each tied tensor once per stage that uses it
    kv cache    sum over blocks of kv_bytes_per_token x min(context, window) x batch
    activation  workspace for one prefill chunk of ``chunk = min(context, prefill_chunk) x batch`` tokens:
                chunk x max(block act_bytes_per_token)            hidden states, q/k/v, MLP intermediate
              + batch x min(context, chunk) x keys x max(attn_score_bytes)   scores, only where the model
                runs eager attention (transformers' default SDPA kernels and FlashAttention never hold them)
              + chunk x logits_bytes_per_token                    LM head logits, on the head's stage
              + the block's dequant_bytes                         a GGUF block's largest weight dequantized
                (blocks run one after another, so only the largest block's workspace is live at once)
    reserve     per device, see ``default_reserve_bytes``

Every quantity is an int number of bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..devices.device import Device
from ..models.profile import BlockProfile, ModelProfile
from ..units import GiB, MiB

__all__ = ["StageMemory", "stage_memory", "default_reserve_bytes", "GPU_RESERVE_BASE_BYTES",
           "GPU_RESERVE_FRACTION", "HOST_RESERVE_BYTES", "DISK_RESERVE_BYTES", "BlockTable",
           "attention_materializes_scores"]

# GPU reserve = 512 MiB + 2% of the card's memory.
#  - 512 MiB: the CUDA context of a torch process (~300-450 MiB on Ampere/Ada/Hopper with lazy
#    module loading) plus the cuBLAS workspace and the first allocator segments.
#  - 2%: caching-allocator fragmentation, which grows with the pool size.
# That is 0.75 GiB on a 12 GiB card, 1.0 GiB on 24 GiB, 2.1 GiB on 80 GiB: between ComfyUI's
# ~0.8 GiB + a few hundred MiB and llama.cpp's fixed 1 GiB per device of `--fit`.
GPU_RESERVE_BASE_BYTES = 512 * MiB
GPU_RESERVE_FRACTION = 0.02
# Host RAM: the Python process, torch's own libraries (~1 GiB resident) and the OS page cache headroom.
HOST_RESERVE_BYTES = 2 * GiB
# Disk: keep 1 GiB free so the file system never fills.
DISK_RESERVE_BYTES = 1 * GiB


def default_reserve_bytes(device: Device) -> int:
    if device.kind == "gpu":
        return GPU_RESERVE_BASE_BYTES + int(GPU_RESERVE_FRACTION * device.total_bytes)
    if device.kind == "cpu":
        return HOST_RESERVE_BYTES
    return DISK_RESERVE_BYTES


@dataclass(frozen=True)
class StageMemory:
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes


def attention_materializes_scores(profile: ModelProfile) -> bool:
    """True when the model is set to eager attention (its config says so): only then does a
    prefill chunk hold its full (query x key) score matrix."""
    cfg = profile.config or {}
    impl = cfg.get("attn_implementation") or cfg.get("_attn_implementation")
    return impl == "eager"


class BlockTable:
    """Per-block byte figures for one workload, precomputed so a planner can ask for
    any range's memory cheaply."""

    def __init__(self, profile: ModelProfile, context: int, batch: int, prefill_chunk: int):
        self.profile = profile
        self.materialized_scores = attention_materializes_scores(profile)
        self.context = context
        self.batch = batch
        q_tokens = min(context, prefill_chunk)
        self.chunk_tokens = q_tokens * batch
        blocks = profile.blocks
        self.n = len(blocks)
        self.weights = [b.weights_bytes for b in blocks]
        self.kv = [b.kv_bytes(context, batch) for b in blocks]
        self.act = [self._act(b, q_tokens) for b in blocks]
        self.logits = [b.logits_bytes_per_token * self.chunk_tokens for b in blocks]
        self.shared: list[dict[str, int]] = [b.shared for b in blocks]

    def _act(self, b: BlockProfile, q_tokens: int) -> int:
        if not self.materialized_scores:
            return b.act_bytes_per_token * self.chunk_tokens + b.dequant_bytes
        keys = self.context if b.kv_window is None else min(self.context, b.kv_window)
        return b.act_bytes_per_token * self.chunk_tokens + b.attn_score_bytes * self.batch * q_tokens * keys \
            + b.dequant_bytes

    def range_memory(self, start: int, end: int) -> StageMemory:
        """Memory of blocks [start, end) on one stage."""
        shared: dict[str, int] = {}
        for i in range(start, end):
            shared.update(self.shared[i])
        weights = sum(self.weights[start:end]) + sum(shared.values())
        kv = sum(self.kv[start:end])
        act = max((self.act[i] for i in range(start, end)), default=0) + sum(self.logits[start:end])
        return StageMemory(weights, kv, act)


    def ranges_memory(self, ranges: list[tuple[int, int]]) -> StageMemory:
        """Memory of several ranges held by ONE device (a pipeline that returns to it, e.g. the
        LM head back on the GPU holding the tied embedding): tied tensors once, KV summed,
        workspace the largest of the ranges (they never run at once)."""
        shared: dict[str, int] = {}
        weights = kv = act = 0
        for s, e in ranges:
            for i in range(s, e):
                shared.update(self.shared[i])
            weights += sum(self.weights[s:e])
            kv += sum(self.kv[s:e])
            act = max(act, self.range_memory(s, e).activation_bytes)
        return StageMemory(weights + sum(shared.values()), kv, act)

    def without_last(self) -> BlockTable:
        """The same table without its last block (planning the rest when the head is pinned)."""
        t = object.__new__(BlockTable)
        t.__dict__.update(self.__dict__)
        t.n = self.n - 1
        for name in ("weights", "kv", "act", "logits", "shared"):
            setattr(t, name, getattr(self, name)[:-1])
        return t


def stage_memory(profile: ModelProfile, start: int, end: int, context: int, batch: int,
                 prefill_chunk: int = 512) -> StageMemory:
    return BlockTable(profile, context, batch, prefill_chunk).range_memory(start, end)
