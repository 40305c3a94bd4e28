"""Serving the dashboard with uvicorn: a listening socket we bind ourselves (so a port that is
taken is one clear error and ``--port 0`` picks a free one), in the foreground for the CLI or
in a thread for tests and embedding."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ..._net import bind_socket, is_loopback
from ...errors import VramancerError

__all__ = ["is_loopback", "bind_socket", "ThreadedServer", "serve_forever"]

GRACEFUL_SHUTDOWN_S = 2






def _config(app: Any, log_level: str):
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _stop_streams(app: Any) -> None:
    stop = getattr(getattr(app, "state", None), "stop_event", None)
    if stop is not None:
        stop.set()


def serve_forever(app: Any, sock: socket.socket, duration_s: float | None = None,
                  log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C (uvicorn's signal handling) or ``duration_s``."""
    import uvicorn

    server = uvicorn.Server(_config(app, log_level))

    def finish() -> None:
        _stop_streams(app)          # open event streams end first, so shutdown does not wait on them
        server.should_exit = True

    timer = None
    if duration_s is not None:
        timer = threading.Timer(duration_s, finish)
        timer.daemon = True
        timer.start()
    try:
        server.run(sockets=[sock])
    finally:
        if timer is not None:
            timer.cancel()
        _stop_streams(app)
        sock.close()


class ThreadedServer:
    """``app`` served on ``host:port`` (0: a free port) in a daemon thread; ``url`` once started.

        with ThreadedServer(create_app(rec)) as server:
            httpx.get(server.url + "/api/snapshot")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(_config(app, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="vramancer-dashboard", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise VramancerError(f"the dashboard did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop_streams(self.app)
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
