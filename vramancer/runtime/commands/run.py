"""`vramancer run MODEL --prompt TEXT`: load a model split over devices, stream its answer, then show
the plan, prefill and decode speed, and memory per stage (measured next to the plan).

``--monitor`` shows memory per stage live while the model loads and generates (phases load,
prefill, decode) and the peaks at the end; ``--trace FILE`` keeps the samples (see ``watch.py``)."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

__all__ = ["configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    from . import add_monitor_flags, add_run_flags

    p.add_argument("model", help="local transformers folder (config.json, tokenizer, safetensors) "
                   "or an HF id in the local cache")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, speed, plan, memory) instead of streaming")
    add_run_flags(p)
    add_monitor_flags(p)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ...errors import WorkloadError
    from ...plan.commands import render_plan
    from . import load_split, make_plan, missing_runtime, render_memory, render_speed, summary_json

    if args.max_new_tokens < 1:
        raise WorkloadError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise WorkloadError(f"--temperature must not be negative (got {args.temperature})")
    missing_runtime()
    from ..generate import generate_text

    recording = args.monitor or args.trace is not None
    if recording:  # bad flags are refused before anything is planned or loaded
        from ..watch import check_monitor_interval, check_trace_path

        check_monitor_interval(args.monitor_interval)
        if args.trace is not None:
            check_trace_path(args.trace)
    console = Console(highlight=False)
    plan = make_plan(args, args.model)
    if not args.json:
        render_plan(plan, console)
    monitor = None
    if recording:
        from ..watch import RunMonitor

        monitor = RunMonitor(plan, interval_s=args.monitor_interval, live=args.monitor, trace=args.trace).start()
    panel = monitor is not None and monitor.panel
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        with monitor.loading(args.model) if monitor else nullcontext():
            model, tok = load_split(args.model, plan, dtype=None)
            if monitor:
                monitor.attach(model.vramancer)
        if not args.json and not panel:
            console.rule()
            sys.stdout.write(args.prompt if not args.chat else "")
        phases = monitor.generating(args.max_new_tokens, model.generation_config.eos_token_id) if monitor else None
        with phases or nullcontext():
            result = generate_text(model, tok, prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature,
                                   emit=None if args.json else (monitor.emit if panel else emit),
                                   **(phases.generate_kwargs() if phases else {}))
        report = model.vramancer.memory_report()
    except BaseException:
        if monitor:
            monitor.finish(quiet=True)   # the trace of a failed run (an out-of-memory) is kept too
        raise
    if monitor:
        monitor.finish()
    if args.json:
        extra = {"telemetry": monitor.summary()} if monitor else {}
        print(json.dumps(summary_json(args.model, plan, result, report, prompt=args.prompt, **extra), indent=2))
        return 0
    if panel:  # the panel showed the text as it came; now it goes to stdout
        console.rule()
        sys.stdout.write((args.prompt if not args.chat else "") + result.text)
    sys.stdout.write("\n")
    console.rule()
    render_speed(result, console)
    render_memory(report, console)
    if monitor and args.monitor:
        monitor.render_peaks(console)
    if monitor and monitor.written:
        console.print(f"trace written to {monitor.written} (read it with: vramancer report {monitor.written})",
                      soft_wrap=True, markup=False)
    return 0
