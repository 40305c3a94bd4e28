"""The engine without HTTP: continuous batching gives each request what it gets alone,
KV admission keeps every stage within its budget, cancellation frees the cache."""
from __future__ import annotations

import threading

import pytest
import torch

from vramancer.errors import BadInputError
from vramancer.serve.engine import Engine, RequestRejected
from vramancer.serve.kv import BatchKV, new_cache
from vramancer.serve.sampling import SamplingParams

from .conftest import EngineGate

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog, twice over and again", "A",
           "VRAM is memory", "Once upon a time there was a small model", "x" * 40, "GPU!",
           "pipeline stages pass hidden states"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


class Waiter:
    """A sink that records events; ``wait()`` blocks (bounded) until the finish event."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev.kind == "finish":
            self.done.set()

    def wait(self, timeout_s: float = 60.0):
        assert self.done.wait(timeout_s), "request did not finish"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams, start: bool = True):
    """Submit everything first (so it is batched from the first step), then start and wait."""
    waiters = [Waiter() for _ in prompts]
    seqs = [engine.submit(p, params, w) for p, w in zip(prompts, waiters)]
    if start:
        engine.start()
    for w in waiters:
        w.wait()
    return seqs, waiters


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """No cache at all: recompute the whole sequence for every token."""
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


@pytest.fixture()
def engine(tiny):
    model, tok = tiny
    eng = Engine(model, tok, context_tokens=256, max_batch=8, prefill_chunk_tokens=8)
    yield eng
    eng.stop()


def test_alone_batched_and_uncached_reference_agree(tiny, engine):
    model, tok = tiny
    prompts = [encode(tok, p) for p in PROMPTS]
    assert max(map(len, prompts)) > 2 * engine.prefill_chunk_tokens  # chunked prefill is exercised
    engine.start()
    alone = [run_all(engine, [p], GREEDY, start=False)[0][0].output_ids for p in prompts]
    batched_engine = Engine(model, tok, context_tokens=256, max_batch=8, prefill_chunk_tokens=8)
    try:
        seqs, waiters = run_all(batched_engine, prompts, GREEDY)
        assert batched_engine.stats().peak_running == len(prompts)  # really ran as one batch
    finally:
        batched_engine.stop()
    assert [s.output_ids for s in seqs] == alone
    for p, ids in zip(prompts[:3], alone[:3]):
        assert ids == reference_greedy(model, p, GREEDY.max_tokens)
    for w, ids in zip(waiters, alone):
        assert w.events[-1].completion_tokens == len(ids) == GREEDY.max_tokens
        assert w.events[-1].finish_reason == "length"
        assert w.text == tok.decode(ids, skip_special_tokens=True)


def test_requests_joining_a_running_batch_get_their_alone_output(tiny, engine):
    model, tok = tiny
    prompts = [encode(tok, p) for p in PROMPTS[:5]]
    engine.start()
    alone = [engine.generate(p, GREEDY).text for p in prompts]
    first = Waiter()
    long_params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    # held in the first request's 4th forward (it is decoding) until the others are submitted
    arrived = threading.Event()
    gate = EngineGate(model, at=4, release=arrived)
    try:
        engine.submit(prompts[0], long_params, first)
        assert gate.entered.wait(60)
        assert 1 <= len(first.events) < 60
        later = [Waiter() for _ in prompts[1:]]
        for p, w in zip(prompts[1:], later):
            engine.submit(p, GREEDY, w)
    finally:
        arrived.set()
        gate.remove()
    for w in later:
        w.wait()
    first.wait()
    assert [w.text for w in later] == alone[1:]
    assert first.text.startswith(alone[0])
    assert engine.stats().peak_running == len(prompts)


def test_seeded_sampling_is_the_same_alone_and_batched(tiny, engine):
    _, tok = tiny
    prompts = [encode(tok, p) for p in PROMPTS[:4]]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1000 + i, ignore_eos=True)
              for i in range(len(prompts))]
    engine.start()
    alone = [engine.generate(p, sp).text for p, sp in zip(prompts, params)]
    waiters = [Waiter() for _ in prompts]
    for p, sp, w in zip(prompts, params, waiters):
        engine.submit(p, sp, w)
    for w in waiters:
        w.wait()
    assert [w.text for w in waiters] == alone
    other_seed = engine.generate(prompts[0], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9,
                                                            seed=7, ignore_eos=True)).text
    assert other_seed != alone[0]


def test_requests_beyond_the_kv_budget_wait_then_finish(tiny, engine):
    model, tok = tiny
    prompts = [encode(tok, PROMPTS[i]) for i in (0, 2, 3, 6)]
    engine.start()
    alone = [engine.generate(p, GREEDY).text for p in prompts]
    # each request may grow to len(prompt) + 20 tokens; the budget holds one at a time
    reserved = sorted(len(p) + GREEDY.max_tokens for p in prompts)
    assert reserved[-1] < 2 * reserved[1]  # no two fit side by side
    budget = reserved[-1] * engine.kv_bytes_per_token
    small = Engine(model, tok, context_tokens=256, max_batch=8, prefill_chunk_tokens=8, kv_budget_bytes=budget)
    try:
        seqs, waiters = run_all(small, prompts, GREEDY)
        stats = small.wait_idle()
    finally:
        small.stop()
    assert [w.text for w in waiters] == alone
    assert stats.waited == 3 and stats.peak_running == 1
    assert 0 < stats.peak_kv_bytes_by_stage[0] <= budget


def test_kv_budget_admits_as_many_padded_rows_as_fit(tiny):
    model, tok = tiny
    probe = Engine(model, tok, context_tokens=256)
    kvpt = probe.kv_bytes_per_token
    prompts = [encode(tok, "Hi"), encode(tok, "Hello"), encode(tok, "VRAM is"), encode(tok, "GPU")]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    widest = max(len(p) for p in prompts) + 10
    eng = Engine(model, tok, context_tokens=256, kv_budget_bytes=2 * widest * kvpt)  # two padded rows
    try:
        run_all(eng, prompts, params)
        stats = eng.wait_idle()
    finally:
        eng.stop()
    assert stats.peak_running == 2 and stats.waited == 2
    assert stats.peak_kv_bytes_by_stage[0] <= 2 * widest * kvpt


def test_requests_that_can_never_fit_are_rejected_with_the_reason(tiny, engine):
    model, tok = tiny
    with pytest.raises(RequestRejected, match=r"= 257 tokens exceeds the planned context of 256"):
        engine.submit([1] * 200, SamplingParams(max_tokens=57), lambda ev: None)
    with pytest.raises(RequestRejected, match="empty"):
        engine.submit([], GREEDY, lambda ev: None)
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        engine.submit([10**6], GREEDY, lambda ev: None)
    tight = Engine(model, tok, context_tokens=256, kv_budget_bytes=30 * engine.kv_bytes_per_token)
    with pytest.raises(RequestRejected, match="budget"):
        tight.submit([1] * 20, SamplingParams(max_tokens=11), lambda ev: None)


def test_cancel_frees_the_kv_cache_at_once(tiny, engine):
    model, tok = tiny
    keep = Waiter()
    engine.submit(encode(tok, "Hello"), SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True), keep)
    gone = Waiter()
    seq = engine.submit(encode(tok, PROMPTS[1]), SamplingParams(max_tokens=150, temperature=0.0,
                                                                ignore_eos=True), gone)
    # held at its 20th forward (both requests decoding, far from their 150 tokens) until cancelled;
    # then held again two steps later, when the cancelled row has left, until the test has looked
    cancelled, looked = threading.Event(), threading.Event()
    gate = EngineGate(model, at=20, release=cancelled)
    try:
        engine.start()
        assert gate.entered.wait(60)
        assert len(gone.events) >= 3 and engine.stats().running == 2
        before = engine.stats().kv_bytes_by_stage[0]
        engine.cancel(seq)
        after_cancel = EngineGate(model, at=3, release=looked)
        cancelled.set()
        assert gone.wait().finish_reason == "cancelled"
        assert after_cancel.entered.wait(60)
        stats = engine.stats()
    finally:
        cancelled.set()
        looked.set()
        gate.remove()
    after_cancel.remove()
    # the long row left: the cache is one row, as wide as the remaining request
    assert stats.running == 1
    assert stats.kv_bytes_by_stage[0] < before
    rows = stats.kv_bytes_by_stage[0] // engine.kv_bytes_per_token
    assert 2 + 1 <= rows <= 2 + 150
    keep.wait()
    stats = engine.wait_idle()
    assert stats.kv_bytes_by_stage == (0,) and stats.reserved_bytes_by_stage == (0,)


def test_cancelling_a_queued_request_removes_it_before_it_runs(tiny, engine):
    model, tok = tiny
    prompt = encode(tok, "Hello")
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    one_row = Engine(model, tok, context_tokens=256, kv_budget_bytes=(len(prompt) + 30) * engine.kv_bytes_per_token)
    first, second = Waiter(), Waiter()
    one_row.submit(prompt, params, first)
    queued = one_row.submit(prompt, params, second)
    one_row.cancel(queued)
    try:
        one_row.start()
        assert second.wait().finish_reason == "cancelled" and second.events[-1].completion_tokens == 0
        assert first.wait().completion_tokens == 30
        stats = one_row.wait_idle()
    finally:
        one_row.stop()
    assert stats.peak_running == 1 and stats.finished == 2


def test_stop_strings_end_the_output_before_them(tiny, engine):
    _, tok = tiny
    engine.start()
    prompt = encode(tok, "Once upon a time")
    full = engine.generate(prompt, GREEDY).text
    stop = full[6:9]
    assert stop and full.find(stop) >= 1
    ev = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop, "\0never"),
                                                ignore_eos=True))
    assert ev.text == full[:full.find(stop)] and ev.finish_reason == "stop"
    assert ev.completion_tokens < 20


def test_a_failed_step_ends_the_requests_in_flight_not_the_engine(tiny, engine):
    model, tok = tiny
    engine.start()
    fail = {"once": True}

    def boom(module, args, kwargs):
        if fail.pop("once", False):
            raise RuntimeError("simulated device failure")

    handle = model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        ev = engine.generate(encode(tok, "Hello"), GREEDY)
        assert ev.finish_reason == "error" and "simulated device failure" in ev.error
        ev = engine.generate(encode(tok, "Hello"), GREEDY)
        assert ev.finish_reason == "length" and ev.completion_tokens == 20
    finally:
        handle.remove()


def test_sliding_window_model_batched_matches_alone_and_reference(tiny):
    from transformers import MistralConfig, MistralForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, initializer_range=0.2)
    model = MistralForCausalLM(cfg).eval()
    prompts = [[5, 6, 7], [8] * 20, [9, 10, 11, 12, 13]]  # shorter and longer than the window
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eng = Engine(model, tok, context_tokens=128, prefill_chunk_tokens=4)
    try:
        eng.start()
        alone = [run_all(eng, [p], params, start=False)[0][0].output_ids for p in prompts]
        batched = [s.output_ids for s in run_all(eng, prompts, params, start=False)[0]]
    finally:
        eng.stop()
    assert batched == alone
    assert alone == [reference_greedy(model, p, 16) for p in prompts]


def test_models_with_recurrent_layers_are_refused(tiny):
    model, tok = tiny
    cfg = model.config.__class__(**{**model.config.to_dict(), "layer_types": ["full_attention", "linear_attention",
                                                                             "full_attention", "full_attention"]})

    class Wrapped(torch.nn.Module):
        config = cfg

    with pytest.raises(BadInputError, match="linear_attention"):
        Engine(Wrapped(), tok, context_tokens=64)


def test_batch_kv_pads_left_and_trims_exactly(tiny):
    model, tok = tiny
    with torch.inference_mode():
        caches = []
        for n in (5, 9, 3):
            c = new_cache()
            model(input_ids=torch.arange(n)[None], use_cache=True, cache=c)
            caches.append((c, n))
        per_token = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                        for k, v, *_ in caches[0][0]) // 5
        b = BatchKV()
        for c, n in caches:
            b.join(c, n)
        assert (b.rows, b.width) == (3, 9)
        assert sum(b.layer_bytes()) == 3 * 9 * per_token
        assert b.mask.sum(dim=1).tolist() == [5, 9, 3]
        assert b.mask[:, -1].tolist() == [1, 1, 1]  # right-aligned rows
        b.keep([0, 2])  # the widest row leaves: its columns go
        assert (b.rows, b.width) == (2, 5) and sum(b.layer_bytes()) == 2 * 5 * per_token
        assert b.mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
        b.keep([])
        assert b.layer_bytes() == [] and b.width == 0
