"""Parse device specs (docs/architecture.md): "auto", "cuda:0", "cuda:0:20GiB", "mps", "cpu", "cpu:64GiB",
"disk", "disk:500GiB", catalog GPUs ("rtx3090", "rtx3060:10GiB") and custom simulated GPUs
("mygpu:16GiB@448GBps@30TFLOPS"). Items are comma separated; two items with the same name are
two devices ("rtx3060,rtx3060" -> rtx3060#0, rtx3060#1). ``format_devices`` writes a spec back.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

from ..errors import BadInputError, DeviceSpecError
from ..units import parse_bytes
from .device import Device

__all__ = ["MAX_DEVICES", "check_backing", "format_devices", "parse_devices", "parse_item"]

# more devices than any one machine (or a plan over a small cluster) has; the planner's search grows
# with the device count, so a spec of thousands of items is refused instead of searched
MAX_DEVICES = 64
_BACKING_RE = re.compile(r"^(cuda|rocm|gpu)(?::(\d+))?$")

_REAL_GPU_RE = re.compile(r"^(cuda|rocm|gpu):(\d+)$")
_CUSTOM_RE = re.compile(
    r"^(?P<name>[A-Za-z][\w.\-]*):(?P<mem>[0-9.]+\s*[A-Za-z]*)@(?P<bw>[0-9.]+)\s*(?P<bwu>GBps|GB/s|TBps|TB/s)"
    r"@(?P<tf>[0-9.]+)\s*TFLOPS$",
    re.IGNORECASE,
)


def _size(text: str, item: str) -> int:
    try:
        n = parse_bytes(text)
    except BadInputError as e:
        raise DeviceSpecError(f"bad device {item!r}: {e}") from None
    if n <= 0:
        raise DeviceSpecError(f"bad device {item!r}: memory must be positive")
    return n


def _with_memory(dev: Device, mem: int) -> Device:
    """Override the memory available to us (``rtx3060:10GiB``, ``cuda:0:20GiB``): ``free_bytes``
    becomes ``mem``; a real device cannot offer more than it has."""
    if not dev.simulated:
        if mem > dev.total_bytes:
            raise DeviceSpecError(f"bad device {dev.id}:{mem}B: more than its {dev.total_bytes} bytes")
        return replace(dev, free_bytes=min(mem, dev.free_bytes))
    return replace(dev, free_bytes=mem, total_bytes=max(dev.total_bytes, mem))


def _catalog_device(key: str, item: str, backing: str) -> Device | None:
    from .catalog import find_gpu

    spec = find_gpu(key)
    if spec is None:
        return None
    return Device(
        id=spec.key, name=spec.name, kind="gpu", total_bytes=spec.memory_bytes, free_bytes=spec.memory_bytes,
        bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s, tflops=spec.tflops, simulated=True, backing=backing,
        torch_device=backing, link_bandwidth_bytes_per_s=spec.link_bandwidth_bytes_per_s, vendor=spec.vendor,
        catalog_key=spec.key, unified_memory=spec.unified_memory,
    )


def parse_item(item: str, backing: str = "cpu", real: list[Device] | None = None) -> list[Device]:
    """One spec item -> devices (ids not yet made unique). ``real``: the machine's real devices,
    looked up lazily (only when an item names one)."""
    raw = item
    item = item.strip()
    if not item:
        raise DeviceSpecError("empty device in spec (two commas in a row?)")
    low = item.lower()

    def reals() -> list[Device]:
        nonlocal real
        if real is None:
            from .inventory import gpu_devices

            real = gpu_devices()
        return real

    if low == "auto":
        from .inventory import real_devices

        return real_devices()

    m = _CUSTOM_RE.match(item)
    if m:
        try:
            bw = float(m["bw"]) * (1e12 if m["bwu"].lower().startswith("tb") else 1e9)
            tf = float(m["tf"])
        except ValueError:
            raise DeviceSpecError(f"bad device {raw!r}: bandwidth and TFLOPS must be numbers") from None
        mem = _size(m["mem"], raw)
        if not (0 < bw < math.inf and 0 < tf < math.inf):
            raise DeviceSpecError(f"bad device {raw!r}: bandwidth and TFLOPS must be positive, finite numbers")
        return [Device(id=m["name"], name=m["name"], kind="gpu", total_bytes=mem, free_bytes=mem,
                       bandwidth_bytes_per_s=bw, tflops=tf, simulated=True, backing=backing,
                       torch_device=backing)]

    # split off an optional ":SIZE" suffix (the last colon-separated part that parses as a size)
    base, mem = low, None
    if ":" in low and not _REAL_GPU_RE.match(low):
        base, suffix = low.rsplit(":", 1)
        mem = _size(suffix, raw)

    if base in ("cpu", "ram", "host"):
        from .inventory import host_device

        return [host_device(total_bytes=mem)]
    if base == "disk":
        from .inventory import disk_device

        return [disk_device(total_bytes=mem)]
    if base == "mps" or _REAL_GPU_RE.match(base):
        wanted = "mps" if base == "mps" else f"cuda:{_REAL_GPU_RE.match(base).group(2)}"
        found = [d for d in reals() if d.id == wanted]
        if not found:
            have = ", ".join(d.id for d in reals()) or "none"
            raise DeviceSpecError(f"no device {wanted} on this machine (real GPUs here: {have}); "
                                  f"simulate one with a catalog name such as rtx3090")
        return [_with_memory(found[0], mem) if mem else found[0]]

    dev = _catalog_device(base, raw, backing)
    if dev is None:
        raise DeviceSpecError(
            f"unknown device {raw.strip()!r}: not a catalog GPU (see `vramancer devices --catalog`), "
            f"not cuda:N / mps / cpu / disk, not NAME:16GiB@448GBps@30TFLOPS")
    return [_with_memory(dev, mem) if mem else dev]


def parse_devices(spec: str | list | tuple | None = "auto", backing: str = "cpu") -> list[Device]:
    """Parse a spec into devices with unique ids. A list of Devices passes through (ids checked)."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, (list, tuple)):
        if all(isinstance(d, Device) for d in spec):
            devices = list(spec)
            _check(devices)
            return devices
        spec = ",".join(str(s) for s in spec)
    if not isinstance(spec, str):
        raise DeviceSpecError(f"device spec must be a string like 'rtx3090,rtx3060', not {type(spec).__name__}")
    if not spec.strip():
        raise DeviceSpecError("no devices given (try --devices auto, or rtx3090,rtx3060)")
    items = spec.split(",")
    if len(items) > MAX_DEVICES:
        raise DeviceSpecError(f"{len(items)} devices given; a plan takes at most {MAX_DEVICES}")
    devices: list[Device] = []
    real = None
    for item in items:
        devices.extend(parse_item(item, backing=backing, real=real))
    # unique ids: simulated GPUs are numbered per name (rtx3060#0, rtx3060#1)
    counts: dict[str, int] = {}
    out = []
    for d in devices:
        if d.simulated and d.kind == "gpu":
            n = counts.get(d.id, 0)
            counts[d.id] = n + 1
            d = replace(d, id=f"{d.id}#{n}")
        out.append(d)
    _check(out)
    return out


