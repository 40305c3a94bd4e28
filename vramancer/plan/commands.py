"""`vramancer plan MODEL`: how to split a model over devices, before loading anything."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import WorkloadError
from ..units import format_bytes

__all__ = ["configure", "main", "add_planner_flags", "planner_kwargs", "render_plan", "warn_context", "story_for",
           "plan_or_partial", "profile_or_none", "TRAINED_MAX_NOTE"]


def add_planner_flags(p: argparse.ArgumentParser, devices_default: str = "auto") -> None:
    """The planner's options, shared by every command that plans (plan, run, serve, ...)."""
    p.add_argument("-d", "--devices", default=devices_default,
                   help="device spec: auto (this machine), or e.g. rtx3090,rtx3060,cpu:64GiB "
                        "(see `vramancer devices --catalog`)")
    p.add_argument("-c", "--context", type=int, default=None,
                   help="tokens of context per sequence (default 4096, or the model's trained maximum when smaller)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--dtype", default=None,
                   help="weights dtype: bfloat16, float16, float32, int8, nf4, q8_0, q6_k, q4_k_m, ... "
                        "(default: the checkpoint's)")
    p.add_argument("--kv-dtype", default=None,
                   help="KV cache storage, like llama.cpp -ctk/-ctv: q8_0 (int8 + an fp16 scale per 32 values), "
                        "fp8 (e4m3), bf16, f16, f32 (default: the compute dtype)")
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
                prefill_chunk=args.prefill_chunk, backing=args.backing, kv_dtype=getattr(args, "kv_dtype", None))


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="catalog name (llama-3.1-70b), local HF folder, .safetensors, "
                   ".gguf, or an HF id in the local cache")
    add_planner_flags(p)
    p.add_argument("--json", action="store_true", help="print the Plan JSON")
    p.add_argument("-o", "--output", default=None, help="also write the Plan JSON to this file")
    p.add_argument("--list-models", action="store_true", help="list the built-in model catalog")
    from ..cluster.commands import add_cluster_flags

    add_cluster_flags(p)
    from .pipeline import add_image_flags

    add_image_flags(p)


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


