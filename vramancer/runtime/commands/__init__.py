"""The runtime's CLI subcommands (run, chat, demo) and what they share: loading a model and its
tokenizer per a plan, and printing the plan, speed and memory per stage."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BadInputError, DoesNotFitError, VramancerError
from ...units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ...plan.plan import Plan
    from ..generate import GenerationResult
    from ..memory import MemoryReport

__all__ = ["add_run_flags", "exit_on_interrupt", "add_monitor_flags", "make_plan", "load_tokenizer", "load_split",
           "render_memory",
           "render_speed", "check_plan_fits", "summary_json", "missing_runtime", "fetch_model",
           "check_generation_args", "MAX_NEW_TOKENS"]

# more new tokens than any context holds: refused before anything loads
MAX_NEW_TOKENS = 1 << 24


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The planner's flags plus --plan FILE (a saved plan instead of planning here)."""
    from ...plan.commands import add_planner_flags

    add_planner_flags(p)
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="use this plan (from `vramancer plan ... -o FILE`) instead of planning here")
    p.add_argument("--quant-backend", default=None, choices=["bitsandbytes", "torchao"],
                   help="package that quantizes a float checkpoint on load with --dtype int8 (default: "
                        "bitsandbytes' LLM.int8; torchao: weight-only int8)")


def add_monitor_flags(p: argparse.ArgumentParser) -> None:
    """--monitor, --monitor-interval S, --trace FILE: memory per stage while the model loads and generates."""
    p.add_argument("--monitor", action="store_true",
                   help="show memory per stage live (load / prefill / decode) on stderr, then the peaks")
    p.add_argument("--monitor-interval", type=float, default=0.1, metavar="S",
                   help="seconds between samples with --monitor or --trace (default 0.1, at least 0.05)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="write the memory trace to FILE (.csv or .json) for `vramancer report`")


def check_plan_fits(plan: Plan) -> None:
    """A plan whose stages need more than their devices hold (a manual split too big) is refused
    before anything is loaded. Offloaded plans run."""
    over = plan.device_shortfalls()      # each device's stages and stream buffer together
    if over:
        raise DoesNotFitError(
            "the plan does not fit: " + "; ".join(f"{dev} needs {format_bytes(n)} more" for dev, n in over.items())
            + " (change --split, --context or --devices)", shortfall_bytes=sum(over.values()))


def fetch_model(model: str) -> str:
    """``model``, downloaded first when it is a Hub id not on this machine (the files and total
    bytes are announced on stderr before the download); returns the name the resolver now finds."""
    from ...hub.resolve import ensure_local

    return ensure_local(str(model))


def make_plan(args: argparse.Namespace, model: str) -> Plan:
    from ...plan.plan import Plan

    if getattr(args, "plan", None):  # --plan FILE with --devices X: refused, never one of them ignored
        from .run import check_plan_conflicts

        check_plan_conflicts(args)
    model = fetch_model(model)
    if getattr(args, "plan", None):
        return Plan.load(args.plan)
    from ...plan.commands import planner_kwargs, warn_context
    from ...plan.planner import plan as planner

    plan = planner(model, **planner_kwargs(args))
    warn_context(plan)   # run, chat, serve: a context beyond the model's trained maximum is a warning
    return plan


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception for files of the wrong shape
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{folder}: no usable tokenizer ({detail})") from None


def exit_on_interrupt(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``; on Ctrl-C say so and return 130 (128 + SIGINT), as shells expect."""
    try:
        return command(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("vramancer: interrupted", file=sys.stderr)
        return 130


def load_split(model: str, plan: Plan, dtype: str | None = None, progress: Any = None,
               quant_backend: str | None = None) -> tuple[Any, Any]:
    """(model split per ``plan``, tokenizer) for ``model`` (a local transformers folder);
    ``progress``: a runtime.progress.LoadProgress told of every tensor placed; ``quant_backend``:
    the package quantizing on load (``--quant-backend``)."""
    from ..gguf.load import is_gguf
    from ..loader import load, weights_folder

    model = fetch_model(model)
    if is_gguf(model):  # a llama.cpp file: its tokenizer and chat template are in its metadata
        from ..gguf.load import load_gguf_tokenizer

        tok = load_gguf_tokenizer(model)
        check_plan_fits(plan)
        return load(str(model), plan=plan, dtype=dtype, progress=progress, quant_backend=quant_backend), tok
    folder = weights_folder(model)
    tok = load_tokenizer(folder)
    check_plan_fits(plan)
    return load(str(folder), plan=plan, dtype=dtype, progress=progress, quant_backend=quant_backend), tok


def render_memory(report: MemoryReport, console: Any) -> None:
    from rich.table import Table

    t = Table(box=None, header_style="bold", pad_edge=False, title="memory per stage: measured (plan)",
              title_justify="left", title_style="bold")
    for col in report.HEADER:
        t.add_column(col, no_wrap=True)
    for row, st in zip(report.rows(), report.stages):
        style = "red" if st.over_plan else None
        t.add_row(*row, style=style)
    console.print(t)
    if report.kv_tokens:
        console.print(f"[dim]KV cache: {report.kv_tokens} tokens x batch {report.batch} "
                      f"(the plan sizes the KV cache for its whole context)[/]")
    for st in report.stages:
        if st.over_plan:
            console.print(f"[red]stage {st.stage} measures more than its plan: a memory-model bug, please report[/]")
    for line in report.buffer_lines():
        console.print(f"[dim]{line}[/]")
    for buf in report.stream_buffers_over_plan:
        console.print(f"[red]the stream buffer on {buf.device} measures more than its plan: a memory-model bug, "
                      "please report[/]")
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")


def render_speed(result: GenerationResult, console: Any, label: str = "") -> None:
    console.print(f"{label}prefill [bold]{result.prefill_tokens_per_s:,.1f}[/] tokens/s "
                  f"({result.prompt_tokens} tokens in {result.prefill_seconds * 1e3:.0f} ms), "
                  f"decode [bold]{result.decode_tokens_per_s:,.1f}[/] tokens/s "
                  f"({result.new_tokens} tokens)")


def summary_json(model_name: str, plan: Plan, result: GenerationResult, report: MemoryReport,
                 **extra: Any) -> dict:
    return {"schema": 1, "model": model_name, **extra, "generation": result.to_dict(),
            "plan": plan.to_dict(), "memory": report.to_dict()}


def check_generation_args(args: argparse.Namespace) -> None:
    """--max-new-tokens, --temperature, --top-p and --seed of run / chat / demo (those the command
    has), each refused in one line (WorkloadError) before anything is planned or loaded: NaN and
    infinities included, which compare false and would slip past a plain ``< 0``."""
    import math

    from ...errors import WorkloadError

    n = getattr(args, "max_new_tokens", None)
    if n is not None and not 1 <= n <= MAX_NEW_TOKENS:
        raise WorkloadError(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS} (got {n})")
    t = getattr(args, "temperature", None)
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise WorkloadError(f"--temperature must be a finite number, 0 or more (got {t})")
    p = getattr(args, "top_p", None)
    if p is not None and not 0 < p <= 1:       # also refuses NaN
        raise WorkloadError(f"--top-p must be above 0 and at most 1 (got {p})")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise WorkloadError(f"--seed must be from 0 to {2**32 - 1} (got {seed})")


def missing_runtime() -> None:
    """Refuse early, in one line, when the runtime's packages are not installed."""
    import importlib.util

    for mod in ("torch", "transformers", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise VramancerError(f"`{mod}` is not installed: pip install 'vramancer[runtime]'")
