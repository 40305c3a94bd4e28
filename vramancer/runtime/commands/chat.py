"""`vramancer chat MODEL`: chat with a split model, one line per turn from stdin, the answer
streamed; the tokenizer's chat template formats the conversation. Ends at end of input or /exit."""
from __future__ import annotations

import argparse
import sys

__all__ = ["EXIT_COMMANDS", "configure", "main"]

EXIT_COMMANDS = ("/exit", "/quit")


def configure(p: argparse.ArgumentParser) -> None:
    from . import add_run_flags

    p.add_argument("model", help="local transformers folder with a tokenizer that has a chat template")
    p.add_argument("--system", default=None, help="system message opening the conversation")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; default 0.7")
    p.add_argument("--stats", action="store_true", help="print tokens/s after each answer")
    add_run_flags(p)


def main(args: argparse.Namespace) -> int:
    from . import exit_on_interrupt

    return exit_on_interrupt(_main, args)


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ...errors import BadInputError
    from ...terminal import escape_control
    from . import check_generation_args, load_split, make_plan, missing_runtime, render_memory, render_speed

    check_generation_args(args)
    missing_runtime()
    from ..generate import generate_text

    console = Console(highlight=False, stderr=True)
    plan = make_plan(args, args.model)
    from ..progress import LoadProgress

    quiet = getattr(args, "quiet", False)
    with LoadProgress(plan, enabled=False if quiet else None) as progress:
        model, tok = load_split(args.model, plan, progress=progress, quant_backend=args.quant_backend)
    if not getattr(tok, "chat_template", None):
        raise BadInputError(f"{args.model}: the tokenizer has no chat template; use `vramancer run` instead")
    stages = ", ".join(f"{s.plan.device}[{s.blocks[0]}:{s.blocks[1]}]" for s in model.vramancer.stages)
    if not quiet:
        console.print(f"{progress.summary()}; split over {stages}. Type a message; /exit or end of input quits.",
                      style="dim", markup=False)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        messages.append({"role": "user", "content": text})

        def emit(piece: str) -> None:   # the model's text: control bytes escaped, never raw ANSI
            sys.stdout.write(escape_control(piece))
            sys.stdout.flush()

        result = generate_text(model, tok, messages, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, emit=emit)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": result.text})
        if args.stats:
            render_speed(result, console)
    if args.stats:
        render_memory(model.vramancer.memory_report(), console)
    return 0
