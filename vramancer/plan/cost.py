"""The speed model: seconds per block per device, for one decode step and one prefill chunk.

Decode is memory-bound: a step reads the block's weights (active experts only for MoE) and passes
over its KV cache ``KV_PASSES_PER_STEP`` times (the append copies it, attention reads it); prefill
is compute-bound: a chunk does ``flops_per_token x tokens`` of matmuls. Each block's time is the
larger of its read time and its compute time, plus a fixed per-block launch overhead. Efficiencies
are the fractions of the vendors' peaks that good kernels reach:

    DECODE_BANDWIDTH_EFFICIENCY  0.75   (GEMV reaches 70-85% of peak DRAM bandwidth)
    COMPUTE_EFFICIENCY           0.55   (cuBLAS GEMM on mid-size LLM matmuls, bf16)
    LINK_EFFICIENCY              0.80   (pinned host->device copies reach ~80% of PCIe peak)

Offloaded blocks: "execute" runs on the CPU (host bandwidth / CPU FLOPs, or disk bandwidth for the
disk tier, read through the page cache); "stream" copies the block's weights to a GPU before it
runs, every forward pass, overlapped with compute by prefetch, so its time is max(copy, compute).
A hop between stages moves ``tokens x hidden x bytes`` over the host link plus a fixed latency.

Host RAM (and the CPU that runs disk-tier blocks) uses measured figures, not vendor peaks (see
vramancer/devices/host_speed.py): the bandwidth a decode GEMV reaches and the FLOP/s of a prefill
matmul, taken as they are (no efficiency factor), plus a fixed cost per block per forward (eager op
dispatch, measured with one thread: what dominates small models on a CPU), plus a thread hand-off
per op torch splits over its threads (none with one thread; what dominates when other work holds
the cores): in a decode step the matmuls MKL threads and the attention kernel
(``DECODE_PARALLEL_OPS_PER_LAYER``, at ``decode_parallel_op_s``), in a prefill chunk whose tensors
pass torch's grain size every op of the layer (``PARALLEL_OPS_PER_LAYER``, at ``parallel_op_s``).
The LM head of a generation computes the logits of each sequence's last position only
(``generate``'s ``logits_to_keep``), so a prefill chunk's head block does one token's matmul, not
the chunk's.

MoE routed experts kept in host RAM and run there apart from their layer (plan/experts.py) are
priced by ``experts_decode_seconds``: the top-k experts' bytes at host bandwidth, plus the fixed
cost of the experts module alone, not a whole layer's: ``EXPERTS_OVERHEAD_FIXED +
EXPERTS_OVERHEAD_PER_EXPERT x k`` of ``block_overhead_s`` (runtime/experts.py's host path: routing
bookkeeping, then two matmuls per selected expert), and a thread hand-off per matmul (``2 x k``). A
whole MoE layer executed on the host pays, beyond a dense layer's fixed cost, its experts module's
(a decode step runs the same host path over the selected experts), in a prefill also
``EXPERTS_OVERHEAD_PER_ROUTED`` of ``block_overhead_s`` per routed expert (transformers' experts
path loops over all of them), and in a decode step a thread hand-off for each of its 2 x k expert
matmuls and its router instead of the dense gate, up and down.

Every plan also pays the host's fixed cost per generation step and per request (``step_seconds``:
the ``generate`` loop around the forward, and its
setup before the first token), whatever runs the blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..devices.device import Device
from ..devices.host_speed import HostSpeed, host_speed
from ..models.profile import BlockProfile, ModelProfile

__all__ = ["CostModel", "DECODE_BANDWIDTH_EFFICIENCY", "COMPUTE_EFFICIENCY", "LINK_EFFICIENCY",
           "GPU_BLOCK_OVERHEAD_S", "HOP_LATENCY_S", "TORCH_GRAIN_SIZE", "PARALLEL_OPS_PER_LAYER",
           "PARALLEL_OPS_PER_OTHER_BLOCK", "DECODE_PARALLEL_OPS_PER_LAYER", "DECODE_PARALLEL_OPS_PER_OTHER_BLOCK",
           "KV_PASSES_PER_STEP", "EXPERTS_OVERHEAD_FIXED", "EXPERTS_OVERHEAD_PER_EXPERT",
           "EXPERTS_OVERHEAD_PER_ROUTED"]

DECODE_BANDWIDTH_EFFICIENCY = 0.75
COMPUTE_EFFICIENCY = 0.55
LINK_EFFICIENCY = 0.80
GPU_BLOCK_OVERHEAD_S = 60e-6   # ~12 kernel launches per transformer layer at ~5 us
HOP_LATENCY_S = 25e-6          # device->host->device sync + copy launch
# torch runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE)
TORCH_GRAIN_SIZE = 32768
# ops a transformers decoder layer splits over threads once past the grain size, counted in a
# torch profile of a Llama layer's forward: 7 matmuls, ~10 mul, 6 add, 2 pow, 2 mean/sum, silu,
# attention; the embedding and head blocks: a norm and the LM head
PARALLEL_OPS_PER_LAYER = 28
PARALLEL_OPS_PER_OTHER_BLOCK = 8
# ops a decode step (one token: elementwise ops stay below the grain size, on one thread) still
# splits over threads: a layer's 7 matmuls (q, k, v, o, gate, up, down: MKL threads a GEMV from a few
# thousand weights) and its attention kernel (parallel over heads); the head block: the LM head
DECODE_PARALLEL_OPS_PER_LAYER = 8
DECODE_PARALLEL_OPS_PER_OTHER_BLOCK = 1
# the fixed cost of a MoE experts module's decode forward on the host (runtime/experts.py's host path),
# as fractions of a decoder layer's (host_speed's block_overhead_s): measured with one thread on the
# benchmark VM at hidden 32 (1 token; a layer's 0.31 ms): 0.14 ms with top-2 of 8 experts, 0.28 ms
# with top-8 of 64 or 128 (0.45 and 0.9 of a layer)
EXPERTS_OVERHEAD_FIXED = 0.35
EXPERTS_OVERHEAD_PER_EXPERT = 0.065
# a whole MoE layer run on the host runs transformers' own experts path (grouped_mm: its CPU fallback
# loops in Python over every routed expert): beyond a dense layer's fixed cost, that of the experts
# module above plus this fraction per routed expert. Measured the same way (one thread, hidden 32,
# decode step slope over 1 and 9 layers, a Llama layer 0.21 ms): Mixtral top-2 of 8 +0.85 layer,
# Qwen3-MoE top-8 of 128 +2.4, Qwen2-MoE top-4 of 60 with a shared expert +1.8 (model: +0.58, +2.4, +1.3)
EXPERTS_OVERHEAD_PER_ROUTED = 0.012
# passes over a layer's KV cache per decode step: transformers' DynamicCache (what the runtime uses)
# appends a token with torch.cat, reading the cache and writing a new one, then attention reads it
KV_PASSES_PER_STEP = 3


@dataclass
class CostModel:
    profile: ModelProfile
    context: int
    batch: int
    prefill_chunk: int
    host: HostSpeed | None = None   # None: this machine's (measured when kept, else the defaults)

    def __post_init__(self) -> None:
        if self.host is None:
            self.host = host_speed()
        self.q_tokens = min(self.context, self.prefill_chunk)
        self.chunk_tokens = self.q_tokens * self.batch
        # mean context seen by a decode step of a conversation that grows to ``context``
        self.decode_ctx = max(1, self.context // 2)

    # -- per block ---------------------------------------------------------------------------
    def _read_seconds(self, nbytes: float, dev: Device) -> float:
        if dev.kind == "cpu":  # a measured effective figure (host_speed), taken as it is
            return nbytes / dev.bandwidth_bytes_per_s
        return nbytes / (dev.bandwidth_bytes_per_s * DECODE_BANDWIDTH_EFFICIENCY)

    def _compute_seconds(self, flops: float, dev: Device) -> float:
        if dev.kind != "gpu":  # host RAM and the disk tier are computed by the CPU
            return flops / (dev.tflops * 1e12 if dev.kind == "cpu" and dev.tflops > 0 else self.host.gemm_flops_per_s)
        tf = dev.tflops if dev.tflops > 0 else 0.05
        return flops / (tf * 1e12 * COMPUTE_EFFICIENCY)

    def _decode_bytes(self, b: BlockProfile) -> float:
        ctx = self.decode_ctx if b.kv_window is None else min(self.decode_ctx, b.kv_window)
        return b.read_bytes_per_token + KV_PASSES_PER_STEP * b.kv_bytes_per_token * ctx * self.batch

    def _decode_flops(self, b: BlockProfile) -> float:
        ctx = self.decode_ctx if b.kv_window is None else min(self.decode_ctx, b.kv_window)
        return self.batch * (b.flops_per_token + b.attn_flops_per_token_per_ctx * ctx)

    def _prefill_flops(self, b: BlockProfile) -> float:
        if b.logits_bytes_per_token > 0:   # the LM head: the last position of each sequence only
            return self.batch * b.flops_per_token
        # a chunk ending at ``context`` attends on average to half the context before it
        ctx = self.context / 2 if b.kv_window is None else min(self.context / 2, b.kv_window)
        return self.chunk_tokens * (b.flops_per_token + b.attn_flops_per_token_per_ctx * ctx)

    def _overhead(self, dev: Device) -> float:
        return GPU_BLOCK_OVERHEAD_S if dev.kind == "gpu" else self.host.block_overhead_s

    def _parallel_ops_seconds(self, b: BlockProfile, tokens: int) -> float:
        """CPU only: the ops of a block that torch splits over its threads each pay a thread
        hand-off: a few microseconds on idle cores, milliseconds when other work holds them. Below
        torch's grain size (``tokens x hidden`` elements: a decode step) only the matmuls and the
        attention kernel go parallel (``decode_parallel_op_s`` each); past it (a prefill chunk)
        every op of the block does (``parallel_op_s`` each)."""
        if b.flops_per_token <= 0:   # the embedding: a lookup
            return 0.0
        is_layer = b.kv_bytes_per_token > 0 or b.attn_flops_per_token_per_ctx > 0
        if tokens * (self.profile.hidden_size or 0) < TORCH_GRAIN_SIZE:
            ops = DECODE_PARALLEL_OPS_PER_LAYER if is_layer else DECODE_PARALLEL_OPS_PER_OTHER_BLOCK
            return ops * self.host.decode_parallel_op_s
        return (PARALLEL_OPS_PER_LAYER if is_layer else PARALLEL_OPS_PER_OTHER_BLOCK) * self.host.parallel_op_s

    def step_seconds(self) -> tuple[float, float]:
        """(decode step, prefill chunk) fixed host seconds beyond the blocks: a decode step pays the
        generation loop's; a prefill chunk is priced as a request's first forward (``generate``'s setup)."""
        return self.host.step_overhead_s, max(self.host.step_overhead_s, self.host.request_overhead_s)

    def execute_seconds(self, b: BlockProfile, dev: Device) -> tuple[float, float]:
        """(decode step, prefill chunk) seconds of block ``b`` run on ``dev`` where its weights live."""
        if dev.kind == "disk":
            # executed by the CPU, weights read from the mmapped file at disk speed
            read_dev_bw = dev.bandwidth_bytes_per_s
            decode = max(b.read_bytes_per_token / (read_dev_bw * LINK_EFFICIENCY),
                         self._compute_seconds(self._decode_flops(b), dev))
            prefill = max(b.weights_bytes / (read_dev_bw * LINK_EFFICIENCY),
                          self._compute_seconds(self._prefill_flops(b), dev))
            oh = self.host.block_overhead_s
            return (decode + oh + self._parallel_ops_seconds(b, self.batch),
                    prefill + oh + self._parallel_ops_seconds(b, self.chunk_tokens))
        decode = max(self._read_seconds(self._decode_bytes(b), dev), self._compute_seconds(self._decode_flops(b), dev))
        prefill = max(self._read_seconds(b.weights_bytes, dev), self._compute_seconds(self._prefill_flops(b), dev))
        oh = self._overhead(dev)
        if dev.kind == "cpu":
            decode_oh, prefill_oh = self._moe_layer_overhead(b)
            if b.experts_bytes > 0 and self.batch * (self.profile.hidden_size or 0) < TORCH_GRAIN_SIZE:
                # a MoE layer's decode hands off 2 x k expert matmuls and its router, not gate/up/down
                decode += (2 * self.experts_per_token() - 2) * self.host.decode_parallel_op_s
            return (decode + oh + decode_oh + self._parallel_ops_seconds(b, self.batch),
                    prefill + oh + prefill_oh + self._parallel_ops_seconds(b, self.chunk_tokens))
        return decode + oh, prefill + oh

    def _config_int(self, keys: tuple[str, ...], default: int) -> int:
        cfg = self.profile.config or {}
        cfg = {**cfg, **(cfg.get("text_config") or {})} if isinstance(cfg.get("text_config"), dict) else cfg
        for key in keys:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return int(cfg[key])
        return default

    def experts_per_token(self) -> int:
        """Routed experts per token (the config's top k; 2 when it does not say)."""
        return self._config_int(("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"), 2)

    def routed_experts(self) -> int:
        """Routed experts per MoE layer (the config's; 8 when it does not say)."""
        return self._config_int(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 8)

    def _experts_overhead(self, k: int) -> float:
        return self.host.block_overhead_s * (EXPERTS_OVERHEAD_FIXED + EXPERTS_OVERHEAD_PER_EXPERT * k)

    def _moe_layer_overhead(self, b: BlockProfile) -> tuple[float, float]:
        """CPU only: what a whole MoE layer's experts add to its fixed cost, (decode, prefill): a decode
        step runs runtime/experts.py's host path over the selected experts (the experts module's own
        fixed cost), a prefill transformers' experts path (which also loops over every routed expert)."""
        if b.experts_bytes <= 0:
            return 0.0, 0.0
        module = self._experts_overhead(self.experts_per_token())
        return module, module + self.host.block_overhead_s * EXPERTS_OVERHEAD_PER_ROUTED * self.routed_experts()

    def experts_decode_seconds(self, b: BlockProfile, dev: Device) -> float:
        """Seconds of one decode step of block ``b``'s routed experts alone, run on ``dev`` (the host
        CPU) where they live: the selected experts' bytes read (or their FLOPs, the larger) plus the
        experts module's fixed cost and thread hand-offs (module docstring)."""
        k = self.experts_per_token()
        nbytes = min(self.batch * b.experts_read_bytes_per_token, b.experts_bytes)   # the union of the batch's
        work = max(self._read_seconds(nbytes, dev), self._compute_seconds(self.batch * b.experts_flops_per_token, dev))
        if dev.kind != "cpu":
            return work + self._overhead(dev)
        return work + self._experts_overhead(k) + 2 * k * self.host.decode_parallel_op_s

    def stream_seconds(self, b: BlockProfile, src: Device, gpu: Device) -> tuple[float, float]:
        """(decode, prefill) seconds of block ``b`` kept on ``src`` (cpu/disk) and run on ``gpu``:
        its weights cross the link every forward pass, overlapped with compute by prefetch."""
        link = min(src.link_bandwidth_bytes_per_s, gpu.link_bandwidth_bytes_per_s) * LINK_EFFICIENCY
        copy = b.weights_bytes / link
        dec, pre = self.execute_seconds(b, gpu)
        return max(copy, dec), max(copy, pre)

    # -- between stages ----------------------------------------------------------------------
    def hop_seconds(self, a: Device, b: Device) -> tuple[float, float]:
        """(decode, prefill) seconds to move the hidden state from a stage on ``a`` to one on ``b``."""
        h = self.profile.hidden_size or 4096
        nbytes_token = h * 2
        link = min(a.link_bandwidth_bytes_per_s, b.link_bandwidth_bytes_per_s) * LINK_EFFICIENCY
        if a.kind != "gpu" and b.kind != "gpu":
            return 0.0, 0.0  # host memory to host memory: no copy
        return (HOP_LATENCY_S + self.batch * nbytes_token / link,
                HOP_LATENCY_S + self.chunk_tokens * nbytes_token / link)
