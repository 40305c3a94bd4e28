"""The FastAPI app: OpenAI-compatible routes in front of an ``Engine``.

Routes: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions. Streaming is server-sent events exactly as OpenAI clients read
them (``data: {json}\\n\\n`` chunks, then ``data: [DONE]``). Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``; malformed bodies get 400 (413 when too
large), never 500; a ``model`` other than the one served gets 404 (``model_not_found``). With an
API key, every route but /health needs ``Authorization: Bearer KEY``. Each request is logged on
one line to the ``vramancer.serve.access`` logger (INFO): method, path, status, tokens, seconds.
A client that goes away (stream closed, or non-streamed request abandoned) cancels its
request, which frees its KV cache at the next token boundary.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Event, RequestRejected
from .sampling import SamplingParams
from .schemas import ChatCompletionRequest, CompletionRequest, unsupported_fields

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .metrics import ServeMetrics

__all__ = ["ServerConfig", "create_app", "ACCESS_LOG"]

_DISCONNECT_POLL_S = 0.25
ACCESS_LOG = "vramancer.serve.access"
_USAGE_KEY = "vramancer.usage"       # scope key: (prompt_tokens, completion_tokens) of the request


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id /v1/models lists; api_key: None = no auth;
    max_body_bytes: larger request bodies get 413; max_tokens_limit: the most a request may ask."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_tokens_limit: int = 4096


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(status: int, message: str, type_: str = "invalid_request_error",
                param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


class _BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, declared or streamed. The body
    is read here (at most ``limit`` bytes) before the app runs, then handed to it unchanged."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _too_big(self, scope: dict, receive: Any, send: Any) -> None:
        response = _json_response(413, _error_body(413, f"request body is larger than {self.limit} bytes"))
        await response(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return await self._too_big(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        body: list[bytes] | None = [b"".join(chunks)]

        async def replay() -> dict:
            nonlocal body
            if body is not None:
                data, body = body[0], None
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _StatusOf:
    """An ASGI ``send`` that notes the response's status (500 until one is sent)."""

    def __init__(self, send: Any) -> None:
        self._send, self.code = send, 500

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.code = int(message["status"])
        await self._send(message)


class _CountRequests:
    """ASGI middleware: count requests by endpoint and the status they got."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = _StatusOf(send)
        try:
            await self.app(scope, receive, status.send)
        finally:
            self.metrics.count_request(scope.get("path", ""), status.code)


class _AccessLog:
    """ASGI middleware: one line per request to the ``vramancer.serve.access`` logger, once the
    response is over (a stream included): ``POST /v1/chat/completions 200 tokens=12+64 1.532 s``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log = logging.getLogger(ACCESS_LOG)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        status = _StatusOf(send)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, status.send)
        finally:
            usage = scope.get(_USAGE_KEY)
            tokens = f"tokens={usage[0]}+{usage[1]}" if usage else "tokens=-"
            self.log.info("%s %s %d %s %.3f s", scope.get("method", "-"), scope.get("path", ""), status.code,
                          tokens, time.perf_counter() - start)


