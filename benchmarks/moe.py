"""MoE routed experts in host RAM vs whole layers offloaded, on the same memory budget.

The models: one random decoder per shape below (``--shapes``), float32, saved as safetensors, scaled
down from the published config of the model family it stands for, keeping the ratios that decide
this comparison: experts per layer and top k (the fraction of the experts a token reads), expert
width / hidden, attention width and GQA ratio / hidden, shared experts / hidden. What the two plans
move off the GPU is the same number of bytes; what a decode step then reads and runs on the host
differs: a whole layer offloaded reads its attention, shared expert and KV cache there as well as
its top-k experts, a layer's experts offloaded only the top-k experts. So the gain is set by
(attention + shared + KV) / (top-k experts) per layer, which is the same at any scale. What is not:
the fixed cost of each module run on the host (~0.1-0.3 ms of dispatch, as much as reading a few MB),
which weighs more at small widths, and the GPU room the experts plan keeps for a prefill's copy of
one layer's experts (1 / layers of the experts), so the layer counts are the published ones (Qwen3's
halved). The width is what lets all three shapes run here in a few minutes; the published
models themselves are planned too (below), for the figure at real sizes. Shapes (published -> here,
hidden 256, float32):

  mixtral      Mixtral 8x7B (and 8x22B): hidden 4096, 32 layers, 32 heads of 128, 8 KV heads, 8
               experts of 14336 (3.5 x hidden), top 2, no shared expert -> 32 layers, 4 heads of 64,
               1 KV head, 8 experts of 896, top 2. Attention is ~3% of a layer, a token reads 1/4
               of its experts: per byte freed from the GPU, a whole layer and its experts alone read
               nearly the same bytes on the host (+ the KV cache, which grows with the context).
  qwen3-moe    Qwen3-30B-A3B (Qwen3-235B-A22B alike): hidden 2048, 48 layers, 32 heads of 128 (q
               is 2 x hidden), 4 KV heads, 128 experts of 768 (0.375 x hidden), top 8, no shared
               expert -> 24 layers, 8 heads of 64, 1 KV head, 128 experts of 96, top 8. A token
               reads 1/16 of the experts; attention is a third of what a token reads in a layer.
  qwen1.5-moe  Qwen1.5-MoE-A2.7B (Qwen2-57B-A14B, DeepSeek-V2-Lite alike: fine-grained experts plus
               always-on shared experts): hidden 2048, 24 layers, 16 heads of 128 (no GQA), 60
               experts of 1408 (0.6875 x hidden), top 4, a shared expert of 5632 (2.75 x hidden) ->
               24 layers, 4 heads of 64, 60 experts of 176, top 4, a shared expert of 704. Attention
               and the shared expert are 3/5 of what a token reads in a layer, experts 1/15 of theirs.

``--layers/--hidden/--experts/--top-k/--moe-inter`` instead give one Qwen2-MoE-style shape of those
sizes (a shared expert of ``--hidden``; what this benchmark ran before the shapes above; a tiny one
is its smoke test): ``custom``.

The devices: one simulated GPU (``--gpu``, a catalog card) whose memory is set so that the model
misses it by ``--short`` of its routed experts' bytes, and host RAM (``cpu:16GiB``). The planner
plans it twice on exactly these devices:

  whole    whole layers offloaded to host RAM and executed there: the planner's execute-mode
           placement (the one it starts from before weighing streaming; ``moe_experts_on_host=False``);
  experts  every layer on the GPU but the routed experts of the first N MoE layers, which stay in
           host RAM and run there (plan/experts.py, llama.cpp's ``--n-cpu-moe N``).

Each shape's published model itself (its config.json, bfloat16, nothing loaded) is planned the same
way on ``--published-gpu`` with host RAM: its predicted ratio and the bytes each plan reads on the host
per token, the figure for the real sizes (where fixed per-module costs no longer matter).

Predicted: the planner's decode tokens/s of each plan on the named devices, and their ratio, with
this host's speed measured first (runtime/calibrate, a few seconds, kept in a temporary cache
folder; ``--no-calibrate``: the defaults or what ``benchmarks/cost_model.py --save`` kept). The
planner's own whole-layer choice on these devices (it may stream the offloaded layers through the GPU,
or run them per phase) is printed too, predicted only: a stream's copies over PCIe and its compute
on a GPU cannot be measured on a machine without one. (On a model this small a layer crosses PCIe in
a fraction of a millisecond, so streaming looks cheap; a Mixtral layer takes ~70 ms.)

Measured, here: both plans loaded by the split runtime and run (greedy ids checked equal to the
unsplit model's). On a machine without a GPU the simulated GPU runs on the same CPU as the host, so
the wall-clock tokens/s of the two plans time the same arithmetic on one CPU (printed; a ratio near
1 is what it should show). What the placements change is the host's share of each decode step: the
seconds spent in what the plan runs on the host (whole: the offloaded layers, from their stream copy
to their output; experts: the experts modules, inputs moved in and output out), timed by forward
hooks around exactly those modules. The "measured" tokens/s of each plan is that measured host time
plus the planner's predicted time for the rest of the step (the GPU's share and the hops), which this
machine cannot measure; their ratio is the goal's figure (>= 1.5x). The planner's predicted host
share is printed next to the measured one, and the bytes each plan reads on the host per decode step
(the planner's: weights read plus KV cache passes).

Timings: median of ``--repeat`` decode runs of ``--new`` tokens after a ``--prompt``-token prefill,
the two plans' decode steps alternating one by one (a busy machine's load falls on both alike).
Run:  python benchmarks/moe.py [--shapes mixtral,qwen3-moe,qwen1.5-moe] [--repeat 3] [--threads N] [--json FILE]
(benchmarks/quantized.py runs a custom shape). A benchmark, not a test: it always exits 0 and prints
"GOAL MET" / "GOAL NOT MET" per shape.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import with_threads  # noqa: E402

__all__ = ["main", "run", "make_model", "make_plans", "measure", "GOAL"]

GOAL = 1.5
HOST = "cpu:16GiB"


def _log(msg: str) -> None:
    print(msg, flush=True)


# the shapes of the docstring: (transformers model type, its config beyond the common part)
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(arch="mixtral", hidden=256, layers=32, heads=4, kv_heads=1, head_dim=64,
                    experts=8, top_k=2, moe_inter=896, shared_inter=0),
    "qwen3-moe": dict(arch="qwen3_moe", hidden=256, layers=24, heads=8, kv_heads=1, head_dim=64,
                      experts=128, top_k=8, moe_inter=96, shared_inter=0),
    "qwen1.5-moe": dict(arch="qwen2_moe", hidden=256, layers=24, heads=4, kv_heads=4, head_dim=64,
                        experts=60, top_k=4, moe_inter=176, shared_inter=704),
}


# the published configs the shapes stand for (their config.json), planned at full size (predicted only)
PUBLISHED: dict[str, dict[str, Any]] = {
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "torch_dtype": "bfloat16"},
    "qwen3-moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
                  "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                  "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                  "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "qwen1.5-moe": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048,
                    "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
                    "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                    "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}


def published_prediction(name: str, gpu: str, short: float, context: int, tmp: str) -> dict[str, Any]:
    """The planner's experts / whole prediction for the published model of shape ``name`` (bfloat16,
    config only: nothing is loaded) on ``gpu`` short by ``short`` of its experts, with host RAM."""
    folder = Path(tmp) / f"{name}-published"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PUBLISHED[name]))
    plans = make_plans(str(folder), gpu, short, context, host="cpu:1TiB")
    w, e = plans["whole"], plans["experts"]
    (hw, bw), (he, be) = predicted_host_seconds(w, str(folder)), predicted_host_seconds(e, str(folder))
    return {"devices": plans["devices"], "whole_tps": w.predicted.decode_tokens_per_s,
            "whole_host_s": hw, "experts_host_s": he,
            "experts_tps": e.predicted.decode_tokens_per_s, "whole_host_bytes": bw, "experts_host_bytes": be,
            "whole_host_layers": sum(s.num_blocks for s in w.offloaded),
            "experts_host_layers": sum(1 for b in e.blocks if b.experts_device),
            "ratio": e.predicted.decode_tokens_per_s / max(1e-12, w.predicted.decode_tokens_per_s)}


def custom_shape(layers: int, hidden: int, experts: int, top_k: int, moe_inter: int) -> dict[str, Any]:
    heads = max(1, hidden // 64)
    return dict(arch="qwen2_moe", hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 4),
                head_dim=hidden // heads, experts=experts, top_k=top_k, moe_inter=moe_inter, shared_inter=hidden)


def make_model(shape: dict[str, Any], vocab: int, seed: int = 0):
    import torch
    import transformers

    h = shape["hidden"]
    common = dict(hidden_size=h, num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], vocab_size=vocab, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    arch = shape["arch"]
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, head_dim=shape["head_dim"], intermediate_size=shape["moe_inter"],
                                         num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=shape["head_dim"], intermediate_size=2 * h,
                                          moe_intermediate_size=shape["moe_inter"], num_experts=shape["experts"],
                                          num_experts_per_tok=shape["top_k"], decoder_sparse_step=1,
                                          norm_topk_prob=True)
    else:
        cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=2 * h, moe_intermediate_size=shape["moe_inter"],
                                          shared_expert_intermediate_size=shape["shared_inter"],
                                          num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                                          decoder_sparse_step=1)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # a larger spread than the init: decisive greedy choices (the ids are compared)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 / h ** 0.5)
    return model


def make_plans(folder: str, gpu: str, short: float, context: int, host: str = HOST) -> dict[str, Any]:
    """{"devices": spec, "whole": Plan (executed), "experts": Plan, "whole_chosen": the planner's own
    whole-layer plan, "chosen": "whole" | "experts" (the planner's choice with both allowed)}."""
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.experts import experts_on_host
    from vramancer.plan.planner import _assemble, _Planner, _reserve, plan, plan_profile

    prof = profile(folder)
    roomy = plan(folder, devices=f"{gpu}:1TiB,{host}", context=context, reserve_bytes=0)
    need = sum(s.total_bytes for s in roomy.stages)
    experts = sum(b.experts_bytes for b in prof.blocks)
    devices = f"{gpu}:{need - int(short * experts)}B,{host}"
    chosen_whole = plan(folder, devices=devices, context=context, reserve_bytes=0, moe_experts_on_host=False)
    chosen = plan(folder, devices=devices, context=context, reserve_bytes=0)
    devs = parse_devices(devices)
    pl = _Planner(prof, devs, chosen_whole.workload, _reserve(devs, 0))   # the planner's first, execute-mode search
    placement = pl.search()
    whole = _assemble(pl, prof, devs, chosen_whole.workload, placement.ranges, [], None, 0, False,
                      offload_mode="execute")
    moe = experts_on_host(prof, devs, whole.workload, 0, whole, plan_profile)
    if moe is None or not whole.offloaded:
        raise SystemExit(f"no experts placement against whole-layer offload on {devices}: use another --short")
    return {"devices": devices, "whole": whole, "experts": moe, "whole_chosen": chosen_whole,
            "chosen": "experts" if any(b.experts_device for b in chosen.blocks) else "whole"}


def _host_modules(model, kind: str) -> list:
    rt = model.vramancer
    if kind == "experts":
        return [e.module for st in rt.stages for e in st.host_experts]
    return [mod for st in rt.stages if st.plan.kind != "gpu" for _, mod in st.units]


class _HostTimer:
    """Seconds spent inside a set of modules (outermost first pre-hook to last forward hook)."""

    def __init__(self, modules: list) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre, prepend=True))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _decode(model, ids, new: int, timer: _HostTimer | None = None) -> tuple[list[int], float, float]:
    """Greedy: prefill ``ids``, then ``new`` - 1 one-token steps. (ids, decode seconds per token,
    host seconds per decode token)."""
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [int(nxt)]
        if timer is not None:
            timer.seconds = 0.0
        t0 = time.perf_counter()
        for _ in range(new - 1):
            out = model(nxt, cache=cache, use_cache=True)
            cache = _cache_of(out)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        dt = time.perf_counter() - t0
    steps = max(1, new - 1)
    return toks, dt / steps, (timer.seconds / steps if timer is not None else 0.0)


