"""Image pipelines: split vs unsplit on the CPU, and the phase-aware plan vs diffusers' own placements.

1. Split vs unsplit (measured): a tiny random Stable Diffusion pipeline (vramancer demo --image's),
   its UNet split over two simulated GPUs backed by the CPU, vs the same pipeline loaded by diffusers
   alone; seconds per image, best of ``--repeat`` alternating runs each. Goal: unsplit / split >= 0.97
   (the boundary hooks cost next to nothing).
2. Catalog cards (predicted, same memory and speed model for every placement): SDXL on 8+8 GiB,
   FLUX.1-dev bf16 on 24+12 GiB and on 12+8+6 GiB, at 1024x1024:
     vramancer          plan_pipeline: the denoiser split or whole, each component resident / moved
                        (evicting the denoiser's stage on its GPU if need be) / on the CPU
     balanced           diffusers' device_map="balanced": whole components per GPU, none moved
     model_cpu_offload  enable_model_cpu_offload: all on the first GPU, each moved in for its phase
   per-phase peak per device and predicted seconds per image. Goal: we fit wherever they fit, and
   where both fit our predicted time is <= theirs; every case where they win is named.

Run:  python benchmarks/diffusion.py [--repeat N] [--steps N] [--size PX] [--json FILE]
A benchmark, not a test: it always exits 0 and prints "GOAL MET" / "GOAL NOT MET" per goal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vramancer.devices.spec import parse_devices  # noqa: E402
from vramancer.errors import DoesNotFitError  # noqa: E402
from vramancer.models.pipeline import ImageWorkload, catalog_pipeline  # noqa: E402
from vramancer.plan.pipeline import POLICIES, plan_pipeline  # noqa: E402
from vramancer.units import format_bytes  # noqa: E402

CARDS = [
    ("sdxl", "SDXL on 8+8 GiB", "rtx3060:8GiB,rtx3060:8GiB"),
    ("flux.1-dev", "Flux-dev bf16 on 24+12 GiB", "rtx3090,rtx3060"),
    ("flux.1-dev", "Flux-dev bf16 on 12+8+6 GiB", "rtx3060,rtx3060:8GiB,rtx3060:6GiB"),
]


def split_vs_unsplit(repeat: int, steps: int, size: int) -> dict:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    from vramancer.runtime.pipeline import build_demo_pipeline, load_pipeline

    df_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()
    folder = build_demo_pipeline(os.path.join(tempfile.mkdtemp(prefix="vramancer-bench-"), "pipe"))
    from vramancer.models.pipeline import pipeline_profile

    prof = pipeline_profile(folder)
    devs = parse_devices("rtx3060,rtx3060")
    n = prof.denoiser.num_blocks
    ids = [devs[min(b * 2 // n, 1)].id for b in range(n)]
    plan = plan_pipeline(prof, devs, ImageWorkload(height=size, width=size, steps=steps, guidance=5.0),
                         block_devices=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = load_pipeline(folder, plan=plan)
        ref = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    split.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=5.0, output_type="latent")

    def once(pipe) -> float:
        t0 = time.perf_counter()
        pipe("a lighthouse", generator=torch.Generator().manual_seed(0), **kw)
        return time.perf_counter() - t0

    once(split)
    once(ref)          # warm-up (first conv / allocator)
    t_split, t_ref = [], []
    for _ in range(repeat):
        t_split.append(once(split))
        t_ref.append(once(ref))
    a = split("a lighthouse", generator=torch.Generator().manual_seed(0), **kw).images
    b = ref("a lighthouse", generator=torch.Generator().manual_seed(0), **kw).images
    split.vramancer.detach()
    return {"stages": len(plan.stages), "steps": steps, "size": size, "split_s": min(t_split),
            "unsplit_s": min(t_ref), "ratio": min(t_ref) / min(t_split),
            "max_abs_diff": float((a - b).abs().max())}


def cards(size: int = 1024) -> list[dict]:
    rows = []
    for key, label, spec in CARDS:
        prof = catalog_pipeline(key)
        devs = parse_devices(spec)
        w = ImageWorkload(height=size, width=size, batch=1, steps=28, guidance=3.5 if key == "flux.1-dev" else 5.0,
                          cfg_doubles="Flux" not in prof.pipeline_class)
        for pol in POLICIES:
            row = {"case": label, "policy": pol}
            try:
                p = plan_pipeline(prof, devs, w, policy=pol, suggest=False)
            except DoesNotFitError as e:
                row.update(fits=False, why=str(e).split(":", 1)[1].strip())
                rows.append(row)
                continue
            row.update(fits=p.fits, seconds_per_image=p.image.seconds_per_image,
                       peaks={f"{x.phase}@{x.device}": x.bytes for x in p.phase_peaks},
                       capacity={x.device: x.capacity_bytes for x in p.phase_peaks},
                       placement={c.name: f"{c.mode}:{c.device}" + (f" evicts {list(c.evicts)}" if c.evicts else "")
                                  for c in p.components})
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="pixels of the tiny pipeline's image (multiple of 4)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    cpu = split_vs_unsplit(args.repeat, args.steps, args.size)
    print(f"split vs unsplit (CPU, tiny SD, {cpu['stages']} stages, {cpu['steps']} steps, {cpu['size']}px): "
          f"split {cpu['split_s']:.3f} s, unsplit {cpu['unsplit_s']:.3f} s per image, ratio {cpu['ratio']:.3f} "
          f"(max |latent diff| {cpu['max_abs_diff']:.1e})")
    print(f"  {'GOAL MET' if cpu['ratio'] >= 0.97 else 'GOAL NOT MET'}: unsplit / split >= 0.97")
    rows = cards()
    print("\ncatalog cards at 1024x1024 (predicted; per-phase peak per device / capacity):")
    for r in rows:
        if not r["fits"] and "peaks" not in r:
            print(f"  {r['case']:<30} {r['policy']:<18} does not fit: {r['why']}")
            continue
        peaks = ", ".join(f"{k} {format_bytes(v)}" for k, v in r["peaks"].items())
        print(f"  {r['case']:<30} {r['policy']:<18} {'fits' if r['fits'] else 'DOES NOT FIT':<12} "
              f"{r['seconds_per_image']:8.2f} s/image")
        print(f"      placement: {r['placement']}")
        print(f"      peaks: {peaks}")
    wins, misses = [], []
    for _, label, _ in CARDS:
        by = {r["policy"]: r for r in rows if r["case"] == label}
        ours = by["vramancer"]
        for pol in ("balanced", "model_cpu_offload"):
            th = by[pol]
            if th["fits"] and not ours["fits"]:
                misses.append(f"{label}: {pol} fits, we do not")
            elif th["fits"] and ours["fits"] and th["seconds_per_image"] < ours["seconds_per_image"]:
                wins.append(f"{label}: {pol} {th['seconds_per_image']:.2f} s < ours {ours['seconds_per_image']:.2f} s")
    print(f"\n  {'GOAL MET' if not misses else 'GOAL NOT MET'}: we fit wherever they fit"
          + ("" if not misses else " (" + "; ".join(misses) + ")"))
    print(f"  {'GOAL MET' if not wins else 'GOAL NOT MET'}: where both fit, our predicted time <= theirs")
    print("  where they win: " + ("; ".join(wins) if wins else "nowhere"))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "cards": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