def _tps(x: float) -> str:
    """Tokens/s with the digits that mean something: "0.031", "2.4", "39.5", "2,343"."""
    if x < 1:
        return f"{x:.2g}"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render_plan(plan, console, story=None) -> None:
    """The plan as a table and a few lines: the pipeline path and why, whether it fits (one
    message), what to try when it does not (``story.advice``), unused devices, what it predicts
    (and on the device behind simulated GPUs), and the exports that apply."""
    from rich.table import Table

    from ..units import format_bytes as fb
    from .advice import shortfall_by_device
    from .explain import pipeline_path, pipeline_why, repeated_devices

    n = len(plan.blocks)
    names = {d.id: d.name for d in plan.devices}
    w = plan.workload
    short = shortfall_by_device(plan)
    used_on = plan.device_used_bytes()
    kv = f" · KV {w.kv_dtype}" if w.kv_dtype else ""
    console.print(f"[bold]{plan.model}[/]  context {w.context:,} · batch {w.batch} · {w.dtype}{kv} · {w.objective}")
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col, just in (("#", "right"), ("device", "left"), ("blocks", "left"), ("weights", "right"),
                      ("KV", "right"), ("act", "right"), ("rsv", "right"), ("free", "right"),
                      ("used", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    first_row: dict[str, int] = {}
    for i, s in enumerate(plan.stages):
        if s.device in first_row:  # a device met again: its totals are on its first row
            free_cell, used_cell = "", f"[dim]in #{first_row[s.device]}[/]"
        else:
            first_row[s.device] = i
            held = used_on.get(s.device, s.total_bytes)
            free = s.capacity_bytes - held
            free_cell = ("[red]" + _short_bytes(free) + "[/]") if free < 0 else _short_bytes(free)
            used_cell = _bar(held, s.capacity_bytes)
        t.add_row(str(i), s.device, _block_label(*s.blocks, n), _short_bytes(s.weights_bytes),
                  _short_bytes(s.kv_cache_bytes), _short_bytes(s.activation_bytes), _short_bytes(s.reserve_bytes),
                  free_cell, used_cell)
    for ex in plan.experts_ranges():   # MoE routed experts in host RAM (counted in the host's free)
        of = "[dim]of #" + ", #".join(map(str, ex["stages"])) + "[/]"
        t.add_row("x", ex["device"], "experts " + _block_label(*ex["blocks"], n).replace("embed+", ""),
                  _short_bytes(ex["weights_bytes"]), "", "", "", "", of)
    # never cut a device name or a figure: wider than the terminal, the terminal wraps the rows
    natural, width = console.measure(t, options=console.options.update_width(10_000)).maximum, console.width
    console.width = max(width, natural)
    try:
        console.print(t)
    finally:
        console.width = width
    for dev in first_row:
        s = plan.stages[first_row[dev]]
        how = ""
        if s.kind != "gpu":
            how = (f": weights stay here, streamed to {s.compute_device} before each use" if s.mode == "stream"
                   else f": weights stay here; decode runs here, prefill streams them to {s.compute_device}"
                   if s.mode == "phase" else ": runs here")
        console.print(f"[dim]  {dev} = {names.get(dev, dev)}{how}[/]")
    for b in plan.stream_buffers:
        console.print(f"[dim]  stream buffer on {b.device}: {_short_bytes(b.buffer_bytes)} "
                      f"(two slots, for stage{'s' if len(b.stages) > 1 else ''} "
                      f"{', '.join(str(i) for i in b.stages)})[/]")
    for dev, idx in repeated_devices(plan).items():
        cap = plan.stages[idx[0]].capacity_bytes
        console.print(f"  {dev} appears twice: stages {' and '.join(str(i) for i in idx)}, "
                      f"{fb(used_on.get(dev, 0))} of {fb(cap)} in all (one reserve)")
    if len(plan.stages) > 1:
        why = pipeline_why(plan)
        console.print(f"pipeline: {pipeline_path(plan)}" + (f"  [dim]({why})[/]" if why else ""), soft_wrap=True)
    advice = list(story.advice) if story is not None else []
    gpus = [d for d in plan.devices if d.kind == "gpu"]
    if plan.fits:
        console.print(f"[bold green]Fits on the GPUs.[/] Largest context for this split: "
                      f"[bold]{plan.max_context:,}[/] tokens.")
    elif short:
        # the shortage itself is the error line (stderr); here: the closest placement above, and what to try
        console.print("[bold red]Does not fit[/]: above is the closest placement (negative free: what is short)."
                      + (" To fit, try one of:" if advice else ""))
    elif not gpus:
        console.print(f"No GPU in --devices: all {n} blocks run from "
                      + ", ".join(f"{s.device} ({s.mode})" for s in plan.offloaded) + ".")
    else:
        off = sum(s.num_blocks for s in plan.offloaded)
        console.print(f"[bold yellow]Offloaded[/]: {off} of {n} blocks ({fb(plan.shortfall_bytes)}) do not fit on "
                      "the GPUs and run from " + ", ".join(f"{s.device} ({s.mode})" for s in plan.offloaded) + "."
                      + (" To fit on the GPUs, try one of:" if advice else ""))
    for a in advice:
        console.print(f"  {a.text}", soft_wrap=True, markup=False)
    for line in (story.unused if story is not None else ()):
        console.print(f"[dim]{line}[/]", soft_wrap=True)
    p = plan.predicted
    console.print(("Predicted for this placement" if short else "Predicted") +
                  f": [bold]{_tps(p.decode_tokens_per_s)}[/] tokens/s decode "
                  f"({p.decode_ms_per_step:.1f} ms/token), {_tps(p.prefill_tokens_per_s)} tokens/s prefill"
                  + (" on the cards named." if story and story.backing else "."))
    if story is not None and story.backing is not None:
        b = story.backing
        console.print(f"  Simulated cards run on {b.device} here: [bold]{_tps(b.predicted.decode_tokens_per_s)}[/] "
                      f"tokens/s decode, {_tps(b.predicted.prefill_tokens_per_s)} tokens/s prefill predicted there.")
    for note in plan.notes:
        if note.startswith(("does not fit", "this placement does not fit", "no GPU in the devices")) \
                or TRAINED_MAX_NOTE in note:
            continue  # said above, or warned on stderr
        console.print(f"[dim]note: {note}[/]")
    if plan.exports and not short:
        # commands to copy: never wrapped (soft_wrap), never read as markup
        if plan.exports.get("llama_cpp"):
            console.print(f"llama.cpp: {plan.exports['llama_cpp']}", style="dim", soft_wrap=True, markup=False)
        if plan.exports.get("vllm_pp_layer_partition"):
            console.print(f"vLLM: VLLM_PP_LAYER_PARTITION={plan.exports['vllm_pp_layer_partition']}", style="dim",
                          soft_wrap=True, markup=False)


# the planner's note for a context beyond the model's trained maximum: a warning on stderr
TRAINED_MAX_NOTE = "beyond the model's trained maximum"


def warn_context(plan) -> None:
    """``vramancer: warning: context 8192 is beyond ...`` on stderr when the plan notes it."""
    for note in plan.notes:
        if TRAINED_MAX_NOTE in note:
            print(f"vramancer: warning: {note}", file=sys.stderr)


def profile_or_none(target, dtype: str | None = None):
    """The model's profile for explaining a plan, or None when it cannot be profiled here."""
    from ..errors import VramancerError
    from ..models.resolve import profile as make_profile

    try:
        return make_profile(target, dtype=dtype)
    except VramancerError:
        return None


def story_for(plan, target, args: argparse.Namespace, profile=None):
    """The PlanStory of ``plan`` for the CLI (advice, unused devices, backing prediction); None when
    the model cannot be profiled again here."""
    from .explain import plan_story

    prof = profile if profile is not None else profile_or_none(target, getattr(args, "dtype", None))
    if prof is None:
        return None
    return plan_story(plan, prof, reserve_bytes=getattr(args, "reserve", None),
                      devices_spec=getattr(args, "devices", None), backing=getattr(args, "backing", "cpu"))


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
    print_table(console, "Model catalog (plans with no download)",
                [Column("name", key=True), Column("HF id", key=True), Column("kind"), Column("description")],
                [(m.key, m.hf_id, m.kind, m.description) for m in models])
    return 0


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # pipes and logs: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 110), soft_wrap=True)  # and never break a line
    if args.list_models:
        return _list_models(console, as_json=args.json)
    if not args.model:
        raise WorkloadError("which model? e.g. `vramancer plan llama-3.1-8b` (see --list-models)")
    if args.output:   # a path that cannot be written is refused before the planning, not after it
        from .._io import check_writable

        check_writable(args.output, "-o")
    if getattr(args, "cluster", None):   # every device of every node of a Ray cluster (vramancer/cluster/)
        from ..cluster.commands import plan_on_cluster

        return plan_on_cluster(args, console)
    from ..models.pipeline import is_pipeline

    try:
        image = is_pipeline(args.model)
    except (OSError, ValueError):   # a name no path can be (a NUL byte, too long): not a local pipeline
        image = False
    if image:   # a diffusers folder or a single-file diffusion checkpoint: the phase-aware pipeline plan
        from .pipeline import plan_command

        return plan_command(args, console)
    kwargs = planner_kwargs(args)
    target = args.model
    fetch = None
    if "/" in str(args.model) and not str(args.model).startswith((".", "/", "~")):
        from ..hub.resolve import remote_fetch  # only for a Hub id: catalog plans stay torch- and network-free

        fetch = remote_fetch(args.model, dtype=kwargs.get("dtype"))  # None for a local path, cache or catalog
        if fetch is not None:
            target = fetch.profile
    result = plan_or_partial(target, kwargs)
    if fetch is not None:
        print(f"not on this machine: a run would download {fetch.announce()}", file=sys.stderr)
    warn_context(result)
    story = None if result.fits else story_for(result, target, args)
    if story is not None:
        result.suggestions = [a.text for a in story.advice]   # each with its figures, each checked
    if story is None and len({s.device for s in result.stages}) < sum(d.kind == "gpu" for d in result.devices):
        story = story_for(result, target, args)      # a GPU left unused: say why
    if args.output:
        result.save(args.output)
    if args.json:
        d = result.to_dict()
        if not result.fits:  # what to try, structured (the plan's ``suggestions`` are the same as lines)
            d["advice"] = [a.to_dict() for a in story.advice] if story is not None else []
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        render_plan(result, console, story)
    from .advice import shortfall_by_device

    short = shortfall_by_device(result)
    if short:
        # cannot run: one error line (the table and the advice are above) and exit 3 ("does not fit")
        print(f"vramancer: error: {result.model} does not fit: "
              + "; ".join(f"{d} is {format_bytes(b)} short" for d, b in short.items()), file=sys.stderr)
        return 3
    return 0


def plan_or_partial(target, kwargs: dict):
    """The plan; when the model fits nowhere, the closest placement instead (``fits`` False and
    ``shortfall_by_device`` non-empty), planned on the same devices and workload."""
    from ..devices.spec import parse_devices
    from ..errors import DoesNotFitError
    from ..models.resolve import profile as make_profile
    from .advice import partial_plan
    from .plan import Workload
    from .planner import default_context, plan, planning

    try:
        return plan(target, **kwargs)
    except DoesNotFitError:
        pass
    prof = make_profile(target, dtype=kwargs.get("dtype"))
    if kwargs.get("kv_dtype") is not None:
        from ..models.dtypes import resolve_kv_dtype
        from ..models.layout import with_kv_dtype

        prof = with_kv_dtype(prof, resolve_kv_dtype(kwargs["kv_dtype"]))
    devs = parse_devices(kwargs["devices"], backing=kwargs.get("backing", "cpu"))
    workload = Workload(context=kwargs.get("context") or default_context(prof), batch=kwargs.get("batch", 1),
                        dtype=prof.dtype, objective=kwargs.get("objective", "latency"),
                        prefill_chunk=kwargs.get("prefill_chunk", 512),
                        kv_dtype=prof.kv_dtype if kwargs.get("kv_dtype") is not None else None)
    return partial_plan(planning(), prof, devs, workload, reserve_bytes=kwargs.get("reserve_bytes"))
