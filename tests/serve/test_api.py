"""The HTTP API through the official openai client: chat and completions, plain and
streamed, stop, usage, concurrency, disconnects, limits and auth."""
from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from .conftest import API_KEY, EngineGate

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHATS = [[{"role": "user", "content": c}] for c in (
    "Hello there", "What is VRAM?", "Tell me a story about two GPUs", "x",
    "Pipeline stages pass hidden states", "The quick brown fox", "GPU!", "Once upon a time")]


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_plain_and_streamed_agree_with_usage(client, tiny):
    _, tok = tiny
    r = chat(client, CHATS[1], extra_body={"ignore_eos": True})
    prompt_ids = tok(tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(prompt_ids), 16, len(prompt_ids) + 16)
    chunks = list(chat(client, CHATS[1], stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_plain_streamed_and_token_prompt(client, tiny):
    _, tok = tiny
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 12
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    ids = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_raw_stream_is_openai_sse(server):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_sequences(client):
    full = chat(client, CHATS[2], max_tokens=20, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[5:8]
    cut = full.find(stop)
    assert stop and cut > 0
    r = chat(client, CHATS[2], max_tokens=20, stop=[stop, "\x00nope"], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20
    streamed = chat(client, CHATS[2], max_tokens=20, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:cut]


def test_seeded_sampling_repeats(client):
    a = chat(client, CHATS[0], temperature=0.9, top_p=0.95, seed=123, max_tokens=20)
    b = chat(client, CHATS[0], temperature=0.9, top_p=0.95, seed=123, max_tokens=20)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_eight_concurrent_clients_get_their_alone_text(client, server, engine_calls):
    alone = [chat(client, m, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
             for m in CHATS]
    server.engine.wait_idle(30)
    engine_calls.submitted.clear()
    engine_calls.expected_submits = len(CHATS)
    # the engine is held in the first request's first forward until all eight are submitted:
    # they share forward passes however fast this machine is
    gate = EngineGate(server.engine.model, at=1, release=engine_calls.all_submitted)
    got: list = [None] * len(CHATS)

    def one(i: int) -> None:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
            stream = i % 2 == 1
            r = chat(c, CHATS[i], max_tokens=24, stream=stream, extra_body={"ignore_eos": True})
            got[i] = ("".join(x.choices[0].delta.content or "" for x in r if x.choices) if stream
                      else r.choices[0].message.content)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(CHATS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine_calls.all_submitted.set()
        gate.remove()
    assert gate.calls > 0
    assert got == alone
    assert server.engine.stats().peak_running > 1  # they did share forward passes


def test_disconnect_mid_stream_frees_the_cache(client, server, engine_calls):
    server.engine.wait_idle()
    # held at its 8th forward until the app cancels it: the stream cannot end before the client leaves
    gate = EngineGate(server.engine.model, at=8, release=engine_calls.cancelled)
    try:
        stream = chat(client, CHATS[3], max_tokens=180, stream=True, extra_body={"ignore_eos": True})
        chunks = []
        for c in stream:
            chunks.append(c)
            if len(chunks) == 4:
                break
        assert server.engine.stats().kv_bytes_by_stage[0] > 0
        stream.close()
        assert engine_calls.cancelled.wait(30)
    finally:
        engine_calls.cancelled.set()
        gate.remove()
    stats = server.engine.wait_idle(30)
    assert stats.kv_bytes_by_stage == (0,) and stats.running == 0
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'vramancer_serve_kv_cache_bytes{device="cpu",stage="0"} 0.0' in metrics


def _metric(server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def test_abandoned_plain_request_is_cancelled(server, engine_calls):
    server.engine.wait_idle()
    finished, tokens = server.engine.stats().finished, _metric(server, "vramancer_serve_completion_tokens_total")
    # The engine is held in its 3rd forward pass until the app cancels the request, so the request
    # is still running when its client goes away, however fast or slow this machine is.
    gate = EngineGate(server.engine.model, at=3, release=engine_calls.cancelled)
    body = json.dumps({"prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert gate.entered.wait(30), "the request never reached the engine"
        # the client is gone: the app notices, cancels, and the held step ends the request
        assert engine_calls.cancelled.wait(30)
        stats = server.engine.wait_idle(30)
    finally:
        engine_calls.cancelled.set()
        gate.remove()
    assert stats.finished == finished + 1 and stats.kv_bytes_by_stage == (0,)
    assert 0 < _metric(server, "vramancer_serve_completion_tokens_total") - tokens < 200


def test_over_long_request_gets_400_saying_why(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello " * 120, max_tokens=150)
    assert "exceeds the planned context of 256 tokens" in str(e.value)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 200"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=201)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        chat(client, CHATS[0], n=2)


def test_chat_without_max_tokens_fills_the_remaining_context(client):
    r = chat(client, CHATS[0], max_tokens=None, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 200  # the server's max_tokens limit, below the context left


def test_auth(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"Authorization": "Basic " + API_KEY}, {"Authorization": f"Bearer {API_KEY}x"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def test_body_limits_and_bad_bodies(server):
    big = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers=AUTH)
    assert r.status_code == 413
    chunked = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "', b"a" * (5 * 2**20), b'"}']),
                         headers={**AUTH, "content-type": "application/json"})  # no content-length
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]["message"]
    as_json = {**AUTH, "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=as_json)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for body, why in ((b'{"prompt": ""}', "empty"), (b'{"prompt": [[]]}', "empty"),
                      (b'{"prompt": [1, 99999]}', "outside the vocabulary"),
                      (b'{"prompt": "a", "temperature": NaN}', "finite"),
                      (b'{"prompt": ["a", "b"]}', "one prompt per request"),
                      (b'{"prompt": "a", "logprobs": 2}', "not supported")):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=as_json)
        assert r.status_code == 400 and why in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]},
                   headers=AUTH)
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    # a JSON escape for a lone UTF-16 surrogate: valid JSON, not valid text
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "\\ud800 lone", "max_tokens": 2}',
                   headers=as_json)
    assert r.status_code == 400 and "could not be tokenized" in r.json()["error"]["message"]


def test_metrics_count_requests_and_tokens(client, server):
    chat(client, CHATS[0], max_tokens=5, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("vramancer_serve_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
                 "vramancer_serve_prompt_tokens_total", "vramancer_serve_completion_tokens_total",
                 "vramancer_serve_time_to_first_token_seconds_bucket",
                 "vramancer_serve_inter_token_latency_seconds_count",
                 "vramancer_serve_queue_depth", "vramancer_serve_running_batch_size",
                 'vramancer_serve_kv_cache_budget_bytes{device="cpu",stage="0"}',
                 'vramancer_host_memory_total_bytes{device="cpu"}'):  # the telemetry recorder's gauges
        assert name in text, name
