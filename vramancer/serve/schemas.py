"""Request bodies of the OpenAI-compatible API (pydantic), validated before anything runs.

Unknown fields are accepted and ignored (clients send many optional ones); fields we do not
implement are rejected only when set to something other than their default (``n`` > 1,
``logprobs``, ``echo``, ``best_of`` > 1, ``suffix``, penalties, tools).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["StreamOptions", "TextPart", "ChatMessage", "CompletionRequest", "ChatCompletionRequest",
           "unsupported_fields"]

_Float = Annotated[float, Field(allow_inf_nan=False)]
_Stop = Annotated[str, Field(max_length=512)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: _Float = Field(1.0, ge=0.0, le=2.0)
    top_p: _Float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Stop | Annotated[list[_Stop], Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: _Float = 0.0
    frequency_penalty: _Float = 0.0
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension (as in vLLM): do not stop at end-of-sequence")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: text, or token ids; one prompt per request."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: rendered with the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


def unsupported_fields(req: _Sampling) -> list[str]:
    """Names of fields set to something this server does not do (each gets a 400)."""
    bad = []
    if req.n != 1:
        bad.append("n (only n=1 is supported)")
    if req.presence_penalty or req.frequency_penalty:
        bad.append("presence_penalty/frequency_penalty")
    if isinstance(req, CompletionRequest):
        if req.echo:
            bad.append("echo")
        if req.suffix:
            bad.append("suffix")
        if req.best_of not in (None, 1):
            bad.append("best_of")
        if req.logprobs is not None:
            bad.append("logprobs")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            bad.append("logprobs")
        if req.tools:
            bad.append("tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            bad.append("response_format")
    return bad
