"""Telemetry: where the VRAM goes, live and after the fact.

    samplers/    NVML, AMD SMI, torch allocator, host RAM, simulated, replay -> Snapshot
    recorder.py  Recorder: background sampling, ring buffer, phases, marks, subscriptions, peaks
    peaks.py     peak analysis per device / process / phase (pure ``analyse`` + incremental tracker)
    export.py    CSV / JSON traces (atomic writes) and ``read_trace``
    prometheus.py  /metrics exposition (prometheus_client)
    plot.py      PNG chart of a trace (matplotlib)
    commands.py  ``vramancer report``

Nothing here is imported by ``import vramancer``; ``vramancer.track`` imports the recorder.
"""
__all__: list[str] = []
