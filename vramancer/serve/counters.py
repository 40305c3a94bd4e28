"""What the engine counts while it runs: tokens in and out, time to first token and between
tokens. The scheduler thread writes; anyone reads a consistent ``snapshot()`` (the /metrics
collector when Prometheus scrapes, benchmarks, tests). No Prometheus import here: the engine
knows nothing of who reads its figures."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

__all__ = ["LATENCY_BUCKETS_S", "HistogramSnapshot", "LatencyHistogram", "CountersSnapshot", "EngineCounters"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """``counts[i]``: observations in (bounds_s[i-1], bounds_s[i]]; the last entry counts those
    above every bound. ``sum_s``: the sum of all observations."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +inf last: Prometheus's ``le`` buckets."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds_s, float("inf")), self.counts):
            acc += n
            out.append((bound, acc))
        return out


class LatencyHistogram:
    """Seconds into fixed buckets (not thread-safe on its own: ``EngineCounters`` locks)."""

    def __init__(self, bounds_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds_s = tuple(bounds_s)
        self._counts = [0] * (len(self.bounds_s) + 1)
        self._sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds_s, seconds)] += 1
        self._sum_s += seconds

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds_s, tuple(self._counts), self._sum_s)


@dataclass(frozen=True)
class CountersSnapshot:
    prompt_tokens: int                         # of finished requests
    completion_tokens: int                     # of finished requests
    time_to_first_token: HistogramSnapshot     # arrival -> first token, one per request that got one
    inter_token_latency: HistogramSnapshot     # between consecutive tokens of a request


class EngineCounters:
    """Totals since the engine was made, updated at each token and each finished request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._ttft = LatencyHistogram()
        self._itl = LatencyHistogram()

    def token(self, since_previous_s: float, first: bool) -> None:
        with self._lock:
            (self._ttft if first else self._itl).observe(since_previous_s)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens

    def snapshot(self) -> CountersSnapshot:
        with self._lock:
            return CountersSnapshot(self._prompt_tokens, self._completion_tokens, self._ttft.snapshot(),
                                    self._itl.snapshot())