class _Sink:
    """Carries engine events (engine thread) into an asyncio queue (server loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def create_app(engine: Engine, config: ServerConfig, metrics: ServeMetrics) -> FastAPI:
    app = FastAPI(title="VRAMancer", version="1", docs_url=None, redoc_url=None)
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _json_response(e.status, _error_body(e.status, e.message, e.type, e.param, e.code), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:3]:
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
                continue
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        more = len(e.errors()) - 3
        message = "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
        return _json_response(400, _error_body(400, message))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return _json_response(e.status_code, _error_body(e.status_code, str(e.detail)))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    auth = [Depends(authorize)]

    def check_model(req: Any) -> None:
        """A model name this server does not serve: 404, as OpenAI answers it (absent: the one served)."""
        if req.model not in (None, "", config.model_name):
            raise APIError(404, f"The model `{req.model}` does not exist: this server serves "
                                f"`{config.model_name}`", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created, "owned_by": "vramancer",
            "max_model_len": engine.context_tokens}]}

    def sampling_params(req: Any, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        bad = unsupported_fields(req)
        if bad:
            raise APIError(400, "not supported by this server: " + ", ".join(bad))
        if max_tokens is None:
            max_tokens = max(1, min(config.max_tokens_limit, engine.context_tokens - prompt_tokens))
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens ({max_tokens}) is above this server's limit of "
                                f"{config.max_tokens_limit}", param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=req.stop_strings(), ignore_eos=req.ignore_eos)

    def encode_text(text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as e:  # text the tokenizer cannot take (lone surrogates, ...)
            raise APIError(400, f"the prompt could not be tokenized: {type(e).__name__}") from None

    def completion_prompt(req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and len(p) > 0 and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, str):  # raw text: the tokenizer's own special tokens (BOS), as transformers adds them
            return encode_text(p, add_special_tokens=True)
        return list(p)

    def chat_prompt(req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template rejected the conversation (roles out of order, ...)
            raise APIError(400, f"the chat template rejected these messages: {e}") from None
        return encode_text(text)  # the template wrote the special tokens it wants

    async def submit(prompt_ids: list[int], params: SamplingParams):
        sink = _Sink()
        try:
            seq = engine.submit(prompt_ids, params, sink)
        except RequestRejected as e:
            raise APIError(400, str(e), code=e.code) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type_="server_error") from None
        return seq, sink

    async def collect(request: Request, seq: Any, sink: _Sink) -> tuple[str, Event]:
        """Wait for the whole output; cancel if the client goes away meanwhile."""
        parts: list[str] = []
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _DISCONNECT_POLL_S
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(sink.queue.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                if loop.time() >= next_check:
                    next_check = loop.time() + _DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        engine.cancel(seq)
                        raise APIError(499, "client closed the request")
                if ev is None:
                    continue
                parts.append(ev.text)
                if ev.kind == "finish":
                    if ev.finish_reason == "error":
                        raise APIError(503, f"generation failed: {ev.error}", type_="server_error")
                    return "".join(parts), ev
        finally:
            engine.cancel(seq)  # no-op when finished

    def stream(seq: Any, sink: _Sink, chunk: Any, include_usage: bool, first: dict | None, scope: dict):
        async def events() -> AsyncIterator[dict]:
            try:
                if first is not None:
                    yield {"data": json.dumps(chunk(first, None))}
                while True:
                    ev = await sink.queue.get()
                    if ev.kind == "token":
                        yield {"data": json.dumps(chunk({"text": ev.text}, None))}
                        continue
                    if ev.finish_reason == "error":
                        yield {"data": json.dumps(_error_body(503, f"generation failed: {ev.error}",
                                                              "server_error"))}
                        return
                    scope[_USAGE_KEY] = (ev.prompt_tokens, ev.completion_tokens)
                    if ev.text:
                        yield {"data": json.dumps(chunk({"text": ev.text}, None))}
                    yield {"data": json.dumps(chunk({}, ev.finish_reason))}
                    if include_usage:
                        yield {"data": json.dumps(chunk(None, None, usage=_usage(ev)))}
                    yield {"data": "[DONE]"}
                    return
            finally:
                engine.cancel(seq)  # the client went away (or we are done): free its cache now

        return EventSourceResponse(events(), sep="\n")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        prompt_ids = await run_in_threadpool(completion_prompt, req)
        params = sampling_params(req, len(prompt_ids), req.max_tokens)
        seq, sink = await submit(prompt_ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict | None, finish: str | None, usage: dict | None = None) -> dict:
            choices = [] if delta is None else [
                {"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish}]
            out = {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                   "choices": choices}
            if include_usage:
                out["usage"] = usage
            return out

        if req.stream:
            return stream(seq, sink, chunk, include_usage, None, request.scope)
        text, ev = await collect(request, seq, sink)
        request.scope[_USAGE_KEY] = (ev.prompt_tokens, ev.completion_tokens)
        return {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}],
                "usage": _usage(ev)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req)
        prompt_ids = await run_in_threadpool(chat_prompt, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, len(prompt_ids), max_tokens)
        seq, sink = await submit(prompt_ids, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict | None, finish: str | None, usage: dict | None = None) -> dict:
            if delta is None:
                choices = []
            else:
                d = {"role": "assistant", "content": ""} if delta.get("role") else (
                    {"content": delta["text"]} if "text" in delta else {})
                choices = [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]
            out = {"id": rid, "object": "chat.completion.chunk", "created": now,
                   "model": config.model_name, "choices": choices}
            if include_usage:
                out["usage"] = usage
            return out

        if req.stream:
            return stream(seq, sink, chunk, include_usage, {"role": "assistant"}, request.scope)
        text, ev = await collect(request, seq, sink)
        request.scope[_USAGE_KEY] = (ev.prompt_tokens, ev.completion_tokens)
        return {"id": rid, "object": "chat.completion", "created": now, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": ev.finish_reason}],
                "usage": _usage(ev)}

    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)  # counts the 413s too
    app.add_middleware(_AccessLog)                       # outermost: logs every request, 413s included
    return app
