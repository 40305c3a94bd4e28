"""What the split runtime costs, against anchors measured in the same run on the same machine.

Model: a random Llama of about 70M parameters (float32; ``--hidden``/``--layers`` change it) saved
as safetensors in a temp folder. Simulated GPUs are backed by the CPU, or by cuda:0 when there is a
GPU; with two or more GPUs the 2-stage split runs on real ones.

1. Split vs unsplit: decode tokens/s (greedy, ``--new`` tokens, KV cache) and prefill tokens/s (one
   forward of ``--prompt`` tokens) of the model split over 2 and 4 stages, over the same model
   loaded by us on one device with no hooks. Goal: ratio >= 0.97 on the CPU.
2. vs accelerate: the same blocks with accelerate's ``dispatch_model`` and the same device map
   (``force_hooks=True`` where the map names one torch device, so accelerate installs its hooks as
   it does across real devices). Goal: ratio >= 1.0.
3. Streamed offload vs accelerate CPU offload (CUDA only): all but the first and last blocks in host
   RAM, streamed to cuda:0 with prefetch (ours) vs ``dispatch_model`` with those blocks on "cpu"
   (accelerate copies each module's weights when it runs). Goal: ratio >= 2. Prints "needs CUDA"
   without a GPU.
4. Load: wall time and peak host RAM above the process's baseline, each in a fresh subprocess:
   ``vramancer.load`` with the 2-stage plan vs ``transformers.from_pretrained(device_map=...)`` with
   the equivalent map; then host RAM after a first generate (on the CPU from_pretrained's weights
   are views into the mapped file, paged in when first used) and decode speed with those weights.

Timings: each variant is measured ``--repeat`` times, interleaved with the others; the median counts.
Run:  python benchmarks/runtime.py [--repeat 3] [--new 32] [--prompt 128] [--json FILE]
A benchmark, not a test: it always exits 0 and prints "GOAL MET" / "GOAL NOT MET" per goal.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

__all__ = ["main"]

VOCAB = 8000


def _log(msg: str) -> None:
    print(msg, flush=True)


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _backing() -> tuple[str, int]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cuda:0" if n else "cpu"), n


def _plan(folder: Path, stages: int, context: int):
    from vramancer.plan.planner import plan

    backing, n = _backing()
    if stages == 2 and n >= 2:
        return plan(str(folder), devices="cuda:0,cuda:1", split=[1, 1], context=context)
    devices = ",".join(["rtx4090"] * stages)
    return plan(str(folder), devices=devices, split=[1] * stages, context=context, backing=backing)


def _ours(folder: Path, plan) -> Any:
    from vramancer.runtime.loader import load

    return load(str(folder), plan=plan)


def _unsplit(folder: Path, context: int) -> Any:
    """The same loader, one stage, hooks removed: a plain transformers model in memory we own."""
    model = _ours(folder, _plan(folder, 1, context))
    model.vramancer.detach()
    return model


def _device_map(model) -> dict[str, str]:
    rt = model.vramancer
    return {prefix: str(st.compute_device) for st in rt.stages for prefix, _ in st.units}


def _accelerate(folder: Path, device_map: dict[str, str], offload_main: str | None = None) -> Any:
    """Our unsplit weights dispatched by accelerate with ``device_map``."""
    from accelerate import dispatch_model

    model = _unsplit(folder, 256)
    one_device = len(set(device_map.values())) == 1
    return dispatch_model(model, device_map=device_map, main_device=offload_main, force_hooks=one_device)


class _Times:
    """A generate() streamer that notes when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_tps(model, new: int) -> float:
    import torch

    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
    st = _Times()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=st, pad_token_id=0)
    _sync()
    t = st.times[1:]
    return (len(t) - 1) / (t[-1] - t[0])


def prefill_tps(model, prompt: int) -> float:
    import torch

    ids = torch.randint(3, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(1)).to(model.device)
    with torch.no_grad():
        _sync()
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        _sync()
    return prompt / (time.perf_counter() - t0)


