"""Pipeline overlap for a split model: several micro-batches ("lanes") in flight, each on a
different stage at the same moment.

Each lane runs a whole-model forward on its own thread (and, on CUDA, its own stream on every
device), so while lane 1 runs stage 0, lane 0 runs stage 1. A lock per stage, taken when a
lane enters the stage (a forward pre-hook on the stage's first module, ahead of the runtime's
own boundary hook) and dropped when it enters the next, keeps one lane per stage at a time:
the runtime's per-stage state (the memo of tensors moved across the boundary) is never shared,
and the lanes stay in pipeline order. Locks are taken in stage order, so lanes cannot deadlock.

Streams meet only at step boundaries: every lane stream waits for the scheduler's stream
before it starts, and each lane synchronizes its streams before it returns, so tensors that
cross between the scheduler and a lane (caches joined or trimmed between steps) are never
read by one stream while another reuses their memory.

Splitting a batch costs a weight read per micro-batch, so lanes pay off when a stage's step
is compute-bound (large batches), not for a few rows; ``Engine`` fills one lane up to
``min_rows_per_lane`` before opening the next. Stages that stream offloaded weights are not
lane-safe (one set of slot buffers), so ``pipeline_lanes`` refuses them.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["StagePipeline", "default_lanes"]

T = TypeVar("T")


def default_lanes(model: Any) -> int:
    """Lanes worth running: one per distinct CUDA device among the stages (1 when not split,
    on the CPU, or when a stage streams its weights)."""
    rt = getattr(model, "vramancer", None)
    if rt is None or len(rt.stages) < 2 or any(s.mode != "execute" for s in rt.stages):
        return 1
    cuda = {str(s.compute_device) for s in rt.stages if s.compute_device.type == "cuda"}
    return max(1, len(cuda))


class StagePipeline:
    """``run([f0, f1, ...])`` calls each ``f`` (one model forward each) on its own lane thread,
    overlapped stage by stage; returns their results in order."""

    def __init__(self, model: Any, lanes: int) -> None:
        import torch

        from ..errors import BadInputError

        rt = getattr(model, "vramancer", None)
        if rt is None or len(rt.stages) < 2:
            raise BadInputError("pipeline lanes need a model split into two or more stages")
        if any(s.mode != "execute" for s in rt.stages):
            raise BadInputError("pipeline lanes cannot run stages that stream offloaded weights")
        self.lanes = int(lanes)
        self._locks = [threading.Lock() for _ in rt.stages]
        self._local = threading.local()
        self._handles = [
            st.units[0][1].register_forward_pre_hook(self._enter_hook(st.index), prepend=True)
            for st in rt.stages[1:] if st.units
        ]
        self._pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="vramancer-lane")
        self._cuda_devices = sorted({s.compute_device for s in rt.stages if s.compute_device.type == "cuda"},
                                    key=str)
        self._streams = [[torch.cuda.Stream(device=d) for d in self._cuda_devices] for _ in range(self.lanes)]

    def _enter_hook(self, index: int) -> Callable:
        def hook(module: Any, args: Any) -> None:
            held = getattr(self._local, "stage", None)
            if held is None or held >= index:  # a forward outside a lane: no pipeline order to keep
                return None
            self._locks[index].acquire()
            self._locks[held].release()
            self._local.stage = index
            return None
        return hook

    def _lane(self, lane: int, fn: Callable[[], T]) -> T:
        import torch

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            for device, stream in zip(self._cuda_devices, self._streams[lane]):
                stream.wait_stream(torch.cuda.default_stream(device))
                stack.enter_context(torch.cuda.stream(stream))
            self._locks[0].acquire()
            self._local.stage = 0
            try:
                return fn()
            finally:
                self._locks[self._local.stage].release()
                self._local.stage = None
                for stream in self._streams[lane]:
                    stream.synchronize()

    def run(self, fns: list[Callable[[], T]]) -> list[T]:
        if len(fns) > self.lanes:
            raise ValueError(f"{len(fns)} micro-batches for {self.lanes} lanes")
        if len(fns) == 1:
            return [fns[0]()]
        futures = [self._pool.submit(self._lane, i, fn) for i, fn in enumerate(fns)]
        return [f.result() for f in futures]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pool.shutdown(wait=True)
