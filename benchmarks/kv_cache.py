"""KV-cache formats (``--kv-dtype``, runtime/kvcache.py) on one model split over two simulated GPUs,
against the same model's cache at its compute dtype, measured in the same run:

* KV bytes per stage after a greedy generation, measured and planned (they must be equal), and
  their ratio to the float cache's;
* greedy agreement: the share of the ``new`` greedy tokens equal to the float cache's (position by
  position) and the first position where they differ;
* quality: mean KL divergence (nats per token) of the next-token distribution from the float
  cache's, and top-1 agreement, over one teacher-forced random sequence (its keys and values go
  through the format before the attention reads them, as in decoding);
* decode tokens/s (greedy, one sequence; dequantizing each layer's cache on every step costs time).

Run:  python benchmarks/kv_cache.py [--hidden 512] [--layers 8] [--new 32] [--json FILE]
      (benchmarks/quantized.py prints the same table for its own model)
A benchmark, not a test: it always exits 0.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import saved_llama_main  # noqa: E402

__all__ = ["KV_DTYPES", "kv_dtype_rows", "main"]

KV_DTYPES = ("bfloat16", "fp8", "q8_0")
PROMPT = 8


def _log(msg: str) -> None:
    print(msg, flush=True)


def kv_dtype_rows(folder: str | Path, new: int = 16, kv_dtypes: tuple[str, ...] = KV_DTYPES,
                  devices: str = "rtx4090,rtx3090", log=_log) -> list[dict]:
    """One row per KV format of the model in ``folder`` (a float checkpoint; heads of a multiple of
    32 values for q8_0), the compute-dtype cache first (``kv_dtype`` None); prints the table."""
    import torch

    from vramancer.plan.planner import plan as make_plan
    from vramancer.runtime.generate import generate_ids
    from vramancer.runtime.kvcache import kv_cache_for
    from vramancer.runtime.loader import load

    held = PROMPT + new - 1            # tokens the cache holds after ``new`` greedy tokens
    rows: list[dict[str, Any]] = []
    ref_tokens: list[int] = []
    ref_logp = None
    for kv in (None, *kv_dtypes):
        plan = make_plan(str(folder), devices=devices, split=[1, 1], context=held, kv_dtype=kv)
        model = load(str(folder), plan=plan)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        seq = torch.randint(3, vocab, (1, held), generator=torch.Generator().manual_seed(1))
        generate_ids(model, {"input_ids": prompt}, 1, pad_token_id=0)   # warm-up: the first call's costs
        start = time.perf_counter()
        out = generate_ids(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, new,
                           pad_token_id=0, min_new_tokens=new)
        seconds = time.perf_counter() - start
        tokens = out[0, PROMPT:].tolist()
        rep = model.vramancer.memory_report()
        measured = [r.kv_cache_bytes for r in rep.stages]
        planned = [s.kv_cache_bytes for s in plan.stages]
        with torch.no_grad():
            cache = kv_cache_for(model)
            logits = model(seq, **({"cache": cache} if cache is not None else {}), use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        row: dict[str, Any] = dict(kv_dtype=kv or plan.workload.dtype, kv_bytes=sum(measured),
                                   planned_kv_bytes=sum(planned), stages_equal=measured == planned,
                                   kv_bytes_per_token=sum(b.kv_bytes_per_token for b in plan.blocks),
                                   decode_tps=new / seconds, tokens=tokens)
        if kv is None:
            ref_tokens, ref_logp = tokens, logp
        same = [a == b for a, b in zip(tokens, ref_tokens)]
        row["greedy_agree"] = sum(same) / max(len(ref_tokens), 1)
        row["first_diff"] = same.index(False) if False in same else None
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        row["mean_kl"] = float(kl.mean())
        row["top1_agree"] = float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean())
        rows.append(row)
        model.vramancer.detach()
    base = rows[0]
    for r in rows:
        r["memory_ratio"] = r["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else 0.0
        r["speed_ratio"] = r["decode_tps"] / base["decode_tps"]
    log(f"KV cache formats, {held} tokens held on 2 stages, {new} greedy tokens (vs the {base['kv_dtype']} cache)")
    log(f"{'kv dtype':9s} {'B/token':>8s} {'KV bytes':>10s} {'planned':>10s} {'mem ratio':>9s} {'greedy':>7s} "
        f"{'1st diff':>8s} {'mean KL':>9s} {'top-1':>6s} {'tok/s':>7s} {'speed':>6s}")
    for r in rows:
        diff = "-" if r["first_diff"] is None else str(r["first_diff"])
        log(f"{r['kv_dtype']:9s} {r['kv_bytes_per_token']:8d} {r['kv_bytes']:10,d} {r['planned_kv_bytes']:10,d} "
            f"{r['memory_ratio']:9.3f} {r['greedy_agree']:7.1%} {diff:>8s} "
            f"{r['mean_kl']:9.5f} {r['top1_agree']:6.1%} {r['decode_tps']:7.1f} {r['speed_ratio']:6.2f}")
    ok = all(r["stages_equal"] for r in rows)
    log(f"measured KV bytes per stage equal the plan's for every format: {'GOAL MET' if ok else 'GOAL NOT MET'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return saved_llama_main(argv, __doc__.splitlines()[0], kv_dtype_rows, "kv", new_default=32)


if __name__ == "__main__":
    raise SystemExit(main())