def measure(variants: dict[str, Any], repeat: int, new: int, prompt: int) -> dict[str, dict[str, float]]:
    dec: dict[str, list[float]] = {k: [] for k in variants}
    pre: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():  # warm up kernels and caches
        decode_tps(m, 4)
        prefill_tps(m, min(prompt, 16))
    for _ in range(repeat):
        for name, m in variants.items():
            dec[name].append(decode_tps(m, new))
            pre[name].append(prefill_tps(m, prompt))
    return {k: {"decode_tokens_per_s": statistics.median(dec[k]), "prefill_tokens_per_s": statistics.median(pre[k])}
            for k in variants}


def _goal(ratio: float, goal: float) -> str:
    return "GOAL MET" if ratio >= goal else "GOAL NOT MET"


# ---------------------------------------------------------------------------------------------------
def _load_child(kind: str, folder: str, plan_file: str) -> None:
    """In a fresh process: load one way, print {"seconds", "peak_bytes", "decode_tokens_per_s"}."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline, as both ways need it
    from transformers import AutoConfig

    from tests.runtime.peak_load import PeakRss
    from vramancer.plan.plan import Plan
    from vramancer.runtime.loader import build_empty_model

    plan = Plan.load(plan_file)
    build_empty_model(AutoConfig.from_pretrained(folder), torch.float32)  # import the model's code
    with PeakRss(interval=0.0005) as mem:
        t0 = time.perf_counter()
        if kind == "ours":
            from vramancer.runtime.loader import load

            model = load(folder, plan=plan)
        else:
            from transformers import AutoModelForCausalLM

            dm = _hf_device_map(plan)
            model = AutoModelForCausalLM.from_pretrained(folder, device_map=dm, dtype=torch.float32)
        _sync()
        seconds = time.perf_counter() - t0
    decode_tps(model, 4)  # first use: kernels warm, mapped pages read in
    tps = decode_tps(model, 16)
    print(json.dumps({"seconds": seconds, "peak_bytes": mem.peak - mem.base,
                      "rss_after_use_bytes": mem.rss() - mem.base, "decode_tokens_per_s": tps}))


def _hf_device_map(plan) -> dict[str, str]:
    """The plan's placement as a transformers device_map over torch devices."""
    from vramancer.models.resolve import profile

    prof = profile(plan.model)
    out: dict[str, str] = {}
    for st in plan.stages:
        for b in range(*st.blocks):
            for m in prof.blocks[b].modules:
                out[m] = st.torch_device
    return out


