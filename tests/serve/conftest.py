"""A tiny random chat model (built offline, once per test process) and a server around it."""
from __future__ import annotations

import os

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
