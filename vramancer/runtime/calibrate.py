"""Measure this CPU's HostSpeed (see vramancer.devices.host_speed) with torch and transformers.

    speed = measure_host_speed()          # a few seconds; the fastest of short repeated runs
    save_host_speed(speed)                # plans made afterwards on this machine use it

Each figure comes from the operation the cost model uses it for: the GEMVs of a decode step over
layer-shaped matrices larger than the caches together (bandwidth), a prefill-shaped fp32 matmul (FLOP/s), and generation
with a real transformers Llama at tiny width (1 and 9 layers, so weights cost nothing and what is
left is fixed cost) timed the way ``generate_text`` times a run (a streamer noting each step): with
one thread for the fixed costs, with the threads torch uses for what their hand-offs add.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ..devices.host_speed import HostSpeed, host_fingerprint

__all__ = ["measure_host_speed", "measure_bandwidth", "measure_gemm_flops", "measure_overheads",
           "measure_parallel_op"]


def _fastest_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeat`` runs: other work on the machine only ever slows a run down, so the
    fastest is the one it disturbed least (timeit's rule)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# the decode GEMVs the bandwidth is measured on: the 7 projections of Llama layers of this width,
# as many layers as it takes to pass the caches (distinct matrices, in a decode step's order)
BANDWIDTH_LAYER_WIDTH = 1536
BANDWIDTH_LAYER_INTERMEDIATE = 4096


def measure_bandwidth(total_bytes: int = 128 * 2**20, decode_parallel_op_s: float = 0.0) -> float:
    """Bytes/s a decode step's matrix-vector products stream: ``F.linear`` of one token through the
    q, k, v, o, gate, up and down matrices of Llama layers (width 1536) until ``total_bytes``, as a
    decode step reads them. Each of those ops also pays a thread hand-off, which the cost model
    prices on its own (``decode_parallel_op_s`` each): it is taken out of the time here."""
    import torch

    h, inter, kv = BANDWIDTH_LAYER_WIDTH, BANDWIDTH_LAYER_INTERMEDIATE, BANDWIDTH_LAYER_WIDTH // 4
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    layer_bytes = 4 * sum(r * c for r, c in shapes)
    mats = [torch.randn(r, c) for _ in range(max(1, -(-total_bytes // layer_bytes))) for r, c in shapes]
    xs = {h: torch.randn(1, 1, h), inter: torch.randn(1, 1, inter)}
    nbytes = 4 * sum(w.numel() for w in mats)

    def step() -> None:
        for w in mats:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    seconds = _fastest_seconds(step, repeat=7)
    # (the hand-offs were measured on other ops: never let their estimate take most of the time)
    return nbytes / max(seconds - len(mats) * decode_parallel_op_s, seconds / 4)


def measure_gemm_flops(m: int = 512, k: int = 1024, n: int = 1024) -> float:
    """FLOP/s of a fp32 (m x k) @ (k x n) matmul, the shape of a prefill chunk's projections."""
    import torch

    a = torch.randn(m, k)
    b = torch.randn(k, n)
    return 2.0 * m * k * n / _fastest_seconds(lambda: torch.mm(a, b), repeat=7)


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
        t1s, t5s = [], []
        for _ in range(rounds):
            t1s.append(_fastest_seconds(lambda: small(ids), repeat=1, warmup=0))
            t5s.append(_fastest_seconds(lambda: large(ids), repeat=1, warmup=0))
    left = (min(t5s) - min(t1s)) / 4 - layer_flops / gemm_flops_per_s - block_overhead_s
    return max(0.0, left) / PARALLEL_OPS_PER_LAYER


