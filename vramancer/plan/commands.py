"""`vramancer plan MODEL`: how to split a model over devices, before loading anything."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import WorkloadError

__all__ = ["configure", "main", "add_planner_flags", "planner_kwargs", "render_plan"]


def add_planner_flags(p: argparse.ArgumentParser, devices_default: str = "auto") -> None:
    """The planner's options, shared by every command that plans (plan, run, serve, ...)."""
    p.add_argument("-d", "--devices", default=devices_default,
                   help="device spec: auto (this machine), or e.g. rtx3090,rtx3060,cpu:64GiB "
                        "(see `vramancer devices --catalog`)")
    p.add_argument("-c", "--context", type=int, default=4096, help="tokens of context per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--dtype", default=None,
                   help="weights dtype: bfloat16, float16, float32, int8, nf4, q8_0, q6_k, q4_k_m, ... "
                        "(default: the checkpoint's)")
    p.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                   help="latency: one stream, fastest devices take more blocks; "
                        "throughput: many streams, balance the slowest stage")
    p.add_argument("--split", default=None, help="manual proportions over the GPUs in the order given, "
                   "like llama.cpp --tensor-split (e.g. 3,1)")
    p.add_argument("--reserve", default=None, help="memory kept free per GPU (default 512MiB + 2%% of the card)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill step (default 512)")
    p.add_argument("--backing", default="cpu", help="real torch device behind simulated GPUs (default cpu)")


def parse_split(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from .planner import check_split

    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise WorkloadError(f"--split must be numbers separated by commas, like 3,1 (got {text!r})") from None
    return check_split(parts)


def planner_kwargs(args: argparse.Namespace) -> dict:
    return dict(devices=args.devices, context=args.context, batch=args.batch, dtype=args.dtype,
                objective=args.objective, split=parse_split(args.split), reserve_bytes=args.reserve,
                prefill_chunk=args.prefill_chunk, backing=args.backing)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="catalog name (llama-3.1-70b), local HF folder, .safetensors, "
                   ".gguf, or an HF id in the local cache")
    add_planner_flags(p)
    p.add_argument("--json", action="store_true", help="print the Plan JSON")
    p.add_argument("-o", "--output", default=None, help="also write the Plan JSON to this file")
    p.add_argument("--list-models", action="store_true", help="list the built-in model catalog")


def _block_label(start: int, end: int, n: int) -> str:
    """Blocks [start, end) as a person reads them: "embed+L0-16", "L17-55", "L56-79+head"."""
    parts = []
    if start == 0:
        parts.append("embed")
    lo, hi = max(start, 1), min(end, n - 1)
    if hi > lo:
        parts.append(f"L{lo - 1}" if hi - lo == 1 else f"L{lo - 1}-{hi - 2}")
    if end == n:
        parts.append("head")
    return "+".join(parts)


def _short_bytes(n: int) -> str:
    """Compact GiB/MiB for table cells: "8.9G", "758M"."""
    from ..units import GiB, MiB

    if abs(n) >= GiB:
        return f"{n / GiB:.1f}G"
    return f"{n / MiB:.0f}M"


def _bar(used: int, cap: int, width: int = 8) -> str:
    if cap <= 0:
        return ""
    frac = used / cap
    full = int(round(min(frac, 1.0) * width))
    color = "green" if frac < 0.9 else ("yellow" if frac <= 1.0 else "red")
    return f"[{color}]{'█' * full}[/][dim]{'░' * (width - full)}[/]{frac:4.0%}"


