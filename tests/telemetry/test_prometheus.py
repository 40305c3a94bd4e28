"""/metrics text from a Recorder, parsed back with prometheus_client's own parser."""
from __future__ import annotations

import os

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from vramancer.devices.nvml import NvmlBackend
from vramancer.telemetry.prometheus import CONTENT_TYPE, METRICS, RecorderCollector, make_registry, render_metrics
from vramancer.telemetry.recorder import Recorder
from vramancer.telemetry.samplers import NvmlSampler
from vramancer.telemetry.samples import DeviceSample

from . import fake_nvml as F
from .conftest import ListSampler
from .fake_nvml import GiB, MiB


def _families(recorder) -> dict[str, list]:
    text = render_metrics(recorder).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples, **labels) -> float:
    hits = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (labels, samples)
    return hits[0]


def _recorder():
    fake = F.lost_mid_run(after=2, index=2)
    fake.gpus[1].power_mw = None                         # power not supported on the 3060
    host = DeviceSample("cpu", "Host RAM", "host", used_bytes=5 * GiB, total_bytes=64 * GiB)
    torch_dev = DeviceSample("torch:cuda:0", "torch allocator on RTX 3090", "torch", used_bytes=3 * GiB,
                             reserved_bytes=4 * GiB, peak_bytes=6 * GiB, total_bytes=24 * GiB)
    extra = ListSampler([([host, torch_dev], [])])
    rec = Recorder(samplers=[NvmlSampler(NvmlBackend(module=fake)), extra], interval=1)
    return rec, fake


def test_metrics_parse_back_with_dcgm_like_names_and_exact_values():
    rec, fake = _recorder()
    fake.gpus[0].used_bytes = 20 * GiB
    rec.sample_once()                                    # the peak of cuda:0
    fake.gpus[0].used_bytes = 12 * GiB
    with rec.phase("decode"):
        rec.sample_once()
        rec.sample_once()                                # cuda:2 is lost on this one
    fam = _families(rec)

    g0 = dict(device="cuda:0", name="NVIDIA GeForce RTX 3090", uuid="GPU-00000000-3090-0000-0000-000000000000",
              source="nvml")
    assert _value(fam["vramancer_gpu_memory_used_bytes"], **g0) == 12 * GiB
    assert _value(fam["vramancer_gpu_memory_total_bytes"], **g0) == 24 * GiB
    assert _value(fam["vramancer_gpu_memory_free_bytes"], **g0) == 12 * GiB
    assert _value(fam["vramancer_gpu_memory_reserved_bytes"], **g0) == 300 * MiB
    assert _value(fam["vramancer_gpu_memory_peak_bytes"], **g0) == 20 * GiB
    assert _value(fam["vramancer_gpu_utilization_ratio"], **g0) == 0.87
    assert _value(fam["vramancer_gpu_power_watts"], **g0) == 310.5
    assert _value(fam["vramancer_gpu_temperature_celsius"], **g0) == 71
    assert _value(fam["vramancer_gpu_sm_clock_hertz"], **g0) == 1.5e9
    assert _value(fam["vramancer_gpu_memory_clock_hertz"], **g0) == 9.5e9
    assert _value(fam["vramancer_gpu_lost"], **g0) == 0

    # a field the driver does not support is left out, not exported as 0
    assert [s for s in fam["vramancer_gpu_power_watts"] if s.labels["device"] == "cuda:1"] == []
    assert _value(fam["vramancer_gpu_memory_used_bytes"], device="cuda:1") == 5 * GiB
    # the lost GPU: lost = 1 and no memory series
    assert _value(fam["vramancer_gpu_lost"], device="cuda:2") == 1
    assert [s for s in fam["vramancer_gpu_memory_used_bytes"] if s.labels["device"] == "cuda:2"] == []

    procs = fam["vramancer_process_gpu_memory_used_bytes"]
    assert _value(procs, device="cuda:0", pid=str(os.getpid())) == 9 * GiB
    assert _value(procs, device="cuda:1", pid=str(os.getpid())) == 4 * GiB

    assert _value(fam["vramancer_torch_memory_allocated_bytes"], device="torch:cuda:0") == 3 * GiB
    assert _value(fam["vramancer_torch_memory_reserved_bytes"], device="torch:cuda:0") == 4 * GiB
    assert _value(fam["vramancer_torch_memory_peak_allocated_bytes"], device="torch:cuda:0") == 6 * GiB
    assert _value(fam["vramancer_host_memory_used_bytes"], device="cpu") == 5 * GiB
    assert _value(fam["vramancer_host_memory_total_bytes"], device="cpu") == 64 * GiB
    # host RAM and the allocator are not GPUs
    assert {s.labels["device"] for s in fam["vramancer_gpu_memory_used_bytes"]} == {"cuda:0", "cuda:1"}
    assert _value(fam["vramancer_phase_info"], phase="decode") == 1
    assert _value(fam["vramancer_last_sample_timestamp_seconds"]) == rec.latest().timestamp


def test_help_texts_name_the_dcgm_fields():
    rec, _ = _recorder()
    rec.sample_once()
    text = render_metrics(rec).decode()
    for dcgm in ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_TOTAL", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED",
                 "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_SM_CLOCK"):
        assert dcgm in text
    # the module docstring documents every metric name the collector can produce
    import vramancer.telemetry.prometheus as mod

    names = set(METRICS) | {f.name for f in text_string_to_metric_families(text)}
    for name in names:
        assert name in mod.__doc__, name


def test_empty_recorder_exports_nothing_and_the_global_registry_is_untouched():
    rec = Recorder(samplers=[], interval=1)
    assert render_metrics(rec) == b""
    assert "vramancer_gpu_memory_used_bytes" not in {m.name for m in REGISTRY.collect()}
    reg = make_registry(rec)
    assert reg is not REGISTRY
    assert isinstance(list(reg._collector_to_names)[0], RecorderCollector)
    assert CONTENT_TYPE.startswith("text/plain")
