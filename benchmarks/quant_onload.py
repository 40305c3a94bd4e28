"""Weights quantized on load (``--dtype nf4 | int4 | int8``, runtime/quant/) on one float model split over
two simulated GPUs, against the same model in float32 (and bfloat16) measured in the same run:

* weight bytes measured after generating and planned (they must be equal), and their ratio to fp32;
* quality: mean KL divergence (nats per token) of the next-token distribution from float32's and
  top-1 agreement over one random sequence;
* decode tokens/s (greedy, one sequence, after a warm-up).

Rows: bfloat16, nf4 and int4 (bitsandbytes NF4 / FP4), int8 (bitsandbytes LLM.int8) and int8 through
torchao (weight-only) when installed.
Run:  python benchmarks/quant_onload.py [--hidden 512] [--layers 8] [--json FILE]
      (benchmarks/quantized.py prints the same table for its own model)
A benchmark, not a test: it always exits 0.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import saved_llama_main  # noqa: E402

__all__ = ["VARIANTS", "onload_rows", "main"]

# (label, --dtype, quant backend)
VARIANTS = (("float32", "float32", None), ("bfloat16", "bfloat16", None), ("nf4", "nf4", None),
            ("int4 (fp4)", "int4", None), ("int8", "int8", "bitsandbytes"), ("int8 torchao", "int8", "torchao"))


def _log(msg: str) -> None:
    print(msg, flush=True)


def onload_rows(folder: str | Path, new: int = 16, seq_len: int = 32, devices: str = "rtx4090,rtx3090",
                log=_log) -> list[dict]:
    """One row per variant of the float checkpoint in ``folder`` (float32 first); prints the table."""
    import torch

    from vramancer.plan.planner import plan as make_plan
    from vramancer.runtime.generate import generate_ids
    from vramancer.runtime.loader import load

    rows: list[dict[str, Any]] = []
    ref_logp = None
    for label, dtype, backend in VARIANTS:
        if backend == "torchao" and importlib.util.find_spec("torchao") is None:
            continue
        plan = make_plan(str(folder), devices=devices, split=[1, 1], context=max(seq_len, 8 + new), dtype=dtype)
        model = load(str(folder), plan=plan, quant_backend=backend)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        seq = torch.randint(3, vocab, (1, seq_len), generator=torch.Generator().manual_seed(1))
        generate_ids(model, {"input_ids": prompt}, 1, pad_token_id=0)   # warm-up
        start = time.perf_counter()
        generate_ids(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, new,
                     pad_token_id=0, min_new_tokens=new)
        seconds = time.perf_counter() - start
        measured = [r.weights_bytes for r in model.vramancer.memory_report().stages]
        planned = [s.weights_bytes for s in plan.stages]
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits.float(), dim=-1)
        if ref_logp is None:
            ref_logp = logp
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        top1 = float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean())
        rows.append(dict(variant=label, dtype=dtype, backend=backend, weights_bytes=sum(measured),
                         planned_weights_bytes=sum(planned), stages_equal=measured == planned,
                         mean_kl=float(kl.mean()), top1_agree=top1, decode_tps=new / seconds))
        model.vramancer.detach()
    base = rows[0]
    for r in rows:
        r["memory_ratio"] = r["weights_bytes"] / base["weights_bytes"]
        r["speed_ratio"] = r["decode_tps"] / base["decode_tps"]
    log(f"weights quantized on load, 2 stages, {new} greedy tokens; quality over {seq_len} tokens vs float32")
    log(f"{'variant':13s} {'weights':>11s} {'planned':>11s} {'mem ratio':>9s} {'mean KL':>9s} {'top-1':>6s} "
        f"{'tok/s':>7s} {'speed':>6s}")
    for r in rows:
        log(f"{r['variant']:13s} {r['weights_bytes']:11,d} {r['planned_weights_bytes']:11,d} {r['memory_ratio']:9.3f} "
            f"{r['mean_kl']:9.5f} {r['top1_agree']:6.1%} {r['decode_tps']:7.1f} {r['speed_ratio']:6.2f}")
    ok = all(r["stages_equal"] for r in rows)
    log(f"measured weight bytes per stage equal the plan's for every variant: {'GOAL MET' if ok else 'GOAL NOT MET'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return saved_llama_main(argv, __doc__.splitlines()[0], onload_rows, "onload", new_default=16)


if __name__ == "__main__":
    raise SystemExit(main())
