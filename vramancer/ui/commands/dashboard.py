"""``vramancer dashboard``: a live VRAM web page with Prometheus /metrics, served by uvicorn.

    vramancer dashboard [--host 127.0.0.1] [--port 8765] [--devices SPEC] [--interval S]
                        [--duration S] [--insecure]

Binds 127.0.0.1 by default. The data is read-only telemetry, but it names processes and
devices: serving on another address needs --insecure, and prints a warning.
Routes: see vramancer/ui/web/app.py (/, /api/snapshot, /api/history, /api/events, /metrics).
"""
from __future__ import annotations

import argparse
import sys

from ...errors import BadInputError, VramancerError
from . import add_duration_argument, check_duration, missing_toolkit

__all__ = ["configure", "main", "DEFAULT_PORT"]

DEFAULT_PORT = 8765


def configure(parser: argparse.ArgumentParser) -> None:
    from ..source import add_source_arguments

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    add_source_arguments(parser)
    add_duration_argument(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host (anyone who reaches it sees the telemetry)")


def main(args: argparse.Namespace) -> int:
    from ..source import recorder_from_args
    from ..web.server import bind_socket, is_loopback

    duration_s = check_duration(args.duration)
    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be 0..65535, got {args.port}")
    if not is_loopback(args.host):
        if not args.insecure:
            raise BadInputError(f"refusing to serve on {args.host}, which is not a loopback address; "
                                f"pass --insecure to serve the telemetry to your network")
        print(f"vramancer dashboard: WARNING: serving on {args.host}: anyone who reaches this port sees "
              f"the telemetry (device and process names, memory)", file=sys.stderr)
    try:
        from ..web.app import create_app
        from ..web.server import serve_forever
    except ModuleNotFoundError as e:
        raise VramancerError(missing_toolkit("dashboard", "FastAPI, uvicorn and sse-starlette",
                                             "serve", e)) from None
    recorder = recorder_from_args(args)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    app = create_app(recorder, interval_s=args.interval)
    print(f"vramancer dashboard: http://{shown_host}:{port}/  (metrics: /metrics; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    with recorder:
        serve_forever(app, sock, duration_s=duration_s)
    return 0
