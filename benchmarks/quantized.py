"""GGUF weights kept quantized in the split runtime: what it costs and what it saves, against
anchors measured in the same run on the same machine.

1. Dequantization throughput per GGUF type: our CPU path (runtime/gguf/dequant.py: numba kernels,
   compiled before timing; torch ops without numba) against gguf-py's
   numpy reference (``gguf.quants.dequantize``) on the same blocks (``--rows`` x ``--cols`` values;
   valid blocks: gguf-py's or our encoder where one exists, random bytes with finite scales for
   Q2_K / Q3_K). Each result is also checked bit for bit against the reference. Goal: ratio >= 5x.
   Ours is timed as the runtime runs it on the CPU: into the model's reused scratch (runtime/gguf/
   modules.DequantScratch, what GGUFWeight writes into each forward), the goal's figure; also into a
   fresh output per call (second column): its page faults (Linux zeroing new pages) cost about as
   much as our dequantization itself on this CPU.
   On CUDA (when present) the torch path is also timed on the GPU.
2. Decode tokens/s and resident weight bytes of one random Llama (``--hidden`` / ``--layers`` /
   ``--vocab``) as GGUF Q8_0 and Q4_K (dequantized per layer, computing in float32 on the CPU) next to
   the same weights loaded from safetensors in bfloat16 and float32. The measured bytes of each must
   equal its plan's (so the memory ratios are the plan's).
3. Output quality: mean KL divergence (nats per token) of each quant type's next-token distribution
   from the float32 model's, and how often the top token agrees, over ``--kl-seqs`` random sequences
   of ``--kl-len`` tokens. Our K-quant encoder is plain round-to-nearest (llama.cpp's searches its
   scales, a little better); Q2_K / Q3_K have no encoder here and are not rated.

Timings: median of ``--repeat`` runs, variants interleaved. torch uses its default thread count unless
``--threads`` says (on a machine whose cores are busy with other work, OpenMP's threads wait on each
other: use ``--threads 1``, which is also like for like with numpy's single thread).
``--clock thread`` times the dequantization rows in this thread's CPU time instead of wall time (with
``--threads 1``: both sides run on this thread; steadier where other work shares the cores).
Run:  python benchmarks/quantized.py [--repeat 3] [--threads 1] [--clock thread] [--json FILE]
A benchmark, not a test: it always exits 0 and prints "GOAL MET" / "GOAL NOT MET" per goal.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import make_llama  # noqa: E402

__all__ = ["main", "dequant_rows", "decode_rows", "kl_rows"]

DEQUANT_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
KL_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"]
DEQUANT_GOAL = 5.0


def _log(msg: str) -> None:
    print(msg, flush=True)


_CLOCK = time.perf_counter     # --clock thread: time.thread_time (CPU time of this thread)


def _median_time(fn, repeat: int, clock=None) -> float:
    clock = clock or _CLOCK
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def _blocks(name: str, rows: int, cols: int, seed: int = 0):
    """Valid GGUF bytes [rows, bytes_per_row] of ``name`` for ``rows`` x ``cols`` values."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import quantize

    from vramancer.runtime.gguf.dequant import GGUF_TYPES
    from vramancer.runtime.gguf.quantize import K_ENCODERS, quantize_k

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if name == "F16":
        return x.astype(np.float16).view(np.uint8)
    if name in K_ENCODERS:
        return quantize_k(x, name)
    try:
        return np.ascontiguousarray(quantize(x, QT[name])).view(np.uint8)
    except NotImplementedError:  # Q2_K / Q3_K: random bits with finite float16 scales
        t = GGUF_TYPES[name]
        n = rows * cols // t.block_values
        raw = rng.integers(0, 256, size=(n, t.block_bytes), dtype=np.uint8)
        for at in {"Q2_K": (80, 82), "Q3_K": (108,)}[name]:
            raw[:, at:at + 2] = (rng.standard_normal((n, 1)) * 0.01).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, -1)


