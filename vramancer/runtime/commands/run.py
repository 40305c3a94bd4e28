"""`vramancer run MODEL --prompt TEXT`: load a model split over devices, stream its answer, then show
the plan, prefill and decode speed, and memory per stage (measured next to the plan).

``--monitor`` shows memory per stage live while the model loads and generates (phases load,
prefill, decode) and the peaks at the end; ``--trace FILE`` keeps the samples (see ``watch.py``)."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

__all__ = ["configure", "main", "render_measured_vs_predicted", "run_predictions_or_none", "predictions_json"]


def configure(p: argparse.ArgumentParser) -> None:
    from . import add_monitor_flags, add_run_flags

    p.add_argument("model", help="local transformers folder (config.json, tokenizer, safetensors) "
                   "or an HF id in the local cache")
    p.add_argument("-p", "--prompt", default=None,
                   help="text to continue; '-' (or no --prompt with text piped in) reads it from stdin")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE (UTF-8)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens "
                   "up to this probability mass, 0 < P <= 1 (with --temperature above 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same text)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, speed, plan, memory) instead of streaming")
    add_run_flags(p)
    add_monitor_flags(p)
    from ...plan.pipeline import add_image_flags

    add_image_flags(p)   # image pipelines (a folder with model_index.json or a single-file checkpoint)
    p.add_argument("-o", "--output", default=None, metavar="PNG",
                   help="image pipelines: where the first image is written (default out.png)")
    from ...cluster.commands import add_cluster_flags

    add_cluster_flags(p)


# the planner's flags: with --plan FILE the plan already fixed them
PLAN_FLAGS = {"devices": "--devices", "context": "--context", "batch": "--batch", "dtype": "--dtype",
              "objective": "--objective", "split": "--split", "reserve": "--reserve",
              "prefill_chunk": "--prefill-chunk", "backing": "--backing", "kv_dtype": "--kv-dtype"}


def check_plan_conflicts(args: argparse.Namespace) -> None:
    """``--plan FILE`` with a planner flag typed too (``--devices X``): refuse rather than ignore one."""
    from ...errors import BadInputError

    given = [flag for dest, flag in PLAN_FLAGS.items() if dest in getattr(args, "given", ())]
    if getattr(args, "plan", None) and given:
        raise BadInputError(f"--plan {args.plan} already fixes {', '.join(given)}: drop "
                            f"{'it' if len(given) == 1 else 'them'}, or plan again with "
                            f"`vramancer plan ... -o FILE`")


def read_prompt(args: argparse.Namespace, stdin=None) -> str:
    """The prompt from --prompt TEXT, --prompt - (stdin), --prompt-file FILE, or piped stdin."""
    from ...errors import BadInputError

    stdin = stdin if stdin is not None else sys.stdin
    if args.prompt is not None and args.prompt_file is not None:
        raise BadInputError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return _bounded(f.read(MAX_PROMPT_CHARS + 1), f"--prompt-file {args.prompt_file}")
        except UnicodeDecodeError:
            raise BadInputError(f"--prompt-file {args.prompt_file}: not UTF-8 text") from None
        except OSError as e:
            raise BadInputError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and (stdin is None or stdin.isatty()):
        raise BadInputError("which prompt? give --prompt TEXT (-p), --prompt-file FILE, or pipe it in "
                            "(echo Hello | vramancer run MODEL)")
    try:
        text = _bounded(stdin.read(MAX_PROMPT_CHARS + 1), "the prompt on stdin")
    except UnicodeDecodeError:
        raise BadInputError("the prompt on stdin is not UTF-8 text") from None
    return text.removesuffix("\n")


# more text than any context holds: refused after reading this much (``--prompt-file /dev/zero``,
# an endless pipe), never read on without end
MAX_PROMPT_CHARS = 1 << 24


def _bounded(text: str, what: str) -> str:
    from ...errors import BadInputError

    if len(text) > MAX_PROMPT_CHARS:
        raise BadInputError(f"{what}: more than {MAX_PROMPT_CHARS} characters (no model's context holds it)")
    return text


def main(args: argparse.Namespace) -> int:
    from . import exit_on_interrupt

    return exit_on_interrupt(_main, args)


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ...errors import WorkloadError
    from ...plan.commands import profile_or_none, render_plan, story_for
    from ...terminal import escape_control
    from . import (
        check_generation_args,
        load_split,
        make_plan,
        missing_runtime,
        render_memory,
        render_speed,
        summary_json,
    )

    check_generation_args(args)
    check_plan_conflicts(args)
    args.prompt = read_prompt(args)
    if not args.prompt.strip():
        raise WorkloadError("the prompt is empty: give some text with --prompt (-p), --prompt-file or stdin")
    from ...models.pipeline import is_pipeline

    try:
        image = is_pipeline(args.model)
    except (OSError, ValueError):   # a name no path can be: not a local pipeline
        image = False
    if image:
        from ..pipeline import run_command

        return run_command(args, args.prompt)
    quiet = getattr(args, "quiet", False)
    missing_runtime()
    from ..generate import generate_text

    recording = args.monitor or args.trace is not None
    if recording:  # bad flags are refused before anything is planned or loaded
        from ..watch import check_monitor_interval, check_trace_path

        check_monitor_interval(args.monitor_interval)
        if args.trace is not None:
            check_trace_path(args.trace)
    console = Console(highlight=False)
    if not console.is_terminal:   # pipes and logs: tables at full width, no line broken in two
        console = Console(highlight=False, width=max(console.width, 110), soft_wrap=True)
    if getattr(args, "cluster", None):   # stages on the nodes of a Ray cluster (vramancer/cluster/)
        from ...cluster.commands import run_on_cluster

        return run_on_cluster(args, console)
    plan = make_plan(args, args.model)
    profile = profile_or_none(args.model, args.dtype)
    if not args.json and not quiet:
        render_plan(plan, console, story_for(plan, args.model, args, profile) if profile is not None else None)
    monitor = None
    if recording:
        from ..watch import RunMonitor

        monitor = RunMonitor(plan, interval_s=args.monitor_interval, live=args.monitor, trace=args.trace).start()
    panel = monitor is not None and monitor.panel
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    def emit(text: str) -> None:   # the model's text: its control bytes escaped, never raw ANSI
        sys.stdout.write(escape_control(text))
        sys.stdout.flush()

    sampling: dict = {}
    if args.temperature > 0 and args.top_p is not None:
        sampling["top_p"] = args.top_p
    elif args.top_p is not None and not quiet:
        print("vramancer: note: --top-p applies to sampling; add --temperature above 0", file=sys.stderr)
    if args.seed is not None:
        sampling["seed"] = args.seed

    from ..progress import LoadProgress

    progress = LoadProgress(plan, enabled=False if (quiet or args.json or panel) else None)
    try:
        with monitor.loading(args.model) if monitor else nullcontext(), progress:
            model, tok = load_split(args.model, plan, dtype=None, progress=progress,
                                    quant_backend=args.quant_backend)
            if monitor:
                monitor.attach(model.vramancer)
        if not args.json and not panel:
            if not quiet:
                console.rule()
            sys.stdout.write(escape_control(args.prompt) if not args.chat else "")
        phases = monitor.generating(args.max_new_tokens, model.generation_config.eos_token_id) if monitor else None
        with phases or nullcontext():
            result = generate_text(model, tok, prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature,
                                   emit=None if args.json else (
                                       (lambda piece: monitor.emit(escape_control(piece))) if panel else emit),
                                   **sampling, **(phases.generate_kwargs() if phases else {}))
        report = model.vramancer.memory_report()
    except BaseException:
        if monitor:
            monitor.finish(quiet=True)   # the trace of a failed run (an out-of-memory) is kept too
        raise
    if monitor:
        monitor.finish()
    preds = run_predictions_or_none(plan, profile, result)
    if args.json:
        extra = {"telemetry": monitor.summary()} if monitor else {}
        extra["load"] = {"seconds": progress.seconds, "bytes": progress.placed_bytes,
                         "tensors": progress.placed_tensors}
        if preds is not None:
            extra["predicted_for_run"] = predictions_json(preds)
        print(json.dumps(summary_json(args.model, plan, result, report, prompt=args.prompt, **extra), indent=2))
        return 0
    if panel:  # the panel showed the text as it came; now it goes to stdout
        console.rule()
        sys.stdout.write(escape_control((args.prompt if not args.chat else "") + result.text))
    sys.stdout.write("\n")
    if quiet:
        return 0
    console.rule()
    console.print(progress.summary(), markup=False)
    render_speed(result, console)
    render_measured_vs_predicted(console, result, preds)
    render_memory(report, console)
    if monitor and args.monitor:
        monitor.render_peaks(console)
    if monitor and monitor.written:
        console.print(f"trace written to {monitor.written} (read it with: vramancer report {monitor.written})",
                      soft_wrap=True, markup=False)
    return 0


def run_predictions_or_none(plan, profile, result):
    """The plan's predictions for the workload this run measured (its prompt and new tokens)."""
    from ...plan.explain import run_predictions

    if profile is None or result.prompt_tokens < 1:
        return None
    return run_predictions(plan, profile, result.prompt_tokens, max(1, result.new_tokens))


