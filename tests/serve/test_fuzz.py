"""Fuzzed request bodies (hypothesis) never get a 5xx: malformed input is always the client's
error, answered with 400/401/413 and OpenAI's error body."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

KEY = "fuzz-key"
HEADERS = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), json_values)},
    optional={"content": st.one_of(st.text(max_size=30), json_values,
                                   st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                   "text": st.text(max_size=10)}), max_size=2)),
              "name": json_values})
common = {
    "model": st.one_of(st.just("tiny"), json_values),
    "max_tokens": st.one_of(st.integers(-3, 12), json_values),
    "max_completion_tokens": st.one_of(st.integers(-3, 12), json_values),
    "temperature": st.one_of(st.floats(-1, 3), json_values),
    "top_p": st.one_of(st.floats(-0.5, 1.5), json_values),
    "n": st.one_of(st.integers(-1, 3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), json_values),
    "seed": st.one_of(st.integers(), json_values),
    "logprobs": json_values, "echo": json_values, "best_of": json_values, "suffix": json_values,
    "ignore_eos": json_values, "presence_penalty": json_values, "tools": json_values,
    "response_format": json_values,
}
chat_bodies = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(message, max_size=3), json_values),
                                                  **common})
completion_bodies = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 500), max_size=6),
                        st.lists(st.text(max_size=5), max_size=3),
                        st.lists(st.lists(st.integers(-5, 500), max_size=4), max_size=2), json_values),
    **common})


@pytest.fixture(scope="module")
def fuzz_server(tiny):
    from vramancer.serve.server import ServerThread

    model, tok = tiny
    with ServerThread(model, tok, model_name="tiny", context_tokens=48, max_batch=4, api_key=KEY,
                      max_tokens_limit=6, max_body_bytes=4096) as srv:
        with httpx.Client(base_url=srv.url, headers=HEADERS, timeout=30) as http:
            yield http


def _check(r: httpx.Response) -> None:
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text
    elif r.request.url.path.endswith("completions"):
        assert r.json()["usage"]["completion_tokens"] <= 6


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(body=chat_bodies)
def test_chat_bodies(fuzz_server, body):
    _check(fuzz_server.post("/v1/chat/completions", content=json.dumps(body)))


@FUZZ
@given(body=completion_bodies)
def test_completion_bodies(fuzz_server, body):
    _check(fuzz_server.post("/v1/completions", content=json.dumps(body)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nothing", "/metrics"]),
       method=st.sampled_from(["POST", "GET", "PUT"]))
def test_raw_bytes_anywhere(fuzz_server, raw, path, method):
    _check(fuzz_server.request(method, path, content=raw))
