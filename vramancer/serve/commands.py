"""`vramancer serve MODEL`: an OpenAI-compatible HTTP server for a model split over devices.

    vramancer serve ./my-model --devices rtx3090,rtx3060 --context 8192 --batch 4
    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}]}'

The plan's KV cache (``--context`` x ``--batch`` tokens on every stage) is the budget requests
share: each reserves prompt + max_tokens tokens while it runs, and waits in the queue when the
budget is taken. Import-light: torch, transformers and the web stack load only in ``main``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import envs
from ..errors import BadInputError

__all__ = ["configure", "main"]

_EPILOG = (
    "The KV cache the plan reserves (--context x --batch tokens) is what concurrent requests share: "
    "a request reserves its prompt + max_tokens, and waits when that is taken (requests without "
    "max_tokens reserve up to the rest of the context). A request longer than --context gets 400. "
    "Listening beyond this machine (--host 0.0.0.0) needs --api-key (or VRAMANCER_API_KEY, or "
    "--api-key-file) unless --insecure.")


def configure(p: argparse.ArgumentParser) -> None:
    from ..runtime.commands import add_run_flags

    p.epilog = _EPILOG
    p.add_argument("model", help="local transformers folder (config.json, tokenizer, safetensors) "
                   "or an HF id in the local cache")
    add_run_flags(p)
    from ..cluster.commands import add_cluster_flags

    add_cluster_flags(p)   # serve --cluster ADDRESS: answer from the cluster's stage workers (serve/cluster.py)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $VRAMANCER_API_KEY if set)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (default 16)")
    p.add_argument("--max-tokens", type=int, default=4096, dest="max_tokens_limit",
                   help="the largest max_tokens a request may ask for (default 4096)")
    p.add_argument("--max-body", default="4MiB", help="largest request body (default 4MiB)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients see (default: the folder name)")
    p.add_argument("--pipeline-lanes", type=int, default=None,
                   help="micro-batches in flight across the stages (default: one per GPU among the stages)")
    p.add_argument("--telemetry-interval", type=float, default=1.0,
                   help="seconds between device samples exported on /metrics (0: none; default 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise BadInputError(f"cannot read an API key from {args.api_key_file}: "
                                f"{getattr(e, 'strerror', None) or 'empty file'}") from None
        if not key:
            raise BadInputError(f"{args.api_key_file}: the first line is empty")
        return key
    return args.api_key or envs.get("VRAMANCER_API_KEY") or None


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be 0..65535 (got {args.port})")
    if args.max_batch < 1:
        raise BadInputError(f"--max-batch must be at least 1 (got {args.max_batch})")
    if args.max_tokens_limit < 1:
        raise BadInputError(f"--max-tokens must be at least 1 (got {args.max_tokens_limit})")
    if args.telemetry_interval < 0:
        raise BadInputError(f"--telemetry-interval must not be negative (got {args.telemetry_interval})")
    if args.pipeline_lanes is not None and args.pipeline_lanes < 1:
        raise BadInputError(f"--pipeline-lanes must be at least 1 (got {args.pipeline_lanes})")


def _access_log(args: argparse.Namespace) -> None:
    """One line per request on stderr ("2025-01-31 14:03:07 POST /v1/chat/completions 200
    tokens=12+64 1.532 s") at --log-level info or debug, none with --quiet."""
    import logging

    from .app import ACCESS_LOG

    log = logging.getLogger(ACCESS_LOG)
    quiet = getattr(args, "quiet", False)
    log.setLevel(logging.WARNING if quiet else getattr(logging, args.log_level.upper()))
    if not any(getattr(h, "vramancer_access", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.vramancer_access = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
    log.propagate = False


def main(args: argparse.Namespace) -> int:
    from ..units import format_bytes, parse_bytes
    from .server import bind_socket, check_bind

    _check_args(args)
    key = _api_key(args)
    check_bind(args.host, key, args.insecure)  # before loading anything: a refusal is instant
    max_body_bytes = parse_bytes(args.max_body)
    sock = bind_socket(args.host, args.port)  # a port in use fails now, not after the load
    if getattr(args, "cluster", None):   # one request at a time through the cluster's stages
        from .cluster import serve_on_cluster

        return serve_on_cluster(args, sock, key, max_body_bytes, lambda: _access_log(args))

    from ..runtime.commands import load_split, make_plan, missing_runtime

    missing_runtime()
    plan = make_plan(args, args.model)
    from ..runtime.progress import LoadProgress

    quiet = getattr(args, "quiet", False)
    with LoadProgress(plan, enabled=False if quiet else None) as progress:
        model, tokenizer = load_split(args.model, plan, dtype=None, progress=progress,
                                      quant_backend=args.quant_backend)
    if not quiet:
        print(f"vramancer: {progress.summary()}", file=sys.stderr)
    from .server import build_server, serve_forever

    recorder = None
    if args.telemetry_interval > 0:
        from ..telemetry.recorder import track

        recorder = track(interval=args.telemetry_interval)
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    server = build_server(model, tokenizer, model_name=name, context_tokens=plan.workload.context,
                          max_batch=args.max_batch, prefill_chunk_tokens=plan.workload.prefill_chunk,
                          plan=plan, api_key=key, max_tokens_limit=args.max_tokens_limit,
                          max_body_bytes=max_body_bytes, pipeline_lanes=args.pipeline_lanes,
                          recorder=recorder)
    eng = server.engine
    budget = ", ".join(f"{s.device} {format_bytes(s.budget_bytes)}" for s in eng.stages)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]
    print(f"vramancer: serving {name} at http://{host}:{port}/v1 - {len(eng.stages)} stage(s), "
          f"context {eng.context_tokens} tokens, KV budget {budget}, max batch {eng.max_batch}, "
          f"{'API key required' if key else 'no API key'}", file=sys.stderr, flush=True)
    _access_log(args)
    try:
        serve_forever(server, sock, log_level=args.log_level)
    finally:
        if recorder is not None:
            recorder.close()
    return 0