def dequant_rows(rows: int, cols: int, repeat: int, types: list[str]) -> list[dict]:
    """Per type: values/s of the numpy reference and of our torch path (CPU, and CUDA when present)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize as ref

    from vramancer.runtime.gguf.dequant import _cpu_kernels, dequantize
    from vramancer.runtime.gguf.modules import DequantScratch

    kernels = _cpu_kernels()
    if kernels is not None:          # JIT compile (or load from numba's disk cache) before any timing
        start = time.perf_counter()
        kernels.compile_all([t for t in types if t in kernels.KERNELS])
        _log(f"  CPU path: numba kernels (runtime/gguf/cpu_kernels.py), compiled or loaded from cache in "
             f"{time.perf_counter() - start:.2f} s (not timed below)")
    else:
        _log("  CPU path: torch ops (numba not installed, or VRAMANCER_GGUF_NUMBA=0)")
    out = []
    for name in types:
        raw = _blocks(name, rows, cols)
        raw_t = torch.from_numpy(np.ascontiguousarray(raw))
        want = ref(raw, QT[name])
        got = dequantize(raw_t, name)
        exact = bool(torch.equal(got.view(torch.int32), torch.from_numpy(np.ascontiguousarray(want)).view(torch.int32)))
        t_ref = _median_time(lambda r=raw, n=name: ref(r, QT[n]), repeat)
        # the runtime's path (GGUFWeight on the CPU): into the model's DequantScratch, memory reused
        # from forward to forward, as llama.cpp's work buffer (the first call, untimed, sizes it)
        scratch = DequantScratch()
        shape = tuple(got.shape)
        dequantize(raw_t, name, out=scratch.take(shape, torch.float32))
        exact = exact and bool(torch.equal(dequantize(raw_t, name, out=scratch.take(shape, torch.float32))
                                           .view(torch.int32), got.view(torch.int32)))
        t_out = _median_time(lambda r=raw_t, n=name, s=scratch, sh=shape:
                             dequantize(r, n, out=s.take(sh, torch.float32)), repeat)
        # into a fresh output each call (what a forward without the scratch does: Linux faults in and
        # zeroes the pages of every large new tensor)
        t_cpu = _median_time(lambda r=raw_t, n=name: dequantize(r, n), repeat)
        row: dict[str, Any] = dict(type=name, values=rows * cols, exact=exact, numpy_s=t_ref, torch_cpu_s=t_cpu,
                                   ratio_cpu=t_ref / t_cpu, torch_cpu_out_s=t_out, ratio_cpu_out=t_ref / t_out)
        if torch.cuda.is_available():
            raw_g = raw_t.cuda()
            dequantize(raw_g, name)
            torch.cuda.synchronize()

            def on_gpu(r=raw_g, n=name):
                dequantize(r, n)
                torch.cuda.synchronize()

            row["torch_cuda_s"] = _median_time(on_gpu, repeat, time.perf_counter)   # the GPU's time: wall
            row["ratio_cuda"] = t_ref / row["torch_cuda_s"]
        out.append(row)
        _log(f"  {name:5s} numpy {rows * cols / t_ref / 1e6:8.1f} Mval/s   ours (scratch) "
             f"{rows * cols / t_out / 1e6:8.1f} Mval/s  x{t_ref / t_out:5.2f}  (fresh output x{t_ref / t_cpu:5.2f})"
             + (f"   cuda x{row['ratio_cuda']:8.1f}" if "ratio_cuda" in row else "")
             + ("" if exact else "   NOT BIT-EXACT"))
    return out


def _load(target: str, dtype: str | None, context: int):
    from vramancer.runtime.loader import load

    return load(target, devices="rtx4090", context=context, backing="cpu", dtype=dtype)


def _decode_tps(model, new: int, vocab: int) -> float:
    """Greedy decode tokens/s: time of (new) tokens minus time of 1, over new - 1 tokens."""
    import torch

    ids = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))

    def gen(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    return (new - 1) / max(gen(new) - gen(1), 1e-9)


def decode_rows(folder: Path, files: dict[str, Path], new: int, repeat: int, vocab: int) -> list[dict]:
    """fp32 / bf16 from safetensors, Q8_0 / Q4_K from GGUF: resident weight bytes (measured and
    planned) and decode tokens/s."""
    variants = {"float32": (str(folder), "float32"), "bfloat16": (str(folder), "bfloat16")}
    variants.update({f"GGUF {q}": (str(p), None) for q, p in files.items()})
    models = {k: _load(t, dt, context=64) for k, (t, dt) in variants.items()}
    tps: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeat):
        for k, m in models.items():
            tps[k].append(_decode_tps(m, new, vocab))
    out = []
    for k, m in models.items():
        rep = m.vramancer.memory_report()
        out.append(dict(variant=k, weights_bytes=rep.weights_bytes,
                        planned_weights_bytes=sum(s.weights_bytes for s in m.vramancer.plan.stages),
                        decode_tps=statistics.median(tps[k])))
        m.vramancer.detach()
    base = next(r for r in out if r["variant"] == "float32")
    for r in out:
        r["memory_ratio"] = r["weights_bytes"] / base["weights_bytes"]
        r["planned_memory_ratio"] = r["planned_weights_bytes"] / base["planned_weights_bytes"]
        r["speed_ratio"] = r["decode_tps"] / base["decode_tps"]
    return out


def kl_rows(float_model, files: dict[str, Path], seqs: int, length: int, vocab: int) -> list[dict]:
    """Mean KL(p_float || p_quant) per token and top-1 agreement, per quant type."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (seqs, length), generator=g)
    with torch.no_grad():
        ref = torch.log_softmax(float_model(ids).logits.float(), dim=-1)
    out = []
    for q, path in files.items():
        m = _load(str(path), "float32", context=length)
        with torch.no_grad():
            got = torch.log_softmax(m(ids).logits.float(), dim=-1)
        kl = (ref.exp() * (ref - got)).sum(-1)
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        out.append(dict(type=q, mean_kl=kl.mean().item(), max_kl=kl.max().item(), top1_agree=agree))
        m.vramancer.detach()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2048, help="rows of the dequantized tensor")
    ap.add_argument("--cols", type=int, default=4096, help="values per row (a multiple of 256)")
    ap.add_argument("--types", default=",".join(DEQUANT_TYPES), help="GGUF types to time")
    ap.add_argument("--hidden", type=int, default=512, help="model hidden size (a multiple of 256)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--new", type=int, default=16, help="tokens per decode measurement")
    ap.add_argument("--kl-types", default=",".join(KL_TYPES))
    ap.add_argument("--kl-seqs", type=int, default=4)
    ap.add_argument("--kl-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 compares like for like with numpy's one)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="dequantization timings: wall clock, or this thread's CPU time (with --threads 1, "
                         "steadier on a machine other work shares)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    global _CLOCK
    _CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from vramancer.runtime.gguf.write import write_gguf

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                               "clock": args.clock}
    types = [t for t in args.types.split(",") if t]
    _log(f"1. dequantization, {args.rows} x {args.cols} values, median of {args.repeat}; "
         f"{torch.get_num_threads()} torch threads; {args.clock} clock")
    results["dequant"] = dequant_rows(args.rows, args.cols, args.repeat, types)

    with tempfile.TemporaryDirectory() as tmp:
        model = make_llama(args.hidden, args.layers, args.vocab)
        folder = Path(tmp) / "llama"
        model.save_pretrained(folder, safe_serialization=True)
        kl_types = [t for t in args.kl_types.split(",") if t]
        files = {q: write_gguf(model, Path(tmp) / f"llama-{q}.gguf", q, fallback="Q8_0").path
                 for q in sorted(set(kl_types) | {"Q8_0", "Q4_K"}, key=(kl_types + ["Q8_0", "Q4_K"]).index)}
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"2. decode, Llama {args.layers} layers x {args.hidden}, vocab {args.vocab}: {n_params / 1e6:.1f}M "
             f"parameters; {args.new} new tokens, median of {args.repeat}")
        results["decode"] = decode_rows(folder, {q: files[q] for q in ("Q8_0", "Q4_K")}, args.new, args.repeat,
                                        args.vocab)
        _log(f"3. quality: {args.kl_seqs} x {args.kl_len} tokens")
        results["kl"] = kl_rows(model, {q: files[q] for q in kl_types}, args.kl_seqs, args.kl_len, args.vocab)
        results["kv"] = __import__("benchmarks.kv_cache").kv_cache.kv_dtype_rows(folder, new=args.new)  # 4. --kv-dtype
        results["onload"] = __import__("benchmarks.quant_onload").quant_onload.onload_rows(folder, new=args.new)  # 5.

    _log("")
    _log(f"{'type':6s} {'numpy Mval/s':>13s} {'ours Mval/s':>13s} {'ratio':>7s} {'fresh ratio':>11s}  exact")
    for r in results["dequant"]:
        _log(f"{r['type']:6s} {r['values'] / r['numpy_s'] / 1e6:13.1f} "
             f"{r['values'] / r['torch_cpu_out_s'] / 1e6:13.1f} {r['ratio_cpu_out']:7.2f} {r['ratio_cpu']:11.2f}  "
             f"{'yes' if r['exact'] else 'NO'}"
             + (f"   cuda x{r['ratio_cuda']:.1f}" if "ratio_cuda" in r else ""))
    # the goal is the runtime's path: on the GPU, else on the CPU into the model's scratch
    worst = min(results["dequant"], key=lambda r: r.get("ratio_cuda", r["ratio_cpu_out"]))
    where = "cuda" if "ratio_cuda" in worst else "cpu, into the runtime's reused scratch"
    ratio = worst.get("ratio_cuda", worst["ratio_cpu_out"])
    _log(f"dequantization vs numpy reference ({where}): worst {worst['type']} x{ratio:.2f} — goal >= "
         f"{DEQUANT_GOAL:.0f}x: {'GOAL MET' if ratio >= DEQUANT_GOAL else 'GOAL NOT MET'}")
    if "ratio_cuda" not in worst:
        fresh = min(results["dequant"], key=lambda r: r["ratio_cpu"])
        _log(f"  into a fresh output each call (page faults on every call): worst {fresh['type']} "
             f"x{fresh['ratio_cpu']:.2f}")
    _log("")
    _log(f"{'variant':10s} {'weights':>12s} {'planned':>12s} {'mem ratio':>9s} {'plan ratio':>10s} "
         f"{'decode tok/s':>12s} {'speed ratio':>11s}")
    for r in results["decode"]:
        _log(f"{r['variant']:10s} {r['weights_bytes']:12,d} {r['planned_weights_bytes']:12,d} {r['memory_ratio']:9.3f} "
             f"{r['planned_memory_ratio']:10.3f} {r['decode_tps']:12.1f} {r['speed_ratio']:11.2f}")
    same = all(r["weights_bytes"] == r["planned_weights_bytes"] for r in results["decode"])
    _log(f"measured weight bytes equal the plan's for every variant: {'GOAL MET' if same else 'GOAL NOT MET'}")
    _log("")
    _log(f"{'type':6s} {'mean KL (nats/token)':>21s} {'max KL':>9s} {'top-1 agrees':>12s}")
    for r in results["kl"]:
        _log(f"{r['type']:6s} {r['mean_kl']:21.6f} {r['max_kl']:9.4f} {r['top1_agree']:12.1%}")
    _log("Q2_K, Q3_K: no encoder here (dequantized exactly, see 1; not rated)")
    results["moe"] = __import__("runpy").run_path(str(Path(__file__).with_name("moe.py")))["run"](["--layers", str(max(3, args.layers)), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--new", str(max(3, args.new)), "--repeat", str(args.repeat)] + (["--threads", str(args.threads)] if args.threads else []))  # noqa: E501 - 4. MoE experts on the CPU vs whole layers offloaded (benchmarks/moe.py)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
