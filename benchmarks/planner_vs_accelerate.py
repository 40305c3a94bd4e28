"""Our planner against accelerate's ``infer_auto_device_map`` ("sequential" and "balanced"), same budgets.

For each case (a catalog model in a dtype, a set of simulated devices, a context length):

  ours     ``vramancer.plan.planner.plan`` from the catalog name (profile + devices + plan, timed).
  acc-seq  the model built on ``meta`` (``init_empty_weights`` + ``AutoModelForCausalLM.from_config``,
           then ``tie_weights`` as ``from_pretrained`` does), ``accelerate.infer_auto_device_map`` with
           ``max_memory`` = every simulated device's full free bytes (what a person hands accelerate),
           ``no_split_module_classes=model._no_split_modules``.
  acc-bal  the same after ``accelerate.utils.get_balanced_memory`` (what ``device_map="balanced"``
           and transformers' ``device_map="auto"`` do).

accelerate's module -> device map becomes our block index -> device id (a block goes where most of
its bytes went; blocks split across devices are counted) and is judged by ``plan_placement`` with the
same memory model (weights + KV cache for the context + activations + reserve vs each device) and
the same speed model as ours; accelerate streams cpu/disk-offloaded weights to a GPU, so its
offloaded stages are judged in "stream" mode.

Quantized cases: accelerate has no notion of bitsandbytes, so we size them the way transformers'
bitsandbytes integration asks accelerate to: ``dtype=CustomDtype.INT4`` (0.5 byte per weight; 8-bit:
``torch.int8``) for the >= 2-D weights of the repeated layers and ``special_dtypes`` = bfloat16 for
embeddings, LM head and 1-D parameters; our profile sizes them as NF4 (4 bits + fp32 absmax per 64
weights = 4.5 bits) and judges both placements with it.

Run:  python benchmarks/planner_vs_accelerate.py [--filter TEXT] [--repeat N] [--json FILE]
A benchmark, not a test: it always exits 0 and prints "GOAL MET" / "GOAL NOT MET" per goal.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vramancer.devices.device import Device  # noqa: E402
from vramancer.devices.spec import parse_devices  # noqa: E402
from vramancer.errors import DoesNotFitError  # noqa: E402
from vramancer.models.profile import ModelProfile  # noqa: E402
from vramancer.plan.plan import Plan, Workload  # noqa: E402
from vramancer.plan.planner import plan, plan_placement, plan_profile, request_seconds  # noqa: E402
from vramancer.units import format_bytes  # noqa: E402

__all__ = ["Case", "ToolResult", "CaseResult", "MetaModel", "CASES", "build_meta_model",
           "accelerate_device_map", "block_devices_from_device_map", "device_overflow", "judge", "run_case",
           "run_cases", "summarize", "main"]

GOAL_405B_PLAN_SECONDS = 0.5   # "well under a second"
# the planner counts time in quanta of 0.5% (TIME_QUANTUM_FRACTION): closer is a tie it breaks by headroom
TPS_REL_TOL = 5e-3
TOOLS = ("ours", "acc-seq", "acc-bal")

# the device sets (a machine always has host RAM; accelerate gets it as "cpu" too)
DEV_3090_3060 = "rtx3090,rtx3060,cpu:64GiB"
DEV_4090_3060_1080TI = "rtx4090,rtx3060,gtx1080ti,cpu:64GiB"
DEV_2X3060 = "rtx3060,rtx3060,cpu:64GiB"
DEV_3090_CPU = "rtx3090,cpu:64GiB"
DEV_4090_CPU = "rtx4090,cpu:64GiB"
DEV_3060_4060 = "rtx3060,rtx4060,cpu:64GiB"
DEV_3060_3070 = "rtx3060,rtx3070,cpu:64GiB"
DEV_8XH200 = ",".join(["h200"] * 8) + ",cpu:256GiB"
DEV_8XA100 = ",".join(["a100-80gb"] * 8) + ",cpu:512GiB"


@dataclass(frozen=True)
class Case:
    """One comparison: catalog model, our dtype name (bfloat16 / nf4 / int8), device spec, context."""

    model: str
    dtype: str
    devices: str
    context: int

    @property
    def label(self) -> str:
        dt = {"bfloat16": "bf16", "nf4": "4bit", "int8": "8bit"}.get(self.dtype, self.dtype)
        devs = self.devices.split(",")
        gpus = [d for d in devs if not d.startswith(("cpu", "disk"))]
        rest = [d.replace(":", "") for d in devs if d.startswith(("cpu", "disk"))]
        if len(gpus) > 2 and len(set(gpus)) == 1:
            gtext = f"{len(gpus)}x{gpus[0]}"
        else:
            gtext = "+".join(gpus)
        return f"{self.model} {dt} @ {'+'.join([gtext, *rest])}"


def _cases() -> list[Case]:
    pairs = [
        ("llama-3.1-8b", "bfloat16", DEV_3060_4060),      # the example: 12 GiB + 8 GiB
        ("llama-3.1-8b", "bfloat16", DEV_3090_3060),
        ("mistral-7b", "bfloat16", DEV_2X3060),
        ("mistral-7b", "bfloat16", DEV_3060_3070),
        ("qwen2.5-7b", "bfloat16", DEV_3060_4060),
        ("qwen2.5-14b", "bfloat16", DEV_3090_3060),
        ("qwen2.5-14b", "bfloat16", DEV_4090_3060_1080TI),
        ("qwen2.5-14b", "bfloat16", DEV_3090_CPU),
        ("qwen2.5-32b", "nf4", DEV_3090_3060),
        ("gemma-2-27b", "nf4", DEV_2X3060),
        ("gemma-2-27b", "bfloat16", DEV_4090_CPU),
        ("mixtral-8x7b", "nf4", DEV_3090_3060),
        ("mixtral-8x7b", "nf4", DEV_3090_CPU),
        ("llama-3.1-70b", "nf4", DEV_3090_3060),           # the other example
        ("llama-3.1-70b", "nf4", DEV_4090_3060_1080TI),
        ("llama-3.1-405b", "bfloat16", DEV_8XH200),
        ("llama-3.1-405b", "bfloat16", DEV_8XA100),
    ]
    return [Case(m, dt, devs, ctx) for m, dt, devs in pairs for ctx in (4096, 32768)]


CASES: list[Case] = _cases()


@dataclass
class ToolResult:
    """One tool's placement of one case, judged by our memory and speed model.
    ``offloaded_blocks``: blocks on cpu/disk; ``fits``: every stage's weights + KV + activations +
    reserve within its device; ``decode_tps``: predicted decode tokens/s (meaningless when it does
    not fit: it would run out of memory); ``plan_seconds``: median time to produce the placement
    (ours: ``plan()`` from the catalog name, suggestions included; ``core_seconds``: ``plan_profile``
    without suggestions); ``hard_oom``: some device is over by more than its reserve;
    ``request_seconds``: the planner's own yardstick (prefill half the context, then decode 256)."""

    tool: str
    ok: bool = True
    offloaded_blocks: int = 0
    split_blocks: int = 0
    fits: bool = False
    decode_tps: float = 0.0
    max_context: int = 0
    plan_seconds: float = 0.0
    overflow_bytes: int = 0
    hard_oom: bool = False
    request_seconds: float = 0.0
    offload_executed: bool = False
    core_seconds: float = 0.0
    stages: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class CaseResult:
    case: Case
    results: dict[str, ToolResult]
    build_seconds: float
    sizing: str

    def to_dict(self) -> dict:
        return {"case": asdict(self.case), "label": self.case.label, "build_seconds": self.build_seconds,
                "sizing": self.sizing, "results": {k: asdict(v) for k, v in self.results.items()}}


