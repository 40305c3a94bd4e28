"""Measure this CPU's HostSpeed (see vramancer.devices.host_speed) with torch and transformers.

    speed = measure_host_speed()          # ~2 s; medians of short repeated runs
    save_host_speed(speed)                # plans made afterwards on this machine use it

Each figure comes from the operation the cost model uses it for: the GEMV of a decode step over a
matrix larger than the caches (bandwidth), a prefill-shaped fp32 matmul (FLOP/s), and generation
with a real transformers Llama at tiny width (1 and 9 layers, so weights cost nothing and what is
left is fixed cost) timed the way ``generate_text`` times a run (a streamer noting each step).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ..devices.host_speed import HostSpeed, host_fingerprint

__all__ = ["measure_host_speed", "measure_bandwidth", "measure_gemm_flops", "measure_overheads",
           "measure_parallel_op"]


def _median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(matrix_bytes: int = 128 * 2**20) -> float:
    """Bytes/s a fp32 matrix-vector product streams from a ``matrix_bytes`` matrix."""
    import torch

    cols = 4096
    rows = max(1, matrix_bytes // (4 * cols))
    w = torch.randn(rows, cols)
    x = torch.randn(cols)
    return rows * cols * 4 / _median_seconds(lambda: torch.mv(w, x), repeat=7)


def measure_gemm_flops(m: int = 512, k: int = 1024, n: int = 1024) -> float:
    """FLOP/s of a fp32 (m x k) @ (k x n) matmul, the shape of a prefill chunk's projections."""
    import torch

    a = torch.randn(m, k)
    b = torch.randn(k, n)
    return 2.0 * m * k * n / _median_seconds(lambda: torch.mm(a, b), repeat=7)


def measure_parallel_op(block_overhead_s: float, gemm_flops_per_s: float, rounds: int = 5) -> float:
    """Seconds each parallel op of a prefill pays for the hand-off between threads, from a real
    decoder layer: Llamas of width 256 with 1 and 5 layers run a 128-token forward (128 x 256 is
    torch's grain size, so every elementwise op goes parallel), in alternation; a layer's time,
    less its matmuls at the measured FLOP/s and the fixed cost per block, is spread over its
    PARALLEL_OPS_PER_LAYER ops."""
    import torch

    from ..plan.cost import PARALLEL_OPS_PER_LAYER

    small, large = _tiny_llama(1, 256, hidden=256), _tiny_llama(5, 256, hidden=256)
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(0))
    layer = large.model.layers[0]
    layer_flops = 2 * 128 * sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    with torch.no_grad():
        small(ids), large(ids)   # warm-up
        per_layer = []
        for _ in range(rounds):
            t1 = _median_seconds(lambda: small(ids), repeat=1, warmup=0)
            t5 = _median_seconds(lambda: large(ids), repeat=1, warmup=0)
            per_layer.append((t5 - t1) / 4)
    left = statistics.median(per_layer) - layer_flops / gemm_flops_per_s - block_overhead_s
    return max(0.0, left) / PARALLEL_OPS_PER_LAYER


def _tiny_llama(layers: int, vocab: int, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _generation_seconds(model, tokenizer, new_tokens: int = 12) -> tuple[float, float]:
    """(seconds per decode step, seconds from the call to the first token) of one greedy generation."""
    import torch

    from .generate import _timing_streamer, generate_ids

    inputs = {"input_ids": torch.randint(10, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(0))}
    streamer = _timing_streamer(tokenizer, None)
    start = time.perf_counter()
    generate_ids(model, inputs, new_tokens, streamer=streamer, min_new_tokens=new_tokens,
                 pad_token_id=tokenizer.pad_token_id)
    t = streamer.times[1:]
    return (t[-1] - t[0]) / (len(t) - 1), t[0] - start


def measure_overheads(rounds: int = 5) -> tuple[float, float, float]:
    """(block_overhead_s, step_overhead_s, request_overhead_s): fixed costs of transformers
    generation on this CPU. At tiny width the weights cost nothing: what a step takes is fixed cost.
    A 1-layer and a 9-layer model run in alternation (a shared machine's load hits both alike); the
    medians of the per-round figures count."""
    from .demo_model import build_demo_tokenizer

    tok = build_demo_tokenizer()
    small, large = _tiny_llama(1, len(tok)), _tiny_llama(9, len(tok))
    _generation_seconds(small, tok), _generation_seconds(large, tok)   # warm-up
    blocks, steps, requests = [], [], []
    for _ in range(rounds):
        t1, first1 = _generation_seconds(small, tok)
        t9, _ = _generation_seconds(large, tok)
        block = max(1e-6, (t9 - t1) / 8)
        blocks.append(block)
        steps.append(max(0.0, t1 - 3 * block))         # 1 layer + the embedding and head blocks
        requests.append(max(0.0, first1 - 3 * block))   # the call to the first token: setup and the prompt's step
    step = statistics.median(steps)
    return statistics.median(blocks), step, max(step, statistics.median(requests))


def measure_host_speed() -> HostSpeed:
    import torch

    threads = torch.get_num_threads()
    block, step, request = measure_overheads()
    gemm = measure_gemm_flops()
    return HostSpeed(bandwidth_bytes_per_s=measure_bandwidth(), gemm_flops_per_s=gemm,
                     block_overhead_s=block, step_overhead_s=step, request_overhead_s=request,
                     parallel_op_s=measure_parallel_op(block, gemm), threads=threads,
                     fingerprint=host_fingerprint(threads), source="measured")
