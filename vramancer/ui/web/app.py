"""The web dashboard (FastAPI): a live page per device, the process table and the peaks, pushed
by server-sent events from the Recorder's subscription, plus Prometheus ``/metrics``.

Routes:
    GET /                 the page (vendored JS/CSS under /static: works offline)
    GET /api/snapshot     {"schema": 1, "snapshot": Snapshot.to_dict() | null, "peaks": PeakReport.to_dict(),
                           "devices": [id, ...], "interval_s": float, "display": view.display_dict(...)}
    GET /api/history      {"schema": 1, "snapshots": [Snapshot.to_dict(), ...]}  (?limit=N, ?since=T)
    GET /api/events       text/event-stream; event "snapshot",
                          data {"snapshot": {...}, "peaks": {...}, "display": {...}}
    GET /metrics          Prometheus text format (vramancer.telemetry.prometheus.render_metrics)

Read-only: nothing here changes the recorder. Imported only by ``vramancer dashboard`` and tests.
"""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from ..view import display_dict

__all__ = ["create_app", "STATIC_DIR", "API_SCHEMA"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_SCHEMA = 1
EVENT_WAIT_S = 0.5          # a stream checks for disconnect / shutdown at least this often


def _next_snapshot(subscription: Any, timeout_s: float) -> Any:
    try:
        return subscription.get(timeout=timeout_s)
    except queue.Empty:
        return None


def create_app(recorder: Any, *, interval_s: float | None = None, history_limit: int = 3600,
               stop_event: threading.Event | None = None) -> FastAPI:
    """The dashboard over a running ``recorder``. ``stop_event``, when set, ends open event
    streams (a server stopping sets it so that shutdown does not wait on them)."""
    stop = stop_event or threading.Event()
    app = FastAPI(title="VRAMancer dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.recorder = recorder
    app.state.stop_event = stop
    interval = float(interval_s if interval_s is not None else getattr(recorder, "interval", 1.0))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/snapshot")
    def snapshot() -> JSONResponse:
        latest = recorder.latest()
        peaks = recorder.peaks().to_dict()
        return JSONResponse({
            "schema": API_SCHEMA,
            "interval_s": interval,
            "devices": list(recorder.devices()),
            "snapshot": latest.to_dict() if latest is not None else None,
            "peaks": peaks,
            "display": display_dict(latest, peaks),
        })

    @app.get("/api/history")
    def history(limit: int = Query(600, ge=1, le=history_limit),
                since: float | None = Query(None)) -> JSONResponse:
        snaps = recorder.snapshots()
        if since is not None:
            snaps = [s for s in snaps if s.timestamp > since]
        return JSONResponse({"schema": API_SCHEMA, "interval_s": interval,
                             "snapshots": [s.to_dict() for s in snaps[-limit:]]})

    @app.get("/metrics")
    def metrics() -> Response:
        from ...telemetry.prometheus import CONTENT_TYPE, render_metrics

        return Response(render_metrics(recorder), media_type=CONTENT_TYPE)

    @app.get("/api/events")
    async def events(request: Request) -> EventSourceResponse:
        subscription = recorder.subscribe()
        shutdown = anyio.Event()        # set by sse-starlette when the server shuts down

        async def stream():
            try:
                while not (stop.is_set() or shutdown.is_set()):
                    if await request.is_disconnected():
                        break
                    snap = await anyio.to_thread.run_sync(_next_snapshot, subscription, EVENT_WAIT_S)
                    if snap is None:
                        continue
                    peaks = recorder.peaks().to_dict()     # incremental tracker: cheap per event
                    payload = {"snapshot": snap.to_dict(), "peaks": peaks, "display": display_dict(snap, peaks)}
                    yield {"event": "snapshot", "data": json.dumps(payload)}
            finally:
                subscription.close()

        # The grace period outlasts one wait for a snapshot, so the stream ends by itself and the
        # response completes instead of being cancelled mid-way.
        return EventSourceResponse(stream(), ping=15, shutdown_event=shutdown,
                                   shutdown_grace_period=EVENT_WAIT_S + 0.5)

    return app
