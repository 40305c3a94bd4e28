"""Run as a script: load a folder split over two simulated GPUs and print host memory figures as JSON.

    python -m tests.runtime.peak_load FOLDER DTYPE

Prints {"base", "peak", "final", "weights", "largest"} in bytes: resident set size before the load
(after imports, planning and building the model class once), the peak while loading (sampled every
0.2 ms and from getrusage), after it, the weights the model holds, and its largest tensor as stored.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import threading
import time


def main() -> None:
    folder, dtype = sys.argv[1], sys.argv[2]
    import psutil
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
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = load(folder, plan=plan)
    stop.set()
    t.join()
    gc.collect()
    final = proc.memory_info().rss
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:
        peak[0] = max(peak[0], max_after)
    weights = model.vramancer.memory_report().weights_bytes
    print(json.dumps({"base": base, "peak": peak[0], "final": final, "weights": weights, "largest": largest}))


if __name__ == "__main__":
    main()
