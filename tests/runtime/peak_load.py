"""Peak host memory while something runs, and a script that loads a model under it.

    python -m tests.runtime.peak_load FOLDER DTYPE

loads FOLDER split over two simulated GPUs and prints {"base", "peak", "final", "weights", "largest"}
in bytes: resident set size before the load (after imports, planning and building the model class
once), the peak while loading, after it, the weights the model holds, and its largest stored tensor.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time

__all__ = ["PeakRss"]


class PeakRss:
    """``with PeakRss() as m: ...`` -> ``m.base`` (RSS at entry), ``m.peak`` (highest RSS seen inside:
    sampled every ``interval`` s, and from getrusage when the process's lifetime peak rose)."""

    def __init__(self, interval: float = 0.0002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max_before = 0

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.base = self.peak = self.rss()
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if max_after > self._max_before:
            self.peak = max(self.peak, max_after)


def main() -> None:
    folder, dtype = sys.argv[1], sys.argv[2]
    import torch
    from transformers import AutoConfig

    import vramancer
    from vramancer.runtime.checkpoint import Checkpoint
    from vramancer.runtime.loader import build_empty_model, load

    plan = vramancer.plan(folder, devices="rtx3090,rtx3060", split=[1, 1], dtype=dtype, context=64)
    warm = build_empty_model(AutoConfig.from_pretrained(folder), getattr(torch, dtype))
    del warm
    with Checkpoint(folder) as ck:
        largest = ck.largest_tensor_bytes
    with PeakRss() as m:
        model = load(folder, plan=plan)
    gc.collect()
    weights = model.vramancer.memory_report().weights_bytes
    print(json.dumps({"base": m.base, "peak": m.peak, "final": m.rss(), "weights": weights, "largest": largest}))


if __name__ == "__main__":
    main()
