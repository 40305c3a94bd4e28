"""A tiny random chat model (built offline, once per test process) and a server around it."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

API_KEY = "test-key-0123"
CONTEXT = 256


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    from vramancer.serve.testing import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(model, tokenizer), float32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    return model, AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def server(tiny):
    from vramancer.serve.server import ServerThread
    from vramancer.telemetry.recorder import Recorder
    from vramancer.telemetry.samplers.host import HostSampler

    model, tok = tiny
    recorder = Recorder(samplers=[HostSampler()], interval=0.1).start()
    try:
        with ServerThread(model, tok, model_name="tiny", context_tokens=CONTEXT, max_batch=8,
                          prefill_chunk_tokens=16, api_key=API_KEY, max_tokens_limit=200,
                          recorder=recorder) as srv:
            yield srv
    finally:
        recorder.close()


@pytest.fixture()
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def split_tiny(tiny_path):
    """The tiny model split by the runtime over two simulated RTX 3060s, half the layers each;
    the plan reserves KV for 4 sequences of CONTEXT tokens."""
    import vramancer

    model = vramancer.load(str(tiny_path), devices="rtx3060,rtx3060", context=CONTEXT, batch=4, split=[1, 1])
    assert len(model.vramancer.stages) == 2
    return model


class EngineGate:
    """Holds the engine's scheduler thread inside its ``at``-th forward pass until ``release`` is
    set (a forward hook on the served model), so what happens meanwhile (a client going away,
    requests arriving) is decided by the test, never by how fast this machine generates. Set
    ``entered`` once the engine is held; a gate left shut fails the engine's step after 60 s
    instead of hanging the suite."""

    def __init__(self, model, at: int, release: threading.Event) -> None:
        self.at, self.release, self.calls = at, release, 0
        self.entered = threading.Event()
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            if not self.release.wait(60):
                raise RuntimeError("the test never opened the engine gate")

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class EngineCalls:
    """What the app handed the engine during one test: ``all_submitted`` is set once
    ``len(submitted) >= expected_submits``; ``cancelled`` after any cancel."""

    expected_submits: int = 1
    submitted: list = field(default_factory=list)
    all_submitted: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)


@pytest.fixture()
def engine_calls(server, monkeypatch):
    """Events set when the app has handed the engine N submissions or any cancel: wraps the
    served engine's own ``submit`` and ``cancel`` (the real ones still run)."""

    calls = EngineCalls()
    real_submit, real_cancel = server.engine.submit, server.engine.cancel

    def submit(*args, **kwargs):
        seq = real_submit(*args, **kwargs)
        calls.submitted.append(seq)
        if len(calls.submitted) >= calls.expected_submits:
            calls.all_submitted.set()
        return seq

    def cancel(seq):
        real_cancel(seq)
        calls.cancelled.set()

    monkeypatch.setattr(server.engine, "submit", submit)
    monkeypatch.setattr(server.engine, "cancel", cancel)
    return calls
