"""Prometheus exposition of a Recorder's latest snapshot (``prometheus_client``; a custom
collector on a fresh ``CollectorRegistry``, never the global one).

Metric names follow Prometheus conventions (base units, ``_bytes`` / ``_watts`` / ``_celsius`` /
``_hertz`` / ``_ratio``) and map to DCGM's fields where DCGM has one:

| metric | labels | DCGM field / meaning |
|---|---|---|
| vramancer_gpu_memory_used_bytes | device, name, uuid, source | DCGM_FI_DEV_FB_USED (MiB there) |
| vramancer_gpu_memory_free_bytes | device, name, uuid, source | DCGM_FI_DEV_FB_FREE |
| vramancer_gpu_memory_total_bytes | device, name, uuid, source | DCGM_FI_DEV_FB_TOTAL |
| vramancer_gpu_memory_reserved_bytes | device, name, uuid, source | DCGM_FI_DEV_FB_RESERVED |
| vramancer_gpu_memory_peak_bytes | device, name, uuid, source | peak used since the recorder started (no DCGM) |
| vramancer_gpu_utilization_ratio | device, name, uuid, source | DCGM_FI_DEV_GPU_UTIL / 100 |
| vramancer_gpu_power_watts | device, name, uuid, source | DCGM_FI_DEV_POWER_USAGE |
| vramancer_gpu_temperature_celsius | device, name, uuid, source | DCGM_FI_DEV_GPU_TEMP |
| vramancer_gpu_sm_clock_hertz | device, name, uuid, source | DCGM_FI_DEV_SM_CLOCK (MHz there) |
| vramancer_gpu_memory_clock_hertz | device, name, uuid, source | DCGM_FI_DEV_MEM_CLOCK (MHz there) |
| vramancer_gpu_lost | device, name, uuid, source | 1 when NVML said NVML_ERROR_GPU_IS_LOST (no DCGM field) |
| vramancer_process_gpu_memory_used_bytes | device, pid, process | as nvidia-smi --query-compute-apps=used_memory |
| vramancer_torch_memory_allocated_bytes | device, name, uuid | torch.cuda.memory_allocated (this process) |
| vramancer_torch_memory_reserved_bytes | device, name, uuid | torch.cuda.memory_reserved |
| vramancer_torch_memory_peak_allocated_bytes | device, name, uuid | torch.cuda.max_memory_allocated |
| vramancer_host_memory_used_bytes | device | host RAM in use (total - available) |
| vramancer_host_memory_total_bytes | device | host RAM |
| vramancer_phase_info | phase | 1 for the innermost phase active at the last sample |
| vramancer_last_sample_timestamp_seconds |  | when the last sample was taken |

``source`` is the sampler: nvml, amdsmi, simulated, replay. A field a device does not report is
left out of that device's series (never exported as 0 or NaN).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .samples import DeviceSample

__all__ = ["RecorderCollector", "render_metrics", "make_registry", "CONTENT_TYPE", "METRICS"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_GPU_LABELS = ["device", "name", "uuid", "source"]
_TORCH_LABELS = ["device", "name", "uuid"]

# name -> (help, DeviceSample attribute or callable, scale)
METRICS: dict[str, tuple[str, Any, float]] = {
    "vramancer_gpu_memory_used_bytes": ("Device memory in use, bytes (DCGM_FI_DEV_FB_USED).", "used_bytes", 1.0),
    "vramancer_gpu_memory_free_bytes": ("Device memory free, bytes (DCGM_FI_DEV_FB_FREE).", "free_bytes", 1.0),
    "vramancer_gpu_memory_total_bytes": ("Device memory size, bytes (DCGM_FI_DEV_FB_TOTAL).", "total_bytes", 1.0),
    "vramancer_gpu_memory_reserved_bytes": ("Device memory reserved by the driver, bytes (DCGM_FI_DEV_FB_RESERVED).",
                                            "reserved_bytes", 1.0),
    "vramancer_gpu_utilization_ratio": ("GPU busy fraction 0..1 (DCGM_FI_DEV_GPU_UTIL / 100).", "utilization_pct",
                                        0.01),
    "vramancer_gpu_power_watts": ("Board power draw, watts (DCGM_FI_DEV_POWER_USAGE).", "power_w", 1.0),
    "vramancer_gpu_temperature_celsius": ("GPU temperature, degrees Celsius (DCGM_FI_DEV_GPU_TEMP).",
                                          "temperature_c", 1.0),
    "vramancer_gpu_sm_clock_hertz": ("SM clock, hertz (DCGM_FI_DEV_SM_CLOCK in MHz).", "sm_clock_mhz", 1e6),
    "vramancer_gpu_memory_clock_hertz": ("Memory clock, hertz (DCGM_FI_DEV_MEM_CLOCK in MHz).", "mem_clock_mhz", 1e6),
}


def _gauge(name: str, help_text: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=labels)


class RecorderCollector(Collector):
    """Collects the latest snapshot of ``recorder`` (and its running peaks) on every scrape."""

    def __init__(self, recorder: Any):
        self.recorder = recorder

    def describe(self) -> list:
        return []     # names depend on what was sampled; skip describe-at-register

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.recorder.latest()
        if snap is None:
            return
        gpu = {name: _gauge(name, help_text, _GPU_LABELS) for name, (help_text, _, _) in METRICS.items()}
        peak = _gauge("vramancer_gpu_memory_peak_bytes",
                      "Peak device memory in use since the recorder started, bytes.", _GPU_LABELS)
        lost = _gauge("vramancer_gpu_lost", "1 when the GPU was lost (NVML_ERROR_GPU_IS_LOST), else 0.", _GPU_LABELS)
        proc = _gauge("vramancer_process_gpu_memory_used_bytes",
                      "Device memory a process holds, bytes (nvidia-smi --query-compute-apps=used_memory).",
                      ["device", "pid", "process"])
        t_alloc = _gauge("vramancer_torch_memory_allocated_bytes",
                         "torch allocator: bytes allocated by this process (torch.cuda.memory_allocated).",
                         _TORCH_LABELS)
        t_res = _gauge("vramancer_torch_memory_reserved_bytes",
                       "torch allocator: bytes reserved by this process (torch.cuda.memory_reserved).", _TORCH_LABELS)
        t_peak = _gauge("vramancer_torch_memory_peak_allocated_bytes",
                        "torch allocator: peak bytes allocated (torch.cuda.max_memory_allocated).", _TORCH_LABELS)
        h_used = _gauge("vramancer_host_memory_used_bytes", "Host RAM in use (total - available), bytes.", ["device"])
        h_total = _gauge("vramancer_host_memory_total_bytes", "Host RAM size, bytes.", ["device"])
        for d in snap.devices:
            if d.source == "host":
                if d.used_bytes is not None:
                    h_used.add_metric([d.device], float(d.used_bytes))
                if d.total_bytes is not None:
                    h_total.add_metric([d.device], float(d.total_bytes))
            elif d.source == "torch":
                labels = [d.device, d.name or "", d.uuid or ""]
                for fam, value in ((t_alloc, d.used_bytes), (t_res, d.reserved_bytes), (t_peak, d.peak_bytes)):
                    if value is not None:
                        fam.add_metric(labels, float(value))
            else:
                self._gpu(d, gpu, peak, lost)
        for p in snap.processes:
            if p.used_bytes is not None:
                proc.add_metric([p.device, str(p.pid), p.name or ""], float(p.used_bytes))
        yield from gpu.values()
        yield from (peak, lost, proc, t_alloc, t_res, t_peak, h_used, h_total)
        phase = _gauge("vramancer_phase_info", "1 for the innermost phase active at the last sample.", ["phase"])
        if snap.phase:
            phase.add_metric([snap.phase], 1.0)
        yield phase
        ts = GaugeMetricFamily("vramancer_last_sample_timestamp_seconds", "When the last sample was taken.",
                               value=float(snap.timestamp))
        yield ts

    def _gpu(self, d: DeviceSample, gpu: dict, peak: GaugeMetricFamily, lost: GaugeMetricFamily) -> None:
        labels = [d.device, d.name or "", d.uuid or "", d.source or ""]
        lost.add_metric(labels, 1.0 if d.lost else 0.0)
        if d.lost:
            return
        for name, (_, attr, scale) in METRICS.items():
            value = getattr(d, attr)
            if value is not None:
                gpu[name].add_metric(labels, float(value) * scale)
        p = self.recorder.device_peak_bytes(d.device) if hasattr(self.recorder, "device_peak_bytes") else None
        if p is not None:
            peak.add_metric(labels, float(p))


def make_registry(recorder: Any) -> CollectorRegistry:
    """A fresh registry holding one RecorderCollector over ``recorder``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RecorderCollector(recorder))
    return registry


def render_metrics(recorder: Any) -> bytes:
    """The Prometheus text exposition of ``recorder``'s latest snapshot."""
    return generate_latest(make_registry(recorder))