# -- accelerate side -----------------------------------------------------------------------------

@dataclass
class MetaModel:
    """A catalog model built on ``meta`` for accelerate, with what we need to read its device maps.
    ``param_bytes``: (parameter name, bytes as accelerate sizes it), tied names included;
    ``param_block``: block index of each parameter (None: in no block)."""

    key: str
    dtype: str
    model: Any
    no_split: list[str]
    acc_dtype: Any
    special_dtypes: dict[str, Any] | None
    param_bytes: list[tuple[str, int]]
    param_block: list[int | None]
    build_seconds: float
    sizing: str


def _prefix_lookup(name: str, table: dict[str, Any]) -> Any:
    """Value of the longest key of ``table`` that is ``name`` or a dotted prefix of it ("" matches all)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in table:
            return table[key]
    return None


def _block_index_table(profile: ModelProfile) -> dict[str, int]:
    return {m: i for i, b in enumerate(profile.blocks) for m in b.modules}


def build_meta_model(profile: ModelProfile, config: dict, dtype: str) -> MetaModel:
    """Build ``config`` on the meta device as accelerate users do; time it (construction is not
    part of accelerate's planning time)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import CustomDtype

    t0 = time.perf_counter()
    cfg = transformers.AutoConfig.for_model(**config)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.tie_weights()  # from_pretrained ties before the device map; else tied weights count twice
    build_seconds = time.perf_counter() - t0

    blocks = _block_index_table(profile)
    last = profile.num_blocks - 1
    names = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    param_block = [_prefix_lookup(n, blocks) for n, _ in names]
    if dtype in ("nf4", "int4", "int8"):
        acc_dtype = CustomDtype.INT4 if dtype != "int8" else torch.int8
        elem = 0.5 if dtype != "int8" else 1
        quantized = [p.dim() >= 2 and b is not None and 0 < b < last for (_, p), b in zip(names, param_block)]
        special = {n: torch.bfloat16 for (n, _), q in zip(names, quantized) if not q}
        sizing = (f"accelerate dtype={'CustomDtype.INT4' if dtype != 'int8' else 'torch.int8'} for the "
                  f"layers' >=2-D weights, special_dtypes=bfloat16 for embeddings/head/1-D; ours {dtype}")
        param_bytes = [(n, int(p.numel() * (elem if q else 2))) for (n, p), q in zip(names, quantized)]
    else:
        acc_dtype, special = torch.bfloat16, None
        sizing = "bfloat16 for both"
        param_bytes = [(n, p.numel() * 2) for n, p in names]
    return MetaModel(key=profile.name, dtype=dtype, model=model, no_split=list(model._no_split_modules or []),
                     acc_dtype=acc_dtype, special_dtypes=special, param_bytes=param_bytes,
                     param_block=param_block, build_seconds=build_seconds, sizing=sizing)


def _acc_keys(devices: list[Device]) -> dict[Any, str]:
    """accelerate's device keys -> our device ids: GPUs 0..n-1 in the order given, "cpu", "disk"."""
    keys: dict[Any, str] = {}
    gpus = [d for d in devices if d.kind == "gpu"]
    for i, d in enumerate(gpus):
        keys[i] = d.id
    for d in devices:
        if d.kind in ("cpu", "disk"):
            keys[d.kind] = d.id
    return keys


def accelerate_device_map(meta: MetaModel, devices: list[Device], balanced: bool) -> tuple[dict[str, Any], float]:
    """accelerate's device map for ``devices`` with each device's full free bytes as max_memory;
    returns (device map, seconds spent in get_balanced_memory + infer_auto_device_map)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    keys = _acc_keys(devices)
    by_id = {d.id: d for d in devices}
    max_memory = {k: by_id[v].free_bytes for k, v in keys.items()}
    kw = dict(no_split_module_classes=meta.no_split, dtype=meta.acc_dtype, special_dtypes=meta.special_dtypes)
    t0 = time.perf_counter()
    mm = get_balanced_memory(meta.model, max_memory=dict(max_memory), **kw) if balanced else dict(max_memory)
    dmap = infer_auto_device_map(meta.model, max_memory=mm, **kw)
    return dmap, time.perf_counter() - t0


def block_devices_from_device_map(num_blocks: int, param_bytes: list[tuple[str, int]],
                                  param_block: list[int | None], device_map: dict[str, Any],
                                  acc_keys: dict[Any, str]) -> tuple[list[str | None], list[int], int]:
    """Our block index -> device id from an accelerate ``device_map`` (module name -> 0/1/.../"cpu"/
    "disk"): each block goes where most of its bytes went. Returns (devices per block, None where
    no parameter of the block is in the map; indices of blocks split across devices; bytes of
    parameters the map does not place)."""
    tally: list[dict[str, int]] = [{} for _ in range(num_blocks)]
    unplaced = 0
    for (name, nbytes), b in zip(param_bytes, param_block):
        dev = _prefix_lookup(name, device_map)
        if dev is None or dev not in acc_keys:
            unplaced += nbytes
            continue
        if b is None:
            continue
        t = tally[b]
        t[acc_keys[dev]] = t.get(acc_keys[dev], 0) + nbytes
    out: list[str | None] = []
    split: list[int] = []
    for i, t in enumerate(tally):
        if not t:
            out.append(None)
            continue
        out.append(max(t.items(), key=lambda kv: kv[1])[0])
        if len(t) > 1:
            split.append(i)
    return out, split, unplaced


# -- judging --------------------------------------------------------------------------------------

def device_overflow(plan: Plan, profile: ModelProfile) -> dict[str, int]:
    """Bytes past capacity per device (negative: room left). A placement may come back to a device
    (accelerate keeps a tied LM head beside the embeddings, on GPU 0); plan_placement then reports
    for the later stage only what it adds (no second reserve, tied tensors once, the larger
    workspace), so a device's stage totals add up to what it holds."""
    out: dict[str, int] = {}
    cap: dict[str, int] = {}
    for s in plan.stages:
        out[s.device] = out.get(s.device, 0) + s.total_bytes
        cap[s.device] = s.capacity_bytes
    return {d: used - cap[d] for d, used in out.items()}


def judge(profile: ModelProfile, devices: list[Device], workload: Workload, block_devices: list[str],
          tool: str, seconds: float, offload_mode: str | None = None) -> ToolResult:
    """A placement (block index -> device id) judged by our memory and speed model."""
    p = plan_placement(profile, devices, workload, block_devices, offload_mode=offload_mode)
    return _summarise_plan(p, profile, tool, seconds)


def _summarise_plan(p: Plan, profile: ModelProfile, tool: str, seconds: float) -> ToolResult:
    over = device_overflow(p, profile)
    reserve = {s.device: s.reserve_bytes for s in p.stages}
    worst = max(over, key=lambda d: over[d])
    fits = over[worst] <= 0
    note = ""
    if not fits:
        note = (f"out of memory: {worst} over by {format_bytes(over[worst])} "
                f"(its reserve {format_bytes(reserve[worst])})")
    return ToolResult(
        tool=tool,
        offloaded_blocks=sum(s.num_blocks for s in p.offloaded),
        fits=fits,
        hard_oom=any(o > reserve[d] for d, o in over.items()),
        decode_tps=float(p.predicted.decode_tokens_per_s),
        request_seconds=request_seconds(p),
        offload_executed=any(s.mode == "execute" for s in p.offloaded),
        max_context=p.max_context if fits else 0,
        plan_seconds=seconds,
        overflow_bytes=sum(max(0, o) for o in over.values()),
        stages=[f"{s.device}[{s.blocks[0]}:{s.blocks[1]}]{'' if s.mode == 'execute' else '/' + s.mode}"
                for s in p.stages],
        note=note,
    )


def _median_time(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _profile(key: str, dtype: str) -> ModelProfile:
    from vramancer.models.resolve import profile as make_profile

    return make_profile(key, dtype=dtype)


def run_case(case: Case, meta: MetaModel, profile: ModelProfile, repeat: int = 3) -> CaseResult:
    """Plan ``case`` with ours and both accelerate modes; judge all three the same way."""
    devices = parse_devices(case.devices)
    workload = Workload(context=case.context, batch=1, dtype=profile.dtype)
    results: dict[str, ToolResult] = {}

    def ours() -> Plan:  # what a person calls: catalog name -> profile -> plan (+ suggestions)
        return plan(case.model, devices=case.devices, context=case.context, dtype=case.dtype)

    try:
        p, secs = _median_time(ours, repeat)
        _, core = _median_time(lambda: plan_profile(profile, devices, workload, suggest=False), repeat)
        r = _summarise_plan(p, profile, "ours", secs)
        r.core_seconds = core
        results["ours"] = r
    except DoesNotFitError as e:
        results["ours"] = ToolResult(tool="ours", ok=False, note=str(e))

    keys = _acc_keys(devices)
    for tool, balanced in (("acc-seq", False), ("acc-bal", True)):
        (dmap, _), secs = _median_time(lambda b=balanced: accelerate_device_map(meta, devices, b), repeat)
        blocks, split, unplaced = block_devices_from_device_map(
            profile.num_blocks, meta.param_bytes, meta.param_block, dmap, keys)
        placed = [b for b in blocks if b is not None]
        if unplaced or len(placed) != len(blocks):
            results[tool] = ToolResult(tool=tool, ok=False, plan_seconds=secs,
                                       note=f"accelerate left {format_bytes(unplaced)} unplaced")
            continue
        r = judge(profile, devices, workload, placed, tool, secs, offload_mode="stream")
        if r.offload_executed:
            r.note = "; ".join(x for x in (r.note, "offloaded blocks judged as run by the CPU: no GPU has "
                                           "room for plan_placement's double stream buffer") if x)
        r.split_blocks = len(split)
        if split:
            r.note = "; ".join(x for x in (r.note, "split blocks " + ",".join(map(str, split))) if x)
        results[tool] = r
    return CaseResult(case=case, results=results, build_seconds=meta.build_seconds, sizing=meta.sizing)


def run_cases(cases: list[Case], repeat: int = 3, progress: Callable[[CaseResult], None] | None = None
              ) -> list[CaseResult]:
    """Run ``cases``; the meta model of each (model, dtype) is built once and reused."""
    from vramancer.models.catalog import find_model

    metas: dict[tuple[str, str], tuple[MetaModel, ModelProfile]] = {}
    out: list[CaseResult] = []
    for case in cases:
        k = (case.model, case.dtype)
        if k not in metas:
            entry = find_model(case.model)
            if entry is None:
                raise SystemExit(f"{case.model} is not in the catalog")
            prof = _profile(case.model, case.dtype)
            metas[k] = (build_meta_model(prof, entry.config_copy(), case.dtype), prof)
        meta, prof = metas[k]
        r = run_case(case, meta, prof, repeat)
        out.append(r)
        if progress is not None:
            progress(r)
    return out


# -- comparing and printing -------------------------------------------------------------------------

def compare(ours: ToolResult, acc: ToolResult, lenient: bool = False) -> tuple[bool, bool, str]:
    """(never worse, strictly better, why) of ours against one accelerate placement.

    A placement that does not fit (KV cache / activations / reserve past a device) would run out of
    memory: ours fitting where it does not is strictly better, whatever its offload count. When both
    fit: never worse = offloaded blocks <= and decode tokens/s >=; strictly better = fewer offloaded
    blocks or faster. ``lenient``: an accelerate placement over by less than a device's reserve counts
    as fitting (as if our reserve were too cautious)."""
    if not ours.ok or not ours.fits:
        return False, False, "ours does not fit"
    if not acc.ok:
        return True, True, "accelerate placed nothing"
    if not acc.fits and (acc.hard_oom or not lenient):
        return True, True, "accelerate's placement runs out of memory"
    faster = ours.decode_tps > acc.decode_tps * (1 + TPS_REL_TOL)
    slower = ours.decode_tps < acc.decode_tps * (1 - TPS_REL_TOL)
    if ours.offloaded_blocks > acc.offloaded_blocks:
        return False, False, f"ours offloads {ours.offloaded_blocks} blocks, accelerate {acc.offloaded_blocks}"
    if slower:
        return False, False, f"ours {ours.decode_tps:.2f} tok/s < accelerate {acc.decode_tps:.2f}"
    if ours.offloaded_blocks < acc.offloaded_blocks:
        return True, True, "fewer blocks offloaded"
    if faster:
        return True, True, "faster"
    return True, False, "same"


def _fmt_tps(r: ToolResult) -> str:
    if not r.ok:
        return "-"
    t = f"{r.decode_tps:.1f}" if r.decode_tps >= 10 else f"{r.decode_tps:.2f}"
    return t if r.fits else f"({t})"


def _fmt_ctx(r: ToolResult) -> str:
    if not r.ok or not r.fits:
        return "OOM"
    return f"{r.max_context // 1024}k"


def _row(r: CaseResult) -> str:
    R = [r.results[t] for t in TOOLS]
    off = "/".join("-" if not x.ok else (f"{x.offloaded_blocks}" + ("s" if x.split_blocks else "")) for x in R)
    fits = "/".join("-" if not x.ok else ("yes" if x.fits else "NO") for x in R)
    ctx = "/".join(_fmt_ctx(x) for x in R)
    tps = " / ".join(_fmt_tps(x) for x in R)
    ms = "/".join(f"{x.plan_seconds * 1e3:.0f}" for x in R)
    return (f"{r.case.label:<50} {r.case.context // 1024:>3}k {off:>11} {fits:>12} {ctx:>15} "
            f"{tps:>25} {ms:>12} {r.build_seconds:>6.2f}")


HEADER = (f"{'case':<50} {'ctx':>4} {'offloaded':>11} {'KV fits':>12} {'max context':>15} "
          f"{'decode tok/s':>25} {'plan ms':>12} {'meta s':>6}\n"
          f"{'':<50} {'':>4} {'ours/seq/bal':>11} {'ours/seq/bal':>12} {'ours/seq/bal':>15} "
          f"{'ours / seq / bal':>25} {'ours/seq/bal':>12} {'build':>6}")


def summarize(results: list[CaseResult]) -> tuple[list[str], dict[str, bool]]:
    """Totals and goal lines; returns (lines, {goal: met})."""
    lines: list[str] = []
    goals: dict[str, bool] = {}
    never_worse_all = True
    strict_where_needed = True
    problems: list[str] = []
    for tool in ("acc-seq", "acc-bal"):
        nw = sb = needed = needed_ok = 0
        ratios: list[tuple[float, str]] = []
        off_diff: list[tuple[int, str]] = []
        oom = hard = lenient_nw = 0
        roomier: list[str] = []
        lenient_losses: list[str] = []
        req_ratios: list[tuple[float, str]] = []
        for r in results:
            o, a = r.results["ours"], r.results[tool]
            never, strict, why = compare(o, a)
            l_never, _, l_why = compare(o, a, lenient=True)
            lenient_nw += l_never
            if not l_never:
                lenient_losses.append(f"{r.case.label} {r.case.context // 1024}k: {l_why} "
                                      f"(request {o.request_seconds:.0f} s vs {a.request_seconds:.0f} s)")
            nw += never
            sb += strict
            if a.ok and not a.fits:
                oom += 1
                hard += a.hard_oom
            if (o.ok and o.fits and a.ok and a.fits and a.max_context > o.max_context
                    and a.offloaded_blocks >= o.offloaded_blocks and a.decode_tps >= o.decode_tps * (1 - TPS_REL_TOL)):
                roomier.append(f"{r.case.label} {r.case.context // 1024}k "
                               f"({a.max_context // 1024}k vs {o.max_context // 1024}k)")
            if not never:
                never_worse_all = False
                problems.append(f"{r.case.label} ctx {r.case.context}: worse than {tool}: {why}")
            if (not a.ok) or (not a.fits) or a.offloaded_blocks > 0:
                needed += 1
                needed_ok += strict
                if not strict:
                    strict_where_needed = False
                    problems.append(f"{r.case.label} ctx {r.case.context}: not strictly better than {tool} "
                                    f"(which offloads {a.offloaded_blocks} blocks, fits={a.fits}): {why}")
            if o.ok and o.fits and a.ok and a.fits and a.decode_tps > 0:
                ratios.append((o.decode_tps / a.decode_tps, f"{r.case.label} {r.case.context // 1024}k"))
                req_ratios.append((a.request_seconds / o.request_seconds, f"{r.case.label} {r.case.context // 1024}k"))
            if o.ok and a.ok:
                off_diff.append((o.offloaded_blocks - a.offloaded_blocks, f"{r.case.label} {r.case.context // 1024}k"))
        n = len(results)
        lines.append(f"vs {tool}: never worse in {nw}/{n} cases; strictly better in {sb}/{n}; "
                     f"accelerate's placement runs out of memory in {oom}/{n} ({hard} by more than the "
                     f"device's reserve, i.e. even with no CUDA context at all); "
                     f"strictly better in {needed_ok}/{needed} cases where accelerate offloads or runs out of memory")
        if ratios:
            lo = min(ratios)
            hi = max(ratios)
            geo = statistics.geometric_mean([x for x, _ in ratios])
            lines.append(f"   decode tok/s ours/{tool} where both fit ({len(ratios)} cases): worst {lo[0]:.3f}x "
                         f"({lo[1]}), best {hi[0]:.2f}x ({hi[1]}), geometric mean {geo:.3f}x")
        if req_ratios:
            lo = min(req_ratios)
            lines.append(f"   request time (prefill half the context + 256 tokens) {tool}/ours where both fit: "
                         f"worst {lo[0]:.3f}x ({lo[1]}), geometric mean "
                         f"{statistics.geometric_mean([x for x, _ in req_ratios]):.3f}x")
        lines.append(f"   counting {tool}'s placements that overflow by less than the device's reserve as running: "
                     f"never worse in {lenient_nw}/{n}" + (":" if lenient_losses else ""))
        for loss in lenient_losses:
            lines.append("      " + loss)
        if roomier:
            lines.append(f"   {tool} holds a longer context than ours at the same speed and offload in "
                         f"{len(roomier)} cases: " + "; ".join(roomier))
        if off_diff:
            worst = max(off_diff)
            lines.append(f"   offloaded blocks ours - {tool}: worst {worst[0]:+d} ({worst[1]}), "
                         f"best {min(off_diff)[0]:+d} ({min(off_diff)[1]})")
    ours_t = [r.results["ours"].plan_seconds for r in results if r.results["ours"].ok]
    seq_t = [r.results["acc-seq"].plan_seconds for r in results]
    bal_t = [r.results["acc-bal"].plan_seconds for r in results]
    build_t = {(r.case.model, r.case.dtype): r.build_seconds for r in results}
    if ours_t:
        core_t = [r.results["ours"].core_seconds for r in results if r.results["ours"].ok]
        lines.append(f"planning time, median over cases: ours {statistics.median(ours_t) * 1e3:.1f} ms "
                     f"(profile + devices + plan + suggestions, no torch; {statistics.median(core_t) * 1e3:.1f} ms "
                     f"the partition alone), accelerate sequential {statistics.median(seq_t) * 1e3:.1f} ms, "
                     f"balanced {statistics.median(bal_t) * 1e3:.1f} ms (+ building the model on meta: "
                     f"median {statistics.median(build_t.values()):.2f} s, max {max(build_t.values()):.2f} s)")
    big = [r for r in results if "405b" in r.case.model
           and sum(1 for d in r.case.devices.split(",") if not d.startswith(("cpu", "disk"))) >= 8]
    for p in problems:
        lines.append("   " + p)
    goals["never worse than accelerate (sequential and balanced) on every case"] = never_worse_all
    goals["strictly better wherever accelerate offloads or leaves no room for the KV cache"] = strict_where_needed
    if big:
        worst = max(r.results["ours"].plan_seconds for r in big)
        worst_build = max(r.build_seconds for r in big)
        core = max(r.results["ours"].core_seconds for r in big)
        lines.append(f"405B over 8 GPUs: ours plans in {worst * 1e3:.0f} ms (worst of {len(big)} cases; the "
                     f"partition alone, without the suggestions of what would make it fit, {core * 1e3:.0f} ms); "
                     f"accelerate "
                     f"{max(r.results['acc-bal'].plan_seconds for r in big) * 1e3:.0f} ms balanced after "
                     f"{worst_build:.2f} s building the model on meta")
        goals[f"planning a 405B-class model over 8 GPUs in under {GOAL_405B_PLAN_SECONDS:g} s"] = \
            all(r.results["ours"].ok for r in big) and worst < GOAL_405B_PLAN_SECONDS
    return lines, goals


def _quiet_accelerate() -> None:
    # simulated GPUs are not on this machine: accelerate warns "Device 0 is not available" on every call
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filter", default="", help="only cases whose label contains this text")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats per tool (median)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    _quiet_accelerate()
    import accelerate
    import transformers

    cases = [c for c in CASES if args.filter in c.label]
    print(f"planner vs accelerate {accelerate.__version__} (transformers {transformers.__version__}): "
          f"{len(cases)} cases; accelerate gets each device's full free bytes as max_memory; every "
          "placement judged by our memory model (weights + KV + activations + reserve) and speed model")
    print("offloaded: blocks on cpu/disk ('s': accelerate split a block); KV fits: every stage holds its "
          "weights + KV cache + activations + reserve; tok/s in () would run out of memory")
    print(HEADER)
    sizing_seen: set[str] = set()

    def progress(r: CaseResult) -> None:
        print(_row(r), flush=True)
        if r.sizing not in sizing_seen and r.sizing != "bfloat16 for both":
            sizing_seen.add(r.sizing)
            print(f"{'':<8}(quantized sizing: {r.sizing})")
        for t in TOOLS:
            x = r.results[t]
            if x.note:
                print(f"{'':<8}{t}: {x.note}")

    t0 = time.perf_counter()
    results = run_cases(cases, repeat=args.repeat, progress=progress)
    lines, goals = summarize(results)
    print()
    for line in lines:
        print(line)
    for goal, met in goals.items():
        print(f"{'GOAL MET' if met else 'GOAL NOT MET'}: {goal}")
    print(f"total benchmark time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
