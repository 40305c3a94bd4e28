"""Run the server: build engine + app around a loaded model, serve it with uvicorn, in the
foreground (the CLI) or on a background thread (tests, benchmarks, notebooks).

    with ServerThread(model, tokenizer, context_tokens=512) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._net import BackgroundServer, bind_socket, is_loopback, serve_foreground
from ..errors import BadInputError
from .app import ServerConfig, create_app
from .engine import Engine
from .metrics import ServeMetrics

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.plan import Plan

__all__ = ["Server", "build_server", "ServerThread", "serve_forever", "bind_socket", "is_loopback",
           "check_bind"]


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model beyond this machine without an API key (unless insecure)."""
    if not is_loopback(host) and not api_key and not insecure:
        raise BadInputError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could use the "
            f"model; pass --api-key KEY (or VRAMANCER_API_KEY), or --insecure if you mean it")


@dataclass
class Server:
    engine: Engine
    metrics: ServeMetrics
    config: ServerConfig
    app: Any


def build_server(model: Any, tokenizer: Any, *, model_name: str = "model", context_tokens: int = 4096,
                 max_batch: int = 16, prefill_chunk_tokens: int = 512, plan: Plan | None = None,
                 kv_budget_bytes: int | None = None, api_key: str | None = None,
                 max_tokens_limit: int = 4096, max_body_bytes: int = 4 * 2**20,
                 pipeline_lanes: int | None = None, min_rows_per_lane: int = 8,
                 recorder: Any = None) -> Server:
    """Engine (not started) + metrics + FastAPI app for ``model``. ``recorder``: a telemetry
    Recorder whose device gauges /metrics exports too."""
    engine = Engine(model, tokenizer, context_tokens=context_tokens, max_batch=max_batch,
                    prefill_chunk_tokens=prefill_chunk_tokens, plan=plan, kv_budget_bytes=kv_budget_bytes,
                    pipeline_lanes=pipeline_lanes, min_rows_per_lane=min_rows_per_lane)
    metrics = ServeMetrics(engine)
    if recorder is not None:
        metrics.add_telemetry(recorder)
    config = ServerConfig(model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                          max_tokens_limit=max_tokens_limit)
    return Server(engine, metrics, config, create_app(engine, config, metrics))


def serve_forever(server: Server, sock: socket.socket, log_level: str = "info") -> None:
    """Start the engine and serve on ``sock`` until interrupted (Ctrl-C, SIGTERM)."""
    server.engine.start()
    try:
        serve_foreground(server.app, sock, log_level=log_level)
    finally:
        server.engine.stop()


class ServerThread:
    """The server on 127.0.0.1, a free port, in a background thread; a context manager.
    ``url``: http://127.0.0.1:PORT. Extra keyword arguments go to ``build_server``."""

    def __init__(self, model: Any, tokenizer: Any, *, start_timeout_s: float = 30.0, **kwargs: Any) -> None:
        self.server = build_server(model, tokenizer, **kwargs)
        self.engine, self.metrics = self.server.engine, self.server.metrics
        self._http = BackgroundServer(self.server.app, bind_socket("127.0.0.1", 0), name="vramancer-http")
        self.port, self.url = self._http.port, self._http.url
        self._start_timeout_s = start_timeout_s

    def start(self) -> ServerThread:
        self.engine.start()
        try:
            self._http.start(self._start_timeout_s)
        except Exception:
            self.engine.stop()
            raise
        return self

    def stop(self) -> None:
        self._http.stop()
        self.engine.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
