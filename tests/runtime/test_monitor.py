"""`vramancer run --monitor / --trace` and the runtime's telemetry feed: memory per stage of a split
run as samples, in the phases load / prefill / decode, with exact bytes."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramancer.cli import main as cli  # noqa: E402

from .conftest import build_model, make_plan, offload_plan  # noqa: E402

DEVICES = ["rtx3090#0", "rtx3060-12gb#0"]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved as a transformers folder."""
    from vramancer.serve.testing import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("monitor") / "tiny-chat", hidden_size=32,
                                 intermediate_size=48, max_position_embeddings=256)


def _run(folder, *extra: str) -> int:
    return cli(["run", str(folder), "--prompt", "Where does the memory go?", "--max-new-tokens", "8",
                "--devices", "rtx3090,rtx3060", "--split", "1,1", "--context", "128", *extra])


def _used(snapshot, device: str) -> int | None:
    return next((d.used_bytes for d in snapshot.devices if d.device == device), None)


def test_run_monitor_trace_json(chat_folder, tmp_path, capsys):
    from vramancer.telemetry.export import read_trace

    trace_path = tmp_path / "out.json"
    rc = _run(chat_folder, "--monitor", "--monitor-interval", "0.05", "--trace", str(trace_path), "--json")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    plan_stages, mem_stages = doc["plan"]["stages"], doc["memory"]["stages"]
    assert [s["device"] for s in plan_stages] == DEVICES
    tel = doc["telemetry"]
    assert tel["trace"] == str(trace_path)
    assert [m["name"] for m in tel["marks"]] == ["first token"]

    # the live view: one line per sample on stderr, naming stage and phase
    lines = [ln for ln in captured.err.splitlines() if " | " in ln]
    assert any(" load | s0 rtx3090#0 " in ln for ln in lines)
    assert any(" decode | " in ln and "s1 rtx3060-12gb#0" in ln for ln in lines)

    trace = read_trace(trace_path)
    names = [p.name for p in trace.phases]
    assert names == ["load", "prefill", "decode"]
    assert [p.start for p in trace.phases] == sorted(p.start for p in trace.phases)
    assert all(p.end is not None and p.end >= p.start for p in trace.phases)
    by_phase = {n: [s for s in trace.snapshots if s.phase == n] for n in names}
    assert all(by_phase[n] for n in names)          # each phase ends with a sample
    for s in trace.snapshots:
        sim = [d for d in s.devices if d.source == "simulated"]
        assert [d.device for d in sim] == DEVICES
        assert [d.total_bytes for d in sim] == [24 * 2**30, 12 * 2**30]

    gen = doc["generation"]
    kv_tokens = doc["memory"]["kv_tokens"]
    assert kv_tokens == gen["prompt_tokens"] + gen["new_tokens"] - 1   # the last token is never fed
    for dev, st, mem in zip(DEVICES, plan_stages, mem_stages, strict=True):
        resident = mem["weights_bytes"] + mem["buffers_bytes"]
        assert mem["weights_bytes"] == st["weights_bytes"]
        kv_per_token = mem["kv_cache_bytes"] // kv_tokens
        assert kv_per_token * kv_tokens == mem["kv_cache_bytes"] > 0
        # load ends with every weight on its stage, no KV yet
        assert _used(by_phase["load"][-1], dev) == resident
        # prefill ends with the prompt's KV; decode's last step holds the whole cache
        assert _used(by_phase["prefill"][-1], dev) == resident + kv_per_token * gen["prompt_tokens"]
        decode_peak = max(_used(s, dev) for s in by_phase["decode"])
        assert decode_peak == resident + mem["kv_cache_bytes"] > st["weights_bytes"]
        # the peak analysis: at least the plan's weights, found in decode; the cache is gone afterwards
        peak = next(p for p in tel["peaks"]["devices"] if p["device"] == dev)
        assert peak["peak_used_bytes"] == decode_peak >= st["weights_bytes"]
        assert peak["peak_phase"] == "decode"
        assert _used(trace.snapshots[-1], dev) == resident and trace.snapshots[-1].phase is None

    assert cli(["report", str(trace_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in report["devices"] if d["source"] == "simulated"] == DEVICES
    assert {p["name"] for p in report["phases"]} == {"load", "prefill", "decode"}


def test_run_trace_csv_without_live_view(chat_folder, tmp_path, capsys):
    from vramancer.telemetry.export import read_trace

    trace_path = tmp_path / "out.csv"
    assert _run(chat_folder, "--trace", str(trace_path)) == 0
    captured = capsys.readouterr()
    assert " load | " not in captured.err                       # no live lines without --monitor
    assert f"trace written to {trace_path}" in captured.out.replace("\n", " ")
    trace = read_trace(trace_path)
    assert [p.name for p in trace.phases] == ["load", "prefill", "decode"]
    devices = {d.device for s in trace.snapshots for d in s.devices}
    assert set(DEVICES) <= devices
    assert cli(["report", str(trace_path)]) == 0
    assert "Peak memory per device" in capsys.readouterr().out


def test_run_monitor_prints_peaks(chat_folder, capsys):
    assert _run(chat_folder, "--monitor") == 0
    out = capsys.readouterr().out
    assert "Peak memory per device" in out and "Phases by peak" in out and "decode" in out


@pytest.mark.parametrize("flags, words", [
    (["--trace", "out.txt"], "--trace"),
    (["--trace", "/no/such/folder/out.json"], "does not exist"),
    (["--monitor", "--monitor-interval", "0.01"], "--monitor-interval"),
])
def test_run_monitor_bad_flags(chat_folder, capsys, flags, words):
    assert _run(chat_folder, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramancer: error:") and words in err and "Traceback" not in err


# -- the feed itself ----------------------------------------------------------------------------------
def test_load_watch_counts_weights_as_they_land(saved_models):
    """During load the feed sees each stage's weights grow, and ends at the runtime's own count."""
    from torch.nn.modules import module as torch_module

    from vramancer.runtime.loader import load
    from vramancer.runtime.telemetry_feed import StageFeed

    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    feed = StageFeed(plan)
    assert feed.simulated == [s.device for s in plan.stages]
    seen: list[int] = []

    def during(module, name, param):   # runs at each parameter the loader assigns
        seen.append(sum(d.used_bytes for d in feed()))

    with feed.watch_load(folder):
        handle = torch_module.register_module_parameter_registration_hook(during)
        try:
            model = load(str(folder), plan=plan)
        finally:
            handle.remove()
    rt = model.vramancer
    report = rt.memory_report()
    final = [s.weights_bytes + s.buffers_bytes for s in report.stages]
    assert [d.used_bytes for d in feed()] == final            # before attach: the watch's count
    assert seen == sorted(seen)                               # never goes back while loading
    assert any(0 < v < sum(final) for v in seen)              # and is seen part way
    feed.attach(rt)
    assert [d.used_bytes for d in feed()] == final            # the runtime agrees
    rt.free()


def test_load_watch_of_a_module():
    """An nn.Module split in place: the watch counts its tensors per stage from the start."""
    from vramancer.runtime.loader import load
    from vramancer.runtime.telemetry_feed import StageFeed

    module = build_model("qwen2")
    plan = make_plan(module, 2)
    feed = StageFeed(plan)
    with feed.watch_load(module):
        load(module, plan=plan)
    rt = module.vramancer
    final = [s.weights_bytes + s.buffers_bytes for s in rt.memory_report().stages]
    assert [d.used_bytes for d in feed()] == final
    assert [s.weights_bytes for s in feed.stage_bytes().stages] == [st.weights_bytes for st in plan.stages]
    rt.free()


def test_samplers_with_track_count_kv_while_held(saved_models):
    """``model.vramancer.samplers()`` inside ``vramancer.track``: KV counts while generate holds it."""
    import vramancer
    from vramancer.runtime.loader import load

    folder = saved_models["llama"]
    model = load(str(folder), plan=make_plan(folder, 2))
    rt = model.vramancer
    samplers = rt.samplers()
    assert [s.name for s in samplers][:1] == ["vramancer-stages"]
    assert any(type(s).__name__ == "HostSampler" for s in samplers)   # the CPU behind both
    resident = [s.weights_bytes + s.buffers_bytes for s in rt.memory_report().stages]
    held: list[list[int]] = []

    def step_hook(module, args, output):
        held.append([d.used_bytes for d in samplers[0].sample().devices])

    with vramancer.track(0.05, samplers=samplers) as rec:
        with rec.phase("generate"):
            h = model.register_forward_hook(step_hook)
            ids = torch.tensor([[5, 6, 7, 8, 9]])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
            h.remove()
    # the feed's hook came first: at the last forward it holds that forward's cache (5 + 4 - 1 tokens)
    report = rt.memory_report()
    assert report.kv_tokens == 8
    assert held[-1] == [r + s.kv_cache_bytes for r, s in zip(resident, report.stages, strict=True)]
    assert held[0] == [r + s.kv_cache_bytes * 5 // 8 for r, s in zip(resident, report.stages, strict=True)]
    after = rec.latest()
    assert [d.used_bytes for d in after.devices if d.source == "simulated"] == resident   # cache dropped
    assert {d.device for d in after.devices} >= set(DEVICES)
    rt.free()


def test_streamed_stages_count_on_their_compute_device(saved_models):
    """A GPU that runs streamed stages holds its own weights plus the stream slots and their buffers."""
    from vramancer.runtime.loader import load
    from vramancer.runtime.telemetry_feed import StageFeed

    folder = saved_models["llama"]
    plan = offload_plan(folder)
    feed = StageFeed(plan)
    gpu = plan.stages[0].device
    assert feed.simulated == [gpu]
    model = load(str(folder), plan=plan)
    rt = model.vramancer
    feed.attach(rt)
    report = rt.memory_report()
    slots = sum(e.buffer_bytes for e in rt.engines)
    assert slots == sum(b.buffer_bytes for b in plan.stream_buffers) > 0      # the plan's one buffer
    expected = report.stages[0].weights_bytes + sum(s.buffers_bytes for s in report.stages) + slots
    (sample,) = feed()
    assert sample.device == gpu and sample.used_bytes == expected
    assert sample.missing and sample.source == "simulated"
    rt.free()


def test_line_view_prints_phase_changes_and_one_line_a_second():
    """Sampled every 0.1 s for 3.5 s over load -> prefill -> decode: the line view shows each phase's
    first and last sample and one line a second within a phase, not 35 lines."""
    from vramancer.runtime.watch import throttle_lines
    from vramancer.telemetry.samples import Snapshot

    phases = ["load"] * 12 + ["prefill"] * 3 + ["decode"] * 20
    snaps = [Snapshot(timestamp=100.0 + 0.1 * i, phase=p) for i, p in enumerate(phases)]
    shown = [(round(s.timestamp - 100.0, 1), s.phase) for s in throttle_lines(snaps)]
    assert shown == [(0.0, "load"), (1.0, "load"), (1.1, "load"),
                     (1.2, "prefill"), (1.4, "prefill"),
                     (1.5, "decode"), (2.5, "decode"), (3.4, "decode")]
    assert list(throttle_lines([])) == []