def _decode_interleaved(models: list, ids, new: int, timers: list[_HostTimer]) -> dict[int, tuple]:
    """_decode of each model, their decode steps alternating one by one (a busy machine's load then
    falls on both alike, not on one model's whole run): {index: (ids, seconds per token, host seconds
    per token)}."""
    import torch

    state = []
    with torch.no_grad():
        for m in models:
            out = m(ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            state.append([_cache_of(out), nxt, [int(nxt)], 0.0])
        for t in timers:
            t.seconds = 0.0
        for _ in range(new - 1):
            for i, m in enumerate(models):
                cache, nxt, toks, _ = st = state[i]
                t0 = time.perf_counter()
                out = m(nxt, cache=cache, use_cache=True)
                st[0] = _cache_of(out)
                st[1] = out.logits[:, -1].argmax(-1, keepdim=True)
                st[3] += time.perf_counter() - t0
                toks.append(int(st[1]))
    steps = max(1, new - 1)
    return {i: (st[2], st[3] / steps, timers[i].seconds / steps) for i, st in enumerate(state)}


def predicted_host_seconds(plan, folder: str) -> tuple[float, float]:
    """The planner's (seconds, bytes read) per decode step for what ``plan`` runs on the host: whole
    layers (weights read and KV cache passes) or experts modules (the top-k experts' bytes)."""
    from vramancer.models.resolve import profile
    from vramancer.plan.cost import CostModel

    prof = profile(folder)
    w = plan.workload
    cost = CostModel(prof, w.context, w.batch, w.prefill_chunk)
    if not any(b.experts_device for b in plan.blocks):
        nbytes = sum(cost._decode_bytes(prof.blocks[i]) for s in plan.offloaded for i in range(*s.blocks))
        return sum(s.decode_seconds for s in plan.offloaded), nbytes
    host = {d.id: d for d in plan.devices}
    moved = [i for i, b in enumerate(plan.blocks) if b.experts_device]
    return (sum(cost.experts_decode_seconds(prof.blocks[i], host[plan.blocks[i].experts_device]) for i in moved),
            sum(min(w.batch * prof.blocks[i].experts_read_bytes_per_token, prof.blocks[i].experts_bytes)
                for i in moved))


def _bytes_by_device(model, plan) -> tuple[dict[str, int], dict[str, int]]:
    """(weights held per plan device, measured; the plan's), MoE experts in host RAM included."""
    return model.vramancer.memory_report().weights_bytes_by_device(), plan.weights_bytes_by_device()


def measure(folder: str, plans: dict[str, Any], prompt: int, new: int, repeat: int, vocab: int) -> dict[str, Any]:
    """Both plans loaded, their decode runs interleaved (a busy machine slows both alike)."""
    import torch
    import transformers

    from vramancer.runtime.loader import load

    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(7))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    want, _, _ = _decode(ref, ids, new)
    del ref
    kinds = ("whole", "experts")
    models = {k: load(folder, plan=plans[k]) for k in kinds}
    timers = {k: _HostTimer(_host_modules(models[k], k)) for k in kinds}
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(repeat):
        for k, r in _decode_interleaved([models[k] for k in kinds], ids, new, [timers[k] for k in kinds]).items():
            runs[kinds[k]].append(r)
    rows: dict[str, Any] = {}
    for kind in kinds:
        plan, model = plans[kind], models[kind]
        timers[kind].remove()
        held, planned = _bytes_by_device(model, plan)
        step = statistics.median(r[1] for r in runs[kind])
        host = statistics.median(r[2] for r in runs[kind])
        pred_step = plan.predicted.decode_ms_per_step / 1e3
        pred_host, host_bytes = predicted_host_seconds(plan, folder)
        rows[kind] = dict(
            plan=kind, stages=[f"{s.device}[{s.blocks[0]}:{s.blocks[1]}]{'*' if s.mode == 'stream' else ''}"
                               for s in plan.stages],
            host_layers=sum(s.num_blocks for s in plan.offloaded),
            host_experts_layers=sum(1 for b in plan.blocks if b.experts_device),
            weights_bytes_by_device=held, planned_weights_bytes_by_device=planned,
            tokens_equal=all(r[0] == want for r in runs[kind]),
            predicted_decode_tps=plan.predicted.decode_tokens_per_s,
            predicted_host_s=pred_host, measured_host_s=host, predicted_host_bytes=host_bytes,
            measured_tps=1.0 / max(1e-12, host + max(0.0, pred_step - pred_host)),
            wall_tps=1.0 / step)
        model.vramancer.free()
    return rows