def _tiny_llama(layers: int, vocab: int, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _generation_seconds(model, tokenizer, new_tokens: int = 12, prompt_tokens: int = 32) -> tuple[float, float]:
    """(seconds per decode step, seconds from the call to the first token) of one greedy generation."""
    import torch

    from .generate import _timing_streamer, generate_ids

    inputs = {"input_ids": torch.randint(10, len(tokenizer), (1, prompt_tokens),
                                         generator=torch.Generator().manual_seed(0))}
    streamer = _timing_streamer(tokenizer, None)
    start = time.perf_counter()
    generate_ids(model, inputs, new_tokens, streamer=streamer, min_new_tokens=new_tokens,
                 pad_token_id=tokenizer.pad_token_id)
    t = streamer.times[1:]
    return (t[-1] - t[0]) / (len(t) - 1), t[0] - start


def _with_threads(n: int, fn: Callable[[], object]):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


# layer counts of the tiny decoders the fixed costs are measured on (embedding + layers + head blocks)
OVERHEAD_LAYERS = (1, 4, 9)
OVERHEAD_WIDTH = 128   # every matmul of a layer (128 x 64 and up) is one MKL threads in a decode step


def measure_overheads(rounds: int = 5, threads: int | None = None) -> tuple[float, float, float, float]:
    """(block_overhead_s, step_overhead_s, request_overhead_s, decode_parallel_op_s): fixed costs of
    transformers generation on this CPU. At tiny width (128) the weights cost nothing: what a step
    takes is fixed cost. Llamas with 1, 4 and 9 layers generate in alternation (a shared machine's
    load hits each alike), with one thread: the line through the fastest of their decode steps gives
    the cost per block (slope: dispatch, what no thread count changes). With more ``threads`` the
    1- and 9-layer models then decode with them too: what a layer's step takes beyond its one-thread
    time is the hand-off of the DECODE_PARALLEL_OPS_PER_LAYER ops a decode step splits over threads,
    and the costs per step and per request are what their steps and first tokens take beyond their
    blocks at that thread count (``generate``'s own ops between forwards hand off too). With one
    thread they come from the one-thread line (intercept less the embedding and head blocks) and
    first tokens."""
    import torch

    from ..plan.cost import DECODE_PARALLEL_OPS_PER_LAYER, DECODE_PARALLEL_OPS_PER_OTHER_BLOCK
    from .demo_model import build_demo_tokenizer

    threads = threads or torch.get_num_threads()
    tok = build_demo_tokenizer()
    models = {n: _tiny_llama(n, len(tok), hidden=OVERHEAD_WIDTH) for n in OVERHEAD_LAYERS}
    steps: dict[int, list[float]] = {n: [] for n in models}
    firsts: dict[int, list[float]] = {n: [] for n in models}
    lo, hi = OVERHEAD_LAYERS[0], OVERHEAD_LAYERS[-1]
    steps_t: dict[int, list[float]] = {lo: [], hi: []}
    firsts_t: dict[int, list[float]] = {lo: [], hi: []}

    def one_thread_round() -> None:
        for n, m in models.items():
            step, first = _generation_seconds(m, tok)
            steps[n].append(step)
            firsts[n].append(first)

    _with_threads(1, lambda: [_generation_seconds(m, tok) for m in models.values()])   # warm-up
    if threads > 1:
        _with_threads(threads, lambda: _generation_seconds(models[lo], tok))
    for _ in range(rounds):
        _with_threads(1, one_thread_round)
        if threads > 1:
            for n in steps_t:
                step, first = _with_threads(threads, lambda m=models[n]: _generation_seconds(m, tok))
                steps_t[n].append(step)
                firsts_t[n].append(first)
    xs = [float(n) for n in models]
    intercept, block = _line(xs, [min(steps[n]) for n in models])   # the rounds least disturbed
    block = max(block, 1e-6)
    if threads <= 1:
        step = max(0.0, intercept - 2 * block)            # the intercept holds the embedding and head blocks
        request = max(step, statistics.median([min(firsts[n]) - (n + 2) * block for n in models]))
        return block, step, request, 0.0
    med_t = {n: min(v) for n, v in steps_t.items()}
    decode_op = max(0.0, (med_t[hi] - med_t[lo]) / (hi - lo) - block) / DECODE_PARALLEL_OPS_PER_LAYER

    def blocks_t(n: int) -> float:   # what the cost model charges the n-layer model's blocks at ``threads``
        return (n + 2) * block + (n * DECODE_PARALLEL_OPS_PER_LAYER + DECODE_PARALLEL_OPS_PER_OTHER_BLOCK) * decode_op

    step = max(0.0, statistics.median([med_t[n] - blocks_t(n) for n in med_t]))
    # the prompt (32 tokens x width 128) stays below torch's grain size: its ops hand off as a decode step's
    request = max(step, statistics.median([min(firsts_t[n]) - blocks_t(n) for n in firsts_t]))
    return block, step, request, decode_op


def measure_host_speed() -> HostSpeed:
    import torch

    threads = torch.get_num_threads()
    block, step, request, decode_op = measure_overheads(threads=threads)
    gemm = measure_gemm_flops()
    return HostSpeed(bandwidth_bytes_per_s=measure_bandwidth(decode_parallel_op_s=decode_op), gemm_flops_per_s=gemm,
                     block_overhead_s=block, step_overhead_s=step, request_overhead_s=request,
                     parallel_op_s=measure_parallel_op(block, gemm) if threads > 1 else 0.0,
                     decode_parallel_op_s=decode_op, threads=threads,
                     fingerprint=host_fingerprint(threads), source="measured")
