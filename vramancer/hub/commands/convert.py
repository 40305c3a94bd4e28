"""`vramancer convert SRC DST [--dtype D] [--plan PLAN]`: a published checkpoint (pytorch_model.bin,
sharded .bin, GGUF, or safetensors in another dtype or layout) as a new safetensors folder DST,
written atomically. With --plan, one shard per plan stage and an index, so each machine of a split
fetches only its own shards (see vramancer/hub/convert.py)."""
from __future__ import annotations

import argparse

__all__ = ["configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="model folder (.bin or safetensors), .bin / .safetensors / .gguf "
                   "file, or an HF id in the local cache")
    p.add_argument("dst", metavar="DST", help="new folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default=None, help="cast floating weights: float32, float16 or bfloat16 "
                   "(default: as stored; float32 for GGUF; the plan's with --plan)")
    p.add_argument("--plan", default=None, metavar="PLAN",
                   help="one shard per stage of this plan (from `vramancer plan ... -o PLAN`)")
    p.add_argument("--max-shard-size", default="5GiB", metavar="SIZE",
                   help="largest shard without --plan (default 5GiB)")


def main(args: argparse.Namespace) -> int:
    import sys

    from ...errors import WorkloadError
    from ...units import format_bytes, parse_bytes
    from ..convert import convert

    try:
        max_shard = parse_bytes(args.max_shard_size)
    except ValueError as e:
        raise WorkloadError(f"--max-shard-size: {e}") from None
    plan = None
    if args.plan:
        from ...plan.plan import Plan

        plan = Plan.load(args.plan)
    result = convert(args.src, args.dst, dtype=args.dtype, plan=plan, max_shard_bytes=max_shard,
                     log=lambda line: print(line, file=sys.stderr))
    print(f"{result.folder}: {result.tensors} tensors, {format_bytes(result.weights_bytes)} in "
          f"{len(result.shards)} shard{'s' if len(result.shards) != 1 else ''}"
          + (f" ({result.dtype})" if result.dtype else "") + f", from {result.source_kind}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
