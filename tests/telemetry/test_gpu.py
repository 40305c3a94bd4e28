"""On a real NVIDIA GPU: a known 2 GiB allocation through torch shows up in the NVML samples and
as the peak, in the right phase."""
from __future__ import annotations

import pytest

from vramancer.devices.nvml import NvmlBackend, gpus
from vramancer.telemetry.recorder import Recorder
from vramancer.telemetry.samplers import NvmlSampler, TorchAllocatorSampler

GiB = 2**30
MiB = 2**20
TOLERANCE = 64 * MiB


@pytest.mark.gpu
def test_two_gib_allocation_is_seen_in_its_phase():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend = NvmlBackend()
    if not backend.available():
        pytest.skip(f"NVML unavailable: {backend.unavailable_reason}")
    torch.cuda.init()
    torch.zeros(1, device="cuda:0")                  # the CUDA context exists before the baseline
    torch.cuda.synchronize()
    base_allocated = torch.cuda.memory_allocated(0)
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")).removeprefix("GPU-")
    inventory = gpus(backend)
    matches = [g for g in inventory if g.uuid.removeprefix("GPU-") == uuid]
    if not matches and len(inventory) == 1:
        matches = inventory
    if not matches:
        pytest.skip(f"cannot tell which NVML GPU is torch's cuda:0 (uuid {uuid!r})")
    gpu = matches[0]
    device = f"cuda:{gpu.index}"

    rec = Recorder(samplers=[NvmlSampler(backend, indices=[gpu.index]), TorchAllocatorSampler()], interval=0.05)
    baseline = rec.sample_once().devices[0]
    assert baseline.device == device and baseline.used_bytes is not None
    with rec:
        with rec.phase("alloc"):
            x = torch.ones(2 * GiB, dtype=torch.uint8, device="cuda:0")     # 2 GiB, touched
            torch.cuda.synchronize()
            inside = rec.sample_once()
            sub = rec.subscribe()
            for _ in range(3):                       # let the background thread sample it too
                sub.get(timeout=10)
            sub.close()
        del x
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        after = rec.sample_once()

    nvml_inside = next(d for d in inside.devices if d.device == device)
    assert abs(nvml_inside.used_bytes - baseline.used_bytes - 2 * GiB) <= TOLERANCE
    torch_inside = next(d for d in inside.devices if d.device == "torch:cuda:0")
    assert torch_inside.used_bytes - base_allocated == 2 * GiB
    assert inside.phase == "alloc"
    nvml_after = next(d for d in after.devices if d.device == device)
    assert abs(nvml_after.used_bytes - baseline.used_bytes) <= TOLERANCE

    peak = rec.peaks().device(device)
    assert abs(peak.peak_used_bytes - baseline.used_bytes - 2 * GiB) <= TOLERANCE
    assert peak.peak_phase == "alloc"
    assert peak.headroom_bytes == peak.total_bytes - peak.peak_used_bytes
    (alloc,) = [p for p in rec.phases() if p.name == "alloc"]
    assert alloc.start <= peak.peak_timestamp <= alloc.end
    assert rec.peaks().phase("alloc").peak_used_bytes == peak.peak_used_bytes
