"""Serving the dashboard: uvicorn on a listening socket we bind ourselves (so a port that is taken
is one clear error and ``--port 0`` picks a free one), in the foreground for the CLI or in a
thread for tests and embedding (both through vramancer/_net.py). Stopping first ends the open
event streams, so shutdown never waits on them."""
from __future__ import annotations

import socket
from typing import Any

from ..._net import BackgroundServer, bind_socket, is_loopback, serve_foreground

__all__ = ["is_loopback", "bind_socket", "ThreadedServer", "serve_forever"]


def _stop_streams(app: Any) -> None:
    stop = getattr(getattr(app, "state", None), "stop_event", None)
    if stop is not None:
        stop.set()


def serve_forever(app: Any, sock: socket.socket, duration_s: float | None = None,
                  log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C (uvicorn's signal handling) or ``duration_s``."""
    serve_foreground(app, sock, log_level=log_level, duration_s=duration_s, on_stop=lambda: _stop_streams(app))


class ThreadedServer(BackgroundServer):
    """``app`` served on ``host:port`` (0: a free port) in a daemon thread; ``url`` once started.

        with ThreadedServer(create_app(rec)) as server:
            httpx.get(server.url + "/api/snapshot")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        super().__init__(app, bind_socket(host, port), name="vramancer-dashboard", log_level=log_level,
                         on_stop=lambda: _stop_streams(app))