def render_plan(plan, console) -> None:
    from rich.table import Table

    from ..units import format_bytes as fb

    n = len(plan.blocks)
    names = {d.id: d.name for d in plan.devices}
    w = plan.workload
    console.print(f"[bold]{plan.model}[/]  context {w.context:,} · batch {w.batch} · {w.dtype} · {w.objective}")
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col, just in (("#", "right"), ("device", "left"), ("blocks", "left"), ("weights", "right"),
                      ("KV", "right"), ("act", "right"), ("rsv", "right"), ("free", "right"),
                      ("used", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    buffer_left = {b.device: b.buffer_bytes for b in plan.stream_buffers}   # shown with the device's first stage
    for i, s in enumerate(plan.stages):
        held = s.total_bytes + buffer_left.pop(s.device, 0)
        free = s.capacity_bytes - held
        t.add_row(str(i), s.device, _block_label(*s.blocks, n), _short_bytes(s.weights_bytes),
                  _short_bytes(s.kv_cache_bytes), _short_bytes(s.activation_bytes), _short_bytes(s.reserve_bytes),
                  ("[red]" + _short_bytes(free) + "[/]") if free < 0 else _short_bytes(free),
                  _bar(held, s.capacity_bytes))
    # never cut a device name or a figure: wider than the terminal, the terminal wraps the rows
    natural, width = console.measure(t, options=console.options.update_width(10_000)).maximum, console.width
    console.width = max(width, natural)
    try:
        console.print(t)
    finally:
        console.width = width
    for s in plan.stages:
        label = names.get(s.device, s.device)
        how = ""
        if s.kind != "gpu":
            how = (f": weights stay here, streamed to {s.compute_device} before each use" if s.mode == "stream"
                   else ": runs here")
        console.print(f"[dim]  {s.device} = {label}{how}[/]")
    for b in plan.stream_buffers:
        console.print(f"[dim]  stream buffer on {b.device}: {_short_bytes(b.buffer_bytes)} "
                      f"(two slots, for stage{'s' if len(b.stages) > 1 else ''} "
                      f"{', '.join(str(i) for i in b.stages)})[/]")
    p = plan.predicted
    if plan.fits:
        console.print(f"[bold green]Fits on the GPUs.[/] Largest context for this split: "
                      f"[bold]{plan.max_context:,}[/] tokens.")
    elif plan.manual_split and plan.shortfall_bytes and not plan.offloaded:
        console.print(f"[bold red]Does not fit:[/] {plan.notes[-1]}")
    else:
        console.print(f"[bold yellow]Does not fit on the GPUs[/]: {fb(plan.shortfall_bytes)} short; "
                      f"{sum(s.num_blocks for s in plan.offloaded)} of {n} blocks run from "
                      + ", ".join(f"{s.device} ({s.mode})" for s in plan.offloaded) + ".")
        for sgg in plan.suggestions:
            console.print(f"  to fit on the GPUs: {sgg}")
    console.print(f"Predicted: [bold]{p.decode_tokens_per_s:.1f}[/] tokens/s decode "
                  f"({p.decode_ms_per_step:.1f} ms/token), {p.prefill_tokens_per_s:,.0f} tokens/s prefill.")
    for note in plan.notes:
        if plan.fits or not note.startswith("does not fit"):
            console.print(f"[dim]note: {note}[/]")
    if plan.exports:
        # commands to copy: never wrapped (soft_wrap), never read as markup
        console.print(f"llama.cpp: {plan.exports['llama_cpp']}", style="dim", soft_wrap=True, markup=False)
        console.print(f"vLLM: VLLM_PP_LAYER_PARTITION={plan.exports['vllm_pp_layer_partition']}", style="dim",
                      soft_wrap=True, markup=False)


def _list_models(console, as_json: bool = False) -> int:
    import json

    from ..models.catalog import list_models
    from ..terminal import Column, print_table

    models = list_models()
    if as_json:
        sys.stdout.write(json.dumps({"schema": 1, "models": [
            {"name": m.key, "hf_id": m.hf_id, "kind": m.kind, "description": m.description,
             "aliases": list(m.aliases), "params_published": m.params_published, "default_dtype": m.default_dtype}
            for m in models]}, indent=2) + "\n")
        return 0


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .planner import plan

    console = Console()
    if not console.is_terminal:  # pipes and logs: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 110))
    if args.list_models:
        return _list_models(console, as_json=args.json)
    if not args.model:
        raise WorkloadError("which model? e.g. `vramancer plan llama-3.1-8b` (see --list-models)")
    if args.output:   # a path that cannot be written is refused before the planning, not after it
        from .._io import check_writable

        check_writable(args.output, "-o")
    kwargs = planner_kwargs(args)
    target = args.model
    fetch = None
    if "/" in str(args.model) and not Path(args.model).expanduser().exists():
        from ..hub.resolve import remote_fetch  # only for a Hub id: catalog plans stay torch- and network-free

        fetch = remote_fetch(args.model, dtype=kwargs.get("dtype"))
        if fetch is not None:
            target = fetch.profile
    result = plan(target, **kwargs)
    if fetch is not None:
        print(f"not on this machine: a run would download {fetch.announce()}", file=sys.stderr)
    if args.output:
        result.save(args.output)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        render_plan(result, console)
    if result.manual_split and not result.fits and not result.offloaded:
        # a manual split that overflows a device cannot run: one line and exit 3 ("does not fit")
        print(f"vramancer: error: {result.notes[-1]}", file=sys.stderr)
        return 3
    return 0
