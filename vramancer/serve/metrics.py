"""Prometheus metrics of the server, in their own CollectorRegistry (never the global one,
so two servers in one process, as in tests, do not collide)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .engine import EngineStats
    from .kv import StageKV

__all__ = ["ServeMetrics", "ENDPOINTS"]

# Label values for the requests counter; any other path counts as "other", so random paths
# cannot blow up the number of series.
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vramancer_serve_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("vramancer_serve_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("vramancer_serve_completion_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "vramancer_serve_time_to_first_token_seconds", "time from request arrival to its first token",
            buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            "vramancer_serve_inter_token_latency_seconds", "time between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("vramancer_serve_queue_depth", "requests waiting for admission", registry=r)
        self.prefilling = Gauge("vramancer_serve_prefilling_requests", "requests being prefilled", registry=r)
        self.running = Gauge("vramancer_serve_running_batch_size", "rows in the running decode batch",
                             registry=r)
        self.kv_bytes = Gauge("vramancer_serve_kv_cache_bytes", "bytes of KV cache tensors in use",
                              ["stage", "device"], registry=r)
        self.kv_reserved_bytes = Gauge(
            "vramancer_serve_kv_cache_reserved_bytes",
            "KV bytes admitted requests may grow to (padded batch x longest prompt + max_tokens)",
            ["stage", "device"], registry=r)
        self.kv_budget_bytes = Gauge("vramancer_serve_kv_cache_budget_bytes",
                                     "KV bytes the plan reserved per stage", ["stage", "device"], registry=r)

    def add_telemetry(self, recorder: Any) -> None:
        """Also export a telemetry Recorder's device gauges (VRAM used, utilization, ...)."""
        from ..telemetry.prometheus import RecorderCollector

        self.registry.register(RecorderCollector(recorder))

    def set_stages(self, stages: "list[StageKV]") -> None:
        for st in stages:
            self.kv_budget_bytes.labels(str(st.index), st.device).set(st.budget_bytes)

    def publish_engine(self, stats: "EngineStats", stages: "list[StageKV]") -> None:
        self.queue_depth.set(stats.queued)
        self.prefilling.set(stats.prefilling)
        self.running.set(stats.running)
        for st, used, reserved in zip(stages, stats.kv_bytes_by_stage, stats.reserved_bytes_by_stage):
            self.kv_bytes.labels(str(st.index), st.device).set(used)
            self.kv_reserved_bytes.labels(str(st.index), st.device).set(reserved)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