def _calibrated(tmp: str) -> str:
    """This host's speed (runtime/calibrate) kept in a cache folder under ``tmp``, which the planner
    reads while the benchmark runs ($VRAMANCER_CACHE_DIR); a measurement already kept is used as it is."""
    import os

    from vramancer.devices.host_speed import host_speed, save_host_speed

    if host_speed().source == "measured":
        return "measured before (kept)"
    from vramancer.runtime.calibrate import measure_host_speed

    os.environ["VRAMANCER_CACHE_DIR"] = str(Path(tmp) / "cache")
    save_host_speed(measure_host_speed())
    return "measured now"


def run_shape(name: str, shape: dict[str, Any], args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """Plan, load and time one shape; print its rows; its figures."""
    import torch

    model = make_model(shape, args.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    folder = str(Path(tmp) / name)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    plans = make_plans(folder, args.gpu, args.short, args.prompt + args.new)
    shared = f" + a shared expert of {shape['shared_inter']}" if shape["shared_inter"] else ""
    _log(f"\n[{name}] {shape['arch']}: {shape['layers']} layers x {shape['hidden']}, {shape['heads']} heads of "
         f"{shape['head_dim']} ({shape['kv_heads']} KV), {shape['experts']} experts of {shape['moe_inter']} "
         f"(top {shape['top_k']}){shared}, {n_params / 1e6:.1f}M parameters, float32; devices {plans['devices']}")
    rows = measure(folder, plans, args.prompt, args.new, args.repeat, args.vocab)
    w, e = rows["whole"], rows["experts"]
    _log(f"{'plan':8s} {'on host':>16s} {'host MB/tok':>11s} {'pred tok/s':>11s} {'host ms/tok pred':>17s} "
         f"{'meas':>7s} {'meas tok/s':>11s} {'wall tok/s':>11s}  tokens  bytes==plan")
    for r in (w, e):
        where = (f"{r['host_layers']} layers" if r["plan"] == "whole" else f"{r['host_experts_layers']} experts")
        _log(f"{r['plan']:8s} {where:>16s} {r['predicted_host_bytes'] / 1e6:11.1f} {r['predicted_decode_tps']:11.1f} "
             f"{r['predicted_host_s'] * 1e3:17.2f} {r['measured_host_s'] * 1e3:7.2f} {r['measured_tps']:11.1f} "
             f"{r['wall_tps']:11.1f}  {'equal' if r['tokens_equal'] else 'DIFFER'}  "
             f"{'yes' if r['weights_bytes_by_device'] == r['planned_weights_bytes_by_device'] else 'NO'}")
    pred_ratio = e["predicted_decode_tps"] / max(1e-12, w["predicted_decode_tps"])
    meas_ratio = e["measured_tps"] / max(1e-12, w["measured_tps"])
    wall_ratio = e["wall_tps"] / max(1e-12, w["wall_tps"])
    host_ratio = w["measured_host_s"] / max(1e-12, e["measured_host_s"])
    _log(f"experts / whole, decode tokens/s: predicted {pred_ratio:.2f}x; measured (host measured + GPU "
         f"predicted) {meas_ratio:.2f}x; host share alone {host_ratio:.2f}x; wall clock here, all on one CPU: "
         f"{wall_ratio:.2f}x")
    _log(f"[{name}] experts in host RAM vs whole layers offloaded, goal >= {GOAL}x (measured): "
         + ("GOAL MET" if meas_ratio >= GOAL else "GOAL NOT MET"))
    cw = plans["whole_chosen"]
    modes = ", ".join(f"{s.device}[{s.blocks[0]}:{s.blocks[1]}] {s.mode}" for s in cw.offloaded) or "none offloaded"
    chosen_ratio = e["predicted_decode_tps"] / max(1e-12, cw.predicted.decode_tokens_per_s)
    _log(f"the planner's own whole-layer plan here: {modes}; predicted {cw.predicted.decode_tokens_per_s:g} "
         f"tokens/s decode, {cw.predicted.prefill_tokens_per_s:g} prefill; experts / it, predicted decode: "
         f"{chosen_ratio:.2f}x (not measurable without a GPU); the planner's choice with both allowed: "
         f"{plans['chosen']}")
    return {"shape": name, **shape, "parameters": n_params, "devices": plans["devices"], "chosen": plans["chosen"],
            "rows": [w, e],
            "whole_chosen": {"modes": [s.mode for s in cw.offloaded],
                             "predicted_decode_tps": cw.predicted.decode_tokens_per_s,
                             "predicted_prefill_tps": cw.predicted.prefill_tokens_per_s,
                             "predicted_ratio": chosen_ratio},
            "predicted_ratio": pred_ratio, "measured_ratio": meas_ratio, "host_ratio": host_ratio,
            "wall_ratio": wall_ratio, "goal_met": meas_ratio >= GOAL, "torch_threads": torch.get_num_threads()}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure, print the table; the figures as a dict (what --json writes): ``shapes``,
    one entry per shape, and with one shape its entry's keys at the top level too."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    for opt in ("--layers", "--hidden", "--experts", "--top-k", "--moe-inter"):
        ap.add_argument(opt, type=int, default=None, help="a custom Qwen2-MoE-style shape instead (module docstring)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--gpu", default="rtx3060", help="the simulated card (its memory is set here)")
    ap.add_argument("--short", type=float, default=0.4,
                    help="the GPU misses the model by this fraction of its routed experts' bytes")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (the KV cache decode reads)")
    ap.add_argument("--new", type=int, default=32, help="tokens per decode measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--published-gpu", default="rtx4090",
                    help="the card the published models are planned on (predicted only; its memory is set here)")
    ap.add_argument("--no-published", action="store_true", help="skip the published models' predictions")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="predict with the host figures kept or the defaults, not a fresh measurement")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    custom = [args.layers, args.hidden, args.experts, args.top_k, args.moe_inter]
    if any(v is not None for v in custom):
        shapes = {"custom": custom_shape(*(v if v is not None else d for v, d in zip(custom, (8, 512, 8, 2, 256))))}
    else:
        names = [n.strip() for n in args.shapes.split(",") if n.strip()]
        bad = [n for n in names if n not in SHAPES]
        if bad or not names:
            print(f"error: unknown shape {', '.join(bad) or '(none)'} (known: {', '.join(SHAPES)})", file=sys.stderr)
            raise SystemExit(2)
        shapes = {n: SHAPES[n] for n in names}

    import os

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    def measure_all() -> tuple[list[dict[str, Any]], Any]:
        cache_env = os.environ.get("VRAMANCER_CACHE_DIR")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                speed = "defaults / kept (--no-calibrate)" if args.no_calibrate else _calibrated(tmp)
                from vramancer.devices.host_speed import host_speed

                hs = host_speed()
                _log(f"MoE experts in host RAM vs whole layers offloaded; prompt {args.prompt}, {args.new} new "
                     f"tokens, median of {args.repeat}, {torch.get_num_threads()} torch threads; host speed {speed}: "
                     f"{hs.bandwidth_bytes_per_s / 1e9:.1f} GB/s decode reads, {hs.block_overhead_s * 1e3:.2f} ms "
                     f"per layer, {hs.step_overhead_s * 1e3:.2f} ms per step")
                done = [run_shape(name, shape, args, tmp) for name, shape in shapes.items()]
                for r in done:
                    if r["shape"] in PUBLISHED and not args.no_published:
                        r["published"] = published_prediction(r["shape"], args.published_gpu, args.short,
                                                              args.prompt + args.new, tmp)
                return done, hs
        finally:
            if cache_env is None:
                os.environ.pop("VRAMANCER_CACHE_DIR", None)
            else:
                os.environ["VRAMANCER_CACHE_DIR"] = cache_env

    # torch's thread count is given back after (the smoke test runs this in the test process)
    done, hs = with_threads(args.threads or None, measure_all)
    _log(f"\nshape         pred ratio  meas ratio  host share ratio  goal (>= {GOAL}x, measured)  "
         f"published model on {args.published_gpu} (bfloat16), predicted: host GB/tok whole -> experts, ratio")
    for r in done:
        pub = r.get("published")
        tail = (f"{pub['whole_host_bytes'] / 1e9:.2f} ({pub['whole_host_layers']} layers) -> "
                f"{pub['experts_host_bytes'] / 1e9:.2f} ({pub['experts_host_layers']} experts), {pub['ratio']:.2f}x"
                if pub else "")
        _log(f"{r['shape']:12s} {r['predicted_ratio']:10.2f}x {r['measured_ratio']:10.2f}x "
             f"{r['host_ratio']:16.2f}x  {'MET' if r['goal_met'] else 'NOT MET':26s} {tail}")
    results: dict[str, Any] = {"shapes": done, "host_speed": hs.to_dict()}
    if len(done) == 1:
        results.update({k: v for k, v in done[0].items()})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