def check_backing(backing: str | None, real: list[Device] | None = None) -> str:
    """The torch device behind simulated GPUs, checked: "cpu", or a real GPU of this machine
    ("cuda:0"; "cuda" means cuda:0; "mps"). DeviceSpecError naming the GPUs here otherwise, so a
    run fails before it loads anything, not when it first moves a tensor."""
    if backing is None:
        return "cpu"
    if not isinstance(backing, str):
        raise DeviceSpecError(f"--backing must be a device name like cpu or cuda:0, not {backing!r:.40}")
    low = backing.strip().lower()
    if low == "cpu":
        return "cpu"
    m = _BACKING_RE.match(low)
    if m is None and low != "mps":
        raise DeviceSpecError(f"--backing {backing!r}: not cpu, cuda:N or mps")
    wanted = "mps" if low == "mps" else f"cuda:{m.group(2) or 0}"
    if real is None:
        from .inventory import gpu_devices

        real = gpu_devices()
    if not any(d.id == wanted or d.torch_device == wanted for d in real):
        have = ", ".join(d.id for d in real) or "none"
        raise DeviceSpecError(f"--backing {backing}: no device {wanted} on this machine (real GPUs here: {have})")
    return wanted


def _check(devices: list[Device]) -> None:
    if len(devices) > MAX_DEVICES:
        raise DeviceSpecError(f"{len(devices)} devices given; a plan takes at most {MAX_DEVICES}")
    if not devices:
        raise DeviceSpecError("no devices found (no GPU, and cpu/disk not asked for)")
    seen = set()
    for d in devices:
        if d.id in seen:
            raise DeviceSpecError(f"device {d.id} given twice")
        seen.add(d.id)


def format_devices(devices: list[Device]) -> str:
    """A spec string that parses back to the same simulated devices (round trip)."""
    items = []
    for d in devices:
        if d.kind == "cpu":
            items.append(f"cpu:{d.total_bytes}B" if d.simulated else "cpu")
        elif d.kind == "disk":
            items.append(f"disk:{d.total_bytes}B" if d.simulated else "disk")
        elif not d.simulated:
            items.append(d.id if d.free_bytes == d.total_bytes else f"{d.id}:{d.free_bytes}B")
        elif d.catalog_key:
            items.append(f"{d.catalog_key}:{d.free_bytes}B")
        else:
            items.append(f"{d.name}:{d.free_bytes}B@{d.bandwidth_bytes_per_s / 1e9:g}GBps@{d.tflops:g}TFLOPS")
    return ",".join(items)
