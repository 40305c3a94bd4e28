"""`vramancer devices`: the devices a plan can use, real or simulated."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--devices", default="auto", help="device spec (default: auto = this machine's devices); "
                   "e.g. rtx3090,rtx3060:10GiB,cpu:64GiB or mygpu:16GiB@448GBps@30TFLOPS")
    p.add_argument("--backing", default="cpu", help="real torch device behind simulated ones (default cpu)")
    p.add_argument("--catalog", action="store_true", help="list the built-in GPU catalog instead")
    p.add_argument("--json", action="store_true", help="print Device JSON")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..terminal import Column, print_table
    from ..units import format_bytes

    console = Console(highlight=False)
    if args.catalog:
        from .catalog import list_gpus

        gpus = list_gpus()
        if args.json:
            gpu_docs = [g.__dict__ | {"aliases": list(g.aliases)} for g in gpus]
            print(json.dumps({"schema": 1, "gpus": gpu_docs}, indent=2))
            return 0
        columns = [Column("key", key=True), Column("name"), Column("memory", right=True),
                   Column("bandwidth", right=True), Column("FP16 TFLOPS", right=True), Column("host link", right=True)]
        rows = [(g.key, g.name, format_bytes(g.memory_bytes), f"{g.bandwidth_bytes_per_s / 1e9:.0f} GB/s",
                 f"{g.tflops:.1f}", f"{g.link_bandwidth_bytes_per_s / 1e9:.1f} GB/s") for g in gpus]
        print_table(console, f"GPU catalog ({len(gpus)} GPUs)", columns, rows)
        return 0

    from .device import devices_to_json
    from .spec import check_backing, parse_devices

    devices = parse_devices(args.devices, backing=check_backing(args.backing))
    if args.json:
        print(json.dumps(devices_to_json(devices), indent=2))
        return 0
    columns = [Column("id", key=True), Column("name"), Column("kind"), Column("free / total", right=True),
               Column("bandwidth", right=True), Column("TFLOPS", right=True), Column("backing")]
    rows = [(d.id, d.name, d.kind, f"{format_bytes(d.free_bytes)} / {format_bytes(d.total_bytes)}",
             f"{d.bandwidth_bytes_per_s / 1e9:.0f} GB/s", f"{d.tflops:.1f}" if d.tflops else "-",
             (f"simulated on {d.backing}" if d.simulated else "real")) for d in devices]
    print_table(console, "Devices", columns, rows)
    if not any(d.kind == "gpu" for d in devices) and not getattr(args, "quiet", False):
        print("No GPU found. Simulate some to plan for them: vramancer devices --devices rtx3090,rtx3060",
              file=sys.stderr)
    return 0