def load_comparison(folder: Path, plan, repeat: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan.save(plan_file)
        res: dict[str, list[dict]] = {"ours": [], "hf": []}
        for _ in range(repeat):
            for kind in res:
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                out = subprocess.run([sys.executable, __file__, "--load-child", kind, str(folder), str(plan_file)],
                                     capture_output=True, text=True, env=env, timeout=600)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                res[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--new", type=int, default=32, help="tokens per decode measurement")
    ap.add_argument("--prompt", type=int, default=128, help="tokens per prefill measurement")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--load-child", nargs=3, metavar=("KIND", "FOLDER", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_child:
        _load_child(*args.load_child)
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    backing, n_gpus = _backing()
    results: dict[str, Any] = {"backing": backing, "gpus": n_gpus, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "llama", args.hidden, args.layers)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        _log(f"model: Llama {args.layers} layers x {args.hidden}, {size / 2**20:.0f} MiB float32; "
             f"simulated GPUs backed by {backing}; {torch.get_num_threads()} torch threads")

        # 1 + 2: split vs unsplit vs accelerate ------------------------------------------------
        ctx = 8 + args.new + args.prompt
        variants: dict[str, Any] = {"unsplit": _unsplit(folder, ctx)}
        for n in (2, 4):
            ours = _ours(folder, _plan(folder, n, ctx))
            variants[f"ours {n} stages"] = ours
            variants[f"accelerate {n} stages"] = _accelerate(folder, _device_map(ours))
        figs = measure(variants, args.repeat, args.new, args.prompt)
        results["speed"] = figs
        base = figs["unsplit"]
        _log(f"\n{'variant':<22}{'decode tok/s':>14}{'prefill tok/s':>15}{'decode ratio':>14}{'prefill ratio':>15}")
        for name, f in figs.items():
            _log(f"{name:<22}{f['decode_tokens_per_s']:>14.1f}{f['prefill_tokens_per_s']:>15.1f}"
                 f"{f['decode_tokens_per_s'] / base['decode_tokens_per_s']:>14.3f}"
                 f"{f['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>15.3f}")
        _log("")
        ratios = {}
        for n in (2, 4):
            o, a = figs[f"ours {n} stages"], figs[f"accelerate {n} stages"]
            for what in ("decode", "prefill"):
                key = f"{what}_tokens_per_s"
                r_split = o[key] / base[key]
                r_acc = o[key] / a[key]
                ratios[f"{n} stages {what} vs unsplit"] = r_split
                ratios[f"{n} stages {what} vs accelerate"] = r_acc
                goal_split = 0.97 if backing == "cpu" else None
                _log(f"{n} stages {what}: split/unsplit {r_split:.3f}"
                     + (f" (goal >= 0.97: {_goal(r_split, 0.97)})" if goal_split else "")
                     + f"; ours/accelerate {r_acc:.3f} (goal >= 1.0: {_goal(r_acc, 1.0)})")
        results["ratios"] = ratios
        for m in variants.values():
            rt = getattr(m, "vramancer", None)
            if rt is not None:
                rt.free()
        variants.clear()
        gc.collect()

        # 3: streamed offload vs accelerate CPU offload ------------------------------------------
        if backing == "cpu":
            _log("\nstreamed offload vs accelerate CPU offload: needs CUDA")
        else:
            from vramancer.devices.spec import parse_devices
            from vramancer.models.resolve import profile
            from vramancer.plan.planner import plan_placement

            even = _plan(folder, 3, ctx)
            cpu = parse_devices("cpu")[0]
            gpu = even.devices[0]
            # the middle stage's blocks in host RAM, streamed to the GPU (the planner's modes and buffer)
            owners = [gpu.id, cpu.id, gpu.id]
            blocks = [owners[i] for i, st in enumerate(even.stages) for _ in range(*st.blocks)]
            plan = plan_placement(profile(str(folder), dtype=even.workload.dtype), [gpu, cpu], even.workload, blocks,
                                  offload_mode="stream")
            # blocks 1..n-2 streamed: stage 1 holds all layers but those of stages 0 and 2
            ours = _ours(folder, plan)
            dm = {p: ("cpu" if st.mode == "stream" else str(st.compute_device))
                  for st in ours.vramancer.stages for p, _ in st.units}
            acc = _accelerate(folder, dm, offload_main=gpu.torch_device)
            off = measure({"ours stream": ours, "accelerate offload": acc}, args.repeat, min(args.new, 16),
                          args.prompt)
            results["offload"] = off
            for what in ("decode", "prefill"):
                key = f"{what}_tokens_per_s"
                r = off["ours stream"][key] / off["accelerate offload"][key]
                ratios[f"stream {what} vs accelerate offload"] = r
                _log(f"\nstreamed offload {what}: ours {off['ours stream'][key]:.1f} tok/s, accelerate "
                     f"{off['accelerate offload'][key]:.1f} tok/s, ratio {r:.2f} (goal >= 2: {_goal(r, 2.0)})")
            ours.vramancer.free()
            del ours, acc
            gc.collect()

        # 4: load time and peak RAM -----------------------------------------------------------------
        plan2 = _plan(folder, 2, ctx)
        load = load_comparison(folder, plan2, max(1, min(args.repeat, 2)))
        results["load"] = load
        o, h = load["ours"], load["hf"]
        _log(f"\nload (2 stages, fresh process each): vramancer.load {o['seconds']:.2f} s, peak RAM +"
             f"{o['peak_bytes'] / 2**20:.0f} MiB; from_pretrained(device_map) {h['seconds']:.2f} s, peak RAM +"
             f"{h['peak_bytes'] / 2**20:.0f} MiB")
        _log(f"load time ratio (from_pretrained / ours): {h['seconds'] / o['seconds']:.2f}; "
             f"peak RAM ratio (from_pretrained / ours): {h['peak_bytes'] / max(o['peak_bytes'], 1):.2f}")
        _log(f"host RAM after first use (RSS above baseline, mapped file pages included): ours "
             f"{o['rss_after_use_bytes'] / 2**20:.0f} MiB, from_pretrained {h['rss_after_use_bytes'] / 2**20:.0f} MiB")
        _log(f"decode right after loading: ours {o['decode_tokens_per_s']:.1f} tok/s, from_pretrained's weights "
             f"{h['decode_tokens_per_s']:.1f} tok/s (ratio {o['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
