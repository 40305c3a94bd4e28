"""Where the live views get their data: a Recorder built from ``--devices`` / ``--interval`` /
``--replay``, and the trace export the views offer.

``--devices auto`` (the default) samples every real device through the telemetry samplers.
Simulated specs ("rtx3090,rtx3060") are sampled by a SimulatedSampler that reports each
simulated device's capacity with 0 bytes used (nothing runs on a simulated device outside a
split model run in this process), so the views show the devices even on a machine without a
GPU. ``--replay TRACE`` plays a recorded trace (CSV or JSON) back instead, at ``--speed``.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadInputError, DeviceSpecError

__all__ = [
    "add_source_arguments",
    "open_recorder",
    "recorder_from_args",
    "build_samplers",
    "simulated_source",
    "export_trace",
    "export_format",
    "poll_feed",
    "MIN_INTERVAL_S",
]

MIN_INTERVAL_S = 0.05


def add_source_arguments(parser: argparse.ArgumentParser, interval_s: float = 1.0) -> None:
    parser.add_argument("-d", "--devices", default="auto", metavar="SPEC",
                        help="devices to watch: auto (every real device, the default), cuda:0, or "
                             "simulated catalog GPUs like rtx3090,rtx3060")
    parser.add_argument("--interval", type=float, default=interval_s, metavar="S",
                        help=f"seconds between samples (default {interval_s:g}, at least {MIN_INTERVAL_S:g})")
    parser.add_argument("--replay", metavar="TRACE", default=None,
                        help="play back a recorded trace (.csv or .json from --export / vramancer.track) "
                             "instead of sampling devices")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="replay speed: 2 plays twice as fast (default 1)")


def check_interval(interval_s: float) -> float:
    if not (interval_s >= MIN_INTERVAL_S):   # also refuses NaN
        raise BadInputError(f"--interval must be at least {MIN_INTERVAL_S:g} s, got {interval_s:g}")
    return float(interval_s)


def simulated_source(devices: list) -> Callable[[], list]:
    """A SimulatedSampler source for simulated ``Device`` objects: capacity from the spec and
    0 bytes used (a split run accounts its own bytes through its own SimulatedSampler)."""
    from ..telemetry.samples import DeviceSample

    def source() -> list[DeviceSample]:
        return [
            DeviceSample(device=d.id, name=d.name, source="simulated", used_bytes=0,
                         total_bytes=d.total_bytes,
                         missing=["utilization_pct", "power_w", "temperature_c",
                                  "sm_clock_mhz", "mem_clock_mhz"])
            for d in devices
        ]

    return source


def build_samplers(spec: str | None) -> list:
    """Samplers for a ``--devices`` spec: real devices through ``default_samplers``, simulated
    ones through one SimulatedSampler."""
    from ..telemetry.samplers import SimulatedSampler, default_samplers

    spec = (spec or "auto").strip()
    if spec == "auto":
        return list(default_samplers())
    try:
        from ..devices.spec import parse_devices
    except ModuleNotFoundError as e:  # this build has no spec parser: only "auto" works
        raise DeviceSpecError(f"--devices {spec!r} needs the device spec parser, which this build "
                              f"lacks ({e.name}); use --devices auto") from None
    devices = parse_devices(spec)
    simulated = [d for d in devices if getattr(d, "simulated", False)]
    real = [d for d in devices if not getattr(d, "simulated", False)]
    samplers: list = []
    if real:
        samplers.extend(default_samplers(real))
    if simulated:
        samplers.append(SimulatedSampler(simulated_source(simulated)))
    return samplers


def open_recorder(spec: str | None = "auto", interval_s: float = 1.0, samplers: list | None = None,
                  capacity: int = 36000, replay: str | None = None, speed: float = 1.0) -> Any:
    """A Recorder (not started) over the samplers for ``spec`` (or the ``samplers`` given, or a
    replay of the trace ``replay``)."""
    from ..telemetry.recorder import Recorder

    interval_s = check_interval(interval_s)
    if samplers is None:
        if replay is not None:
            from ..telemetry.samplers import ReplaySampler

            if not (speed > 0):
                raise BadInputError(f"--speed must be positive, got {speed:g}")
            samplers = [ReplaySampler(replay, speed=speed)]
        else:
            samplers = build_samplers(spec)
    return Recorder(samplers=samplers, interval=interval_s, capacity=capacity)


def recorder_from_args(args: argparse.Namespace) -> Any:
    """The Recorder for the flags of ``add_source_arguments``."""
    if args.replay is not None and args.devices not in (None, "auto"):
        raise BadInputError("--replay and --devices do not go together: a replay shows the recorded devices")
    return open_recorder(args.devices, args.interval, replay=args.replay, speed=args.speed)


def poll_feed(subscription: Any, take: Callable[[Any], None], show: Callable[[Any], None],
              paused: bool = False) -> int:
    """A live view's tick: ``take`` every snapshot queued on ``subscription`` (history), then
    ``show`` the newest unless ``paused``. Returns how many came in (0 once unsubscribed)."""
    if subscription is None:
        return 0
    new = subscription.drain()
    for snap in new:
        take(snap)
    if new and not paused:
        show(new[-1])
    return len(new)


def export_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".json"):
        return suffix[1:]
    raise BadInputError(f"--export {str(path)!r}: the file name must end in .csv or .json")


def export_trace(recorder: Any, path: str | Path | None, directory: str | Path = ".") -> list[Path]:
    """Write the recorder's trace to ``path`` (.csv or .json); with no path, to a timestamped
    pair ``vramancer-trace-YYYYmmdd-HHMMSS.csv`` / ``.json`` in ``directory``. Returns the files."""
    if path is not None:
        path = Path(path)
        targets = [(path, export_format(path))]
    else:
        stem = Path(directory) / time.strftime("vramancer-trace-%Y%m%d-%H%M%S")
        targets = [(stem.with_suffix(".csv"), "csv"), (stem.with_suffix(".json"), "json")]
    written = []
    for target, fmt in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            recorder.to_csv(target)
        else:
            recorder.to_json(target)
        written.append(target)
    return written
