"""`vramancer run MODEL --prompt TEXT`: load a model split over devices, stream its answer, then show
the plan, prefill and decode speed, and memory per stage (measured next to the plan)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    from . import add_run_flags

    p.add_argument("model", help="local transformers folder (config.json, tokenizer, safetensors) "
                   "or an HF id in the local cache")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, speed, plan, memory) instead of streaming")
    add_run_flags(p)


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

    console = Console(highlight=False)
    plan = make_plan(args, args.model)
    if not args.json:
        render_plan(plan, console)
    model, tok = load_split(args.model, plan, dtype=None)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not args.json:
        console.rule()
        sys.stdout.write(args.prompt if not args.chat else "")
    result = generate_text(model, tok, prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, emit=None if args.json else emit)
    report = model.vramancer.memory_report()
    if args.json:
        print(json.dumps(summary_json(args.model, plan, result, report, prompt=args.prompt), indent=2))
        return 0
    sys.stdout.write("\n")
    console.rule()
    render_speed(result, console)
    render_memory(report, console)
    return 0