def predictions_json(preds) -> dict:
    return {"named": preds.named.to_dict(),
            "backing": None if preds.backing is None else {
                "device": preds.backing.device, "simulated": list(preds.backing.simulated),
                **preds.backing.predicted.to_dict()}}


def render_measured_vs_predicted(console, result, preds, label: str = "") -> None:
    """One line: measured decode and prefill next to the plan's prediction for the same workload,
    on the device that really ran it (the backing device of simulated cards) and on the cards named."""
    if preds is None:
        return
    from ...plan.commands import _tps

    real = preds.backing.predicted if preds.backing is not None else preds.named
    where = f" on {preds.backing.device}" if preds.backing is not None else ""

    def pair(measured: float, predicted: float) -> str:
        ratio = f", {measured / predicted:.2f}x" if measured > 0 and predicted > 0 else ""
        return f"{_tps(measured)} measured / {_tps(predicted)} predicted{where}{ratio}"

    line = (f"{label}decode {pair(result.decode_tokens_per_s, real.decode_tokens_per_s)} · "
            f"prefill {pair(result.prefill_tokens_per_s, real.prefill_tokens_per_s)} tokens/s")
    if preds.backing is not None:
        line += (f"  (on the cards named the plan predicts {_tps(preds.named.decode_tokens_per_s)} decode, "
                 f"{_tps(preds.named.prefill_tokens_per_s)} prefill)")
    console.print(line, soft_wrap=True, highlight=False)
    busy = _busy_note()
    if busy:
        console.print(busy, style="dim", soft_wrap=True, highlight=False)


def _busy_note() -> str:
    """A note when other work shares this machine's CPUs (the measured side then runs slower)."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on Unix
        return ""
    cpus = os.cpu_count() or 1
    if load <= cpus:
        return ""
    return (f"note: this machine is busy (load {load:.1f} on {cpus} CPUs): measured speeds are lower and vary; "
            f"`python benchmarks/cost_model.py` compares in the same conditions")
