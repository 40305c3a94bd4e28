"""Does the cost model predict what the CPU really does? Measured decode and prefill tokens/s of a few
random-weight Llamas run with transformers on this machine's CPU, next to what ``vramancer plan``
predicts for device "cpu", and their ratio (measured / predicted; goal 0.7-1.3 for every row).

1. The host figures the prediction uses are measured in this process just before each model, by
   ``vramancer.runtime.calibrate.measure_host_speed()`` (GEMV bandwidth, prefill matmul FLOP/s, fixed
   cost per block, per generation step and per request: see vramancer/devices/host_speed.py). No per-model
   figure is fitted: every model below is predicted from those four numbers and its own profile.
2. Each model (float32, built from a transformers config with random weights) generates the way
   ``vramancer run`` does (``generate_text``: greedy, KV cache, a streamer noting each step): decode
   tokens/s after the first new token, prefill tokens/s of a ``--prompt``-token prompt (call to first
   token). Medians of ``--repeat`` runs.
3. The prediction: ``plan_profile`` of the model's profile on device "cpu", with context = prompt +
   new tokens and prefill chunk = the prompt (the workload that was measured).

Run:  python benchmarks/cost_model.py [--repeat 3] [--prompt 128] [--new 24] [--threads N] [--save] [--json FILE]
``--save`` keeps the measured host figures (under the cache folder) so later plans on this machine
use them. A benchmark, not a test: it exits 0 and prints "GOAL MET" / "GOAL NOT MET". The machine
is shared: other processes running at the same time slow the measured side only; rerun when a
ratio is off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = (0.7, 1.3)

# name -> LlamaConfig fields (vocab included); from tiny (fixed costs dominate) to ~300M parameters
# (bandwidth dominates), none the calibration's own shape
MODELS = {
    "tiny-2L-h128": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024),
    "demo-8L-h512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024),
    "small-8L-h1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=32000),
    "mid-6L-h2048": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000),
}


@dataclass
class Row:
    model: str
    params_m: float
    measured_decode_tps: float
    predicted_decode_tps: float
    measured_prefill_tps: float
    predicted_prefill_tps: float

    @property
    def decode_ratio(self) -> float:
        return self.measured_decode_tps / self.predicted_decode_tps

    @property
    def prefill_ratio(self) -> float:
        return self.measured_prefill_tps / self.predicted_prefill_tps


def _measure(model, tok, prompt: int, new: int, repeat: int) -> tuple[float, float]:
    import torch

    from vramancer.runtime.generate import _timing_streamer, generate_ids

    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(10, len(tok), (1, prompt))}
    dec, pre = [], []
    for i in range(repeat + 1):
        streamer = _timing_streamer(tok, None)
        start = __import__("time").perf_counter()
        generate_ids(model, inputs, new, streamer=streamer, min_new_tokens=new, pad_token_id=tok.pad_token_id)
        t = streamer.times[1:]
        if i == 0:
            continue  # warm-up
        pre.append(prompt / (t[0] - start))
        dec.append((len(t) - 1) / (t[-1] - t[0]))
    return statistics.median(dec), statistics.median(pre)


def _predict(model, prompt: int, new: int) -> tuple[float, float]:
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.plan import Workload
    from vramancer.plan.planner import plan_profile

    prof = profile(model)
    p = plan_profile(prof, parse_devices("cpu"), Workload(context=prompt + new, prefill_chunk=prompt,
                                                          dtype=prof.dtype), suggest=False)
    return p.predicted.decode_tokens_per_s, p.predicted.prefill_tokens_per_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names from: " + ", ".join(MODELS))
    ap.add_argument("--save", action="store_true", help="keep the measured host figures for later plans")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from vramancer.devices.host_speed import save_host_speed
    from vramancer.runtime.calibrate import measure_host_speed
    from vramancer.runtime.demo_model import build_demo_tokenizer

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)   # the figures are kept per thread count
    tmp = None
    if not args.save:  # predictions use this run's figures without touching the kept ones
        tmp = tempfile.TemporaryDirectory(prefix="vramancer-cost-")
        os.environ["VRAMANCER_CACHE_DIR"] = tmp.name
    def calibrate():
        speed = measure_host_speed()
        where = save_host_speed(speed)
        print(f"host ({speed.fingerprint}, load {os.getloadavg()[0]:.1f}): GEMV "
              f"{speed.bandwidth_bytes_per_s / 1e9:.1f} GB/s, GEMM {speed.gemm_flops_per_s / 1e9:.1f} GFLOP/s, "
              f"{speed.block_overhead_s * 1e3:.2f} ms per block, {speed.step_overhead_s * 1e3:.2f} ms per step, "
              f"{speed.request_overhead_s * 1e3:.1f} ms to a first token, "
              f"{speed.parallel_op_s * 1e3:.2f} ms per parallel op"
              + (f"  (kept in {where})" if args.save else ""), flush=True)
        return speed

    tok = build_demo_tokenizer()
    rows: list[Row] = []
    hosts: list[dict] = []
    for name in args.models.split(","):
        cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **MODELS[name])
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        if cfg.vocab_size < len(tok):
            raise SystemExit(f"{name}: vocab {cfg.vocab_size} < tokenizer {len(tok)}")
        speed = calibrate()   # just before the model: the same load on a shared machine
        md, mp = _measure(model, tok, args.prompt, args.new, args.repeat)
        pd, pp = _predict(model, args.prompt, args.new)
        row = Row(name, sum(p.numel() for p in model.parameters()) / 1e6, md, pd, mp, pp)
        rows.append(row)
        hosts.append(speed.to_dict())
        print(f"{name:15s} {row.params_m:6.1f}M  decode {md:7.1f} measured / {pd:7.1f} predicted = "
              f"{row.decode_ratio:4.2f}   prefill {mp:8.1f} / {pp:8.1f} = {row.prefill_ratio:4.2f}", flush=True)
        del model
    ratios = [r for row in rows for r in (row.decode_ratio, row.prefill_ratio)]
    ok = all(GOAL[0] <= r <= GOAL[1] for r in ratios)
    print(f"{'GOAL MET' if ok else 'GOAL NOT MET'}: measured/predicted in {min(ratios):.2f}..{max(ratios):.2f} "
          f"(goal {GOAL[0]}..{GOAL[1]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [
            {**asdict(r), "decode_ratio": r.decode_ratio, "prefill_ratio": r.prefill_ratio, "host": h}
            for r, h in zip(rows, hosts)]}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
