"""`vramancer demo`: the main job on any machine, with no download. Builds a small Llama (random
weights, a real tokenizer) under the cache folder, splits it over this machine's GPUs (or over two
simulated GPUs where there is at most one), shows the plan, generates, shows memory per stage and
tokens/s, and checks that the split model gives the same tokens as the unsplit one (exit 1 if not)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["configure", "main", "demo_devices", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "Where does the memory go when a model is split over two cards?"
SIMULATED = "rtx3090,rtx3060"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--devices", default=None,
                   help="device spec to split over (default: every GPU here if there are two or more, "
                        f"else two simulated GPUs, {SIMULATED})")
    p.add_argument("--backing", default=None,
                   help="torch device behind simulated GPUs (default cuda:0 when there is a GPU, else cpu)")
    p.add_argument("--cache-dir", default=None, help="where the demo model is kept (default ~/.cache/vramancer)")
    p.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="the user's message")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("-c", "--context", type=int, default=1024, help="context the plan sizes the KV cache for")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--image", action="store_true",
                   help="a tiny random image pipeline (Stable Diffusion shaped) instead: its UNet split, "
                        "the image checked against the unsplit one")


def _measure_host_once(console, quiet: bool) -> None:
    """The predictions for the backing CPU need this CPU's figures: measured once (a few seconds,
    runtime/calibrate.py) and kept in the cache folder for this CPU and thread count."""
    from ...devices.host_speed import host_speed, save_host_speed

    if host_speed().source == "measured":
        return
    if not quiet:
        console.print("measuring this CPU once for the predictions (a few seconds; kept for later runs)")
    from ..calibrate import measure_host_speed

    save_host_speed(measure_host_speed())


def demo_devices(spec: str | None, backing: str | None) -> tuple[str, str]:
    """(device spec, backing): the GPUs here when there are two or more, else two simulated GPUs
    backed by the one GPU there is, or by the CPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    back = backing or ("cuda:0" if n >= 1 else "cpu")
    if spec:
        return spec, back
    return ("auto" if n >= 2 else SIMULATED), back


def _owned(model):
    """``model`` with its weights copied into memory it owns. On the CPU, from_pretrained leaves
    them as views into the mapped checkpoint, at addresses matmul kernels run far slower on (16-byte
    aligned: 27x slower here), which would make the speed comparison meaningless."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "cpu":
                    setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    return model


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..._paths import cache_dir
    from ...plan.commands import profile_or_none, render_plan, story_for
    from . import check_generation_args, missing_runtime, render_memory, render_speed, summary_json
    from .run import predictions_json, render_measured_vs_predicted, run_predictions_or_none

    if getattr(args, "image", False):
        from ..pipeline import demo_image

        return demo_image(args)
    check_generation_args(args)
    missing_runtime()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ...devices.spec import parse_devices
    from ...plan.planner import plan as planner
    from ..demo_model import build_demo_model
    from ..generate import generate_text
    from ..loader import load
    from . import check_plan_fits, load_tokenizer

    hf_logging.disable_progress_bar()  # this process is the CLI: no per-shard bars between our lines
    console = Console(highlight=False)
    if not console.is_terminal:   # pipes and logs: tables at full width, no line broken in two
        console = Console(highlight=False, width=max(console.width, 110), soft_wrap=True)
    quiet = args.json
    folder = build_demo_model(args.cache_dir or cache_dir())
    spec, backing = demo_devices(args.devices, args.backing)
    _measure_host_once(console, quiet)
    gpus = [d for d in parse_devices(spec, backing=backing) if d.kind == "gpu"]
    split = [1.0] * len(gpus) if len(gpus) >= 2 else None
    plan = planner(str(folder), devices=spec, context=args.context, split=split, backing=backing)
    check_plan_fits(plan)
    profile = profile_or_none(str(folder))
    if not quiet:
        console.print(f"[bold]vramancer demo[/]: a {sum(s.weights_bytes for s in plan.stages) / 2**20:.0f} MiB "
                      f"Llama with random weights (its text is noise; the point is the split), in {folder}")
        render_plan(plan, console, story_for(plan, str(folder), args, profile) if profile is not None else None)
    tok = load_tokenizer(folder)
    model = load(str(folder), plan=plan)
    messages = [{"role": "user", "content": args.prompt}]

    def emit(text: str) -> None:   # the model's text: control bytes escaped, never raw ANSI
        from ...terminal import escape_control

        sys.stdout.write(escape_control(text))
        sys.stdout.flush()

    # one untimed token first, on each model: the first generate of a process pays one-off costs
    # (allocator growth, lazy imports, thread-pool start) that neither the plan nor a later request has
    generate_text(model, tok, messages, max_new_tokens=1)
    if not quiet:
        console.rule("split")
    split_result = generate_text(model, tok, messages, max_new_tokens=args.max_new_tokens,
                                 emit=None if quiet else emit)
    report = model.vramancer.memory_report()
    preds = run_predictions_or_none(plan, profile, split_result)
    if not quiet:
        sys.stdout.write("\n")
        render_speed(split_result, console, label="split:   ")
        render_measured_vs_predicted(console, split_result, preds, label="split:   ")
        render_memory(report, console)
    model.vramancer.free()
    del model

    ref_device = torch.device(plan.stages[0].torch_device if len(gpus) < 2 else gpus[0].torch_device)
    # the unsplit reference is loaded by transformers itself, an independent path
    ref = _owned(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(ref_device).eval())
    generate_text(ref, tok, messages, max_new_tokens=1)   # untimed, as for the split model
    ref_result = generate_text(ref, tok, messages, max_new_tokens=args.max_new_tokens)
    same = ref_result.token_ids == split_result.token_ids
    if quiet:
        extra = {"predicted_for_run": predictions_json(preds)} if preds is not None else {}
        print(json.dumps(summary_json(str(folder), plan, split_result, report, matches_unsplit=same,
                                      unsplit=ref_result.to_dict(), **extra), indent=2))
    else:
        render_speed(ref_result, console, label="unsplit: ")
        if split_result.decode_tokens_per_s and ref_result.decode_tokens_per_s:
            console.print(f"split / unsplit decode speed: "
                          f"{split_result.decode_tokens_per_s / ref_result.decode_tokens_per_s:.2f}")
        console.print(f"split output matches unsplit: {'[bold green]yes[/]' if same else '[bold red]no[/]'}")
    return 0 if same else 1
