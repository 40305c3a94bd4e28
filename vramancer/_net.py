"""Our HTTP servers (dashboard, serve): loopback checks, a socket we bind ourselves (so a port that is
taken is one clear error before anything slow happens, and port 0 picks a free one), and uvicorn
serving an app on it in the foreground (the CLI) or in a background thread (tests, embedding)."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import VramancerError

__all__ = ["is_loopback", "bind_socket", "uvicorn_server", "serve_foreground", "BackgroundServer",
           "GRACEFUL_SHUTDOWN_S"]


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int, backlog: int = 128, inheritable: bool = True,
                error: type[VramancerError] = VramancerError) -> socket.socket:
    """A listening socket on host:port; ``error`` (one line) when it cannot be had. ``inheritable``:
    kept open across exec (uvicorn's workers take it over)."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as e:
        sock.close()
        raise error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(backlog)
    sock.set_inheritable(inheritable)
    return sock


GRACEFUL_SHUTDOWN_S = 2


def uvicorn_server(app: Any, log_level: str = "warning") -> Any:
    """One uvicorn configuration for our servers: no access log, no lifespan, open connections
    given ``GRACEFUL_SHUTDOWN_S`` to finish when stopping."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))


def serve_foreground(app: Any, sock: socket.socket, *, log_level: str = "warning", duration_s: float | None = None,
                     on_stop: Callable[[], None] | None = None) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C / SIGTERM (uvicorn's signal handling) or ``duration_s``.
    ``on_stop`` runs first when stopping (e.g. to end open event streams, which shutdown waits on)."""
    server = uvicorn_server(app, log_level)

    def finish() -> None:
        if on_stop is not None:
            on_stop()
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
        if on_stop is not None:
            on_stop()
        sock.close()


class BackgroundServer:
    """``app`` served by uvicorn on ``sock`` in a daemon thread (tests, notebooks, embedding).

        server = BackgroundServer(app, bind_socket("127.0.0.1", 0), name="vramancer-http").start()
        httpx.get(server.url + "/health"); server.stop()
    """

    def __init__(self, app: Any, sock: socket.socket, *, name: str = "vramancer-http", log_level: str = "warning",
                 on_stop: Callable[[], None] | None = None) -> None:
        self.app, self.sock, self._on_stop = app, sock, on_stop
        host, self.port = sock.getsockname()[:2]
        self.host = host
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self._server = uvicorn_server(app, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; returns once uvicorn listens (``VramancerError`` if it does not within ``timeout_s``)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise VramancerError(f"the HTTP server did not start on {self.url}")
            self._thread.join(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._on_stop is not None:
            self._on_stop()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
