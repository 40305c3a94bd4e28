"""The Device: what one memory tier can hold and how fast it reads and computes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["Device", "DeviceKind", "DEVICES_SCHEMA", "devices_to_json"]

DeviceKind = Literal["gpu", "cpu", "disk"]
DEVICES_SCHEMA = 1


@dataclass(frozen=True)
class Device:
    """One device a plan can place blocks on.

    ``id`` is unique within a device list ("cuda:0", "rtx3090#0", "cpu", "disk").
    ``torch_device`` is the real torch device the runtime uses ("cuda:0", "cpu", "mps"):
    for a simulated device it is the backing device, while bytes are accounted per ``id``.
    ``free_bytes`` is what the planner may use (before its reserve); for a simulated
    device it equals ``total_bytes`` unless the spec overrides it.
    ``link_bandwidth_bytes_per_s``: host <-> device link (PCIe / NVLink-C2C / unified memory),
    used for hops between stages and for streaming offloaded blocks.
    """

    id: str
    name: str
    kind: DeviceKind
    total_bytes: int
    free_bytes: int
    bandwidth_bytes_per_s: float
    tflops: float
    simulated: bool = False
    backing: str | None = None
    torch_device: str = "cpu"
    uuid: str | None = None
    pci_bus_id: str | None = None
    link_bandwidth_bytes_per_s: float = 25e9
    vendor: str | None = None
    catalog_key: str | None = None
    unified_memory: bool = False
    p2p_peers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def to_dict(self) -> dict:
        """The Device JSON item (`vramancer devices --json`; docs/plan-schema.md, "devices")."""
        d = asdict(self)
        d["p2p_peers"] = list(self.p2p_peers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Device:
        fields = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["p2p_peers"] = tuple(kw.get("p2p_peers") or ())
        return cls(**kw)


def devices_to_json(devices: list[Device]) -> dict:
    return {"schema": DEVICES_SCHEMA, "devices": [d.to_dict() for d in devices]}
