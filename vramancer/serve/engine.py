"""The generation engine: one scheduler thread owns the model and runs continuous batching.

Each loop iteration (a token boundary):

1. requests submitted since the last iteration join the FIFO queue; cancelled ones leave it
   (a cancelled running row is dropped from the batch cache at once);
2. queued requests are admitted while the running batch has room (``max_batch``) and the KV
   cache they could grow to fits every stage's budget (see ``Engine.fits``);
3. admitted requests are prefilled on their own (batch 1, fixed chunks of
   ``prefill_chunk_tokens``), about one chunk's worth of tokens per iteration so running
   rows keep streaming, then join the batch cache (``BatchKV``) with their first token;
4. one batched forward decodes one token for every running row, with left padding, its
   attention mask and explicit position ids; finished rows leave. Over a model split into
   stages, the rows may form several micro-batches ("lanes", pipeline.py) whose forwards
   overlap stage by stage.

A request's greedy output is the same alone or batched: its prefill never depends on other
requests, and a batched decode differs from a single-row one only by masked (zero-weight)
padding columns.

The model is any transformers causal LM with attention KV caches (a model split by
``vramancer.load`` keeps that interface): ``model(input_ids, attention_mask, position_ids,
cache|past_key_values, use_cache=True)`` with a ``DynamicCache`` whose layers keep every token
(sliding windows are applied by the mask; see kv.new_cache). Models whose cache holds
recurrent state (linear-attention / state-space layers) are not batched correctly by row
padding and are refused.

KV admission: a padded batch of R rows never grows wider than the longest row's
prompt + max_tokens, so admitting a request when R x max(prompt + max_tokens) x
(KV bytes per token on stage s) <= budget_s on every stage guarantees no stage's cache
ever outgrows what the plan reserved for it.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import BadInputError
from .counters import EngineCounters
from .kv import BatchKV, StageKV, cache_layer_bytes, new_cache
from .sampling import Sampler, SamplingParams, sample_rows
from .text import IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.plan import Plan

__all__ = ["Event", "RequestRejected", "Sequence", "EngineStats", "EngineBase", "Engine", "stages_from_plan"]

log = logging.getLogger("vramancer.serve")

FinishReason = Literal["stop", "length", "cancelled", "error"]


class RequestRejected(BadInputError):
    """The request can never run on this server (too long for the planned context or budget).
    ``code``: OpenAI's error code for it, when there is one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Event:
    """What the engine tells a request's sink. kind "token": ``text`` is new output text;
    "finish": ``text`` is the last piece of text (may be empty), ``finish_reason`` why."""

    kind: Literal["token", "finish"]
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. ``reserved_tokens`` = prompt + max_tokens: the widest
    its cache row can grow."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    arrival_s: float
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    sampler: Sampler
    state: Literal["queued", "prefill", "running", "done"] = "queued"
    cache: Any = None            # own DynamicCache while prefilling
    prefilled_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    next_token: int | None = None
    cancelled: bool = False
    waited: bool = False
    last_token_s: float = 0.0

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass(frozen=True)
class EngineStats:
    """A snapshot, refreshed at every token boundary. ``waited``: requests so far that found
    no room (batch full or KV budget) and stayed queued for at least one iteration;
    ``peak_*``: the most seen since the engine started."""

    queued: int
    prefilling: int
    running: int
    kv_bytes_by_stage: tuple[int, ...]        # actual bytes of cache tensors, per stage
    reserved_bytes_by_stage: tuple[int, ...]  # what admission has promised, per stage
    peak_kv_bytes_by_stage: tuple[int, ...] = ()
    peak_running: int = 0
    waited: int = 0
    finished: int = 0
    peak_lanes: int = 0   # most micro-batches decoded in one step (pipeline overlap)


def stages_from_plan(plan: Plan, layer_kv_bytes_per_token: list[int]) -> list[StageKV]:
    """StageKV per plan stage. Block 0 is the embeddings, blocks 1..L the decoder layers
    0..L-1, block L+1 the head; a stage holds the KV of the layers among its blocks."""
    n_layers = len(layer_kv_bytes_per_token)
    out = []
    for i, st in enumerate(plan.stages):
        lo = max(st.blocks[0], 1) - 1
        hi = min(st.blocks[1], n_layers + 1) - 1
        lo, hi = min(lo, n_layers), max(min(hi, n_layers), min(lo, n_layers))
        out.append(StageKV(index=i, device=st.device, layers=(lo, hi),
                           budget_bytes=int(st.kv_cache_bytes),
                           kv_bytes_per_token=sum(layer_kv_bytes_per_token[lo:hi])))
    return out


_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_cache_kind(config: Any) -> None:
    """Refuse models whose cache is not attention KV (recurrent / linear-attention layers)."""
    if config is None:
        return
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    odd = sorted({t for t in (getattr(text, "layer_types", None) or []) if t not in _ATTENTION_LAYER_TYPES})
    if odd:
        raise BadInputError(f"the server batches attention KV caches; this model also has {', '.join(odd)} "
                            "layers, whose recurrent state it cannot batch yet")


def _forward_kwargs(model: Any) -> tuple[str, bool]:
    """The name the model's forward uses for the cache, and whether it takes logits_to_keep."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


@dataclass
class _Lane:
    """One micro-batch of running rows with its own batched cache (see pipeline.py)."""

    kv: BatchKV = field(default_factory=BatchKV)
    seqs: list[Sequence] = field(default_factory=list)

    def keep(self, rows: list[int]) -> None:
        self.kv.keep(rows)
        self.seqs = [self.seqs[i] for i in rows]


class EngineBase:
    """What every engine does around its scheduler (``Engine`` here, ``serve.cluster.ClusterEngine``
    over a cluster): a request checked against the planned context and the vocabulary, made a
    ``Sequence``; each generated token recorded, detokenized, matched against stop strings and
    sent; the finish event; a blocking ``generate``. A subclass sets ``context_tokens``,
    ``vocab_size``, ``tokenizer``, ``counters``, ``_eos_ids``, ``_ids`` (a counter), ``_finished``
    ``_thread`` (None) and provides ``_run`` (the scheduler thread ``start`` runs), ``submit`` and ``cancel``."""

    context_tokens: int
    vocab_size: int
    tokenizer: Any
    counters: EngineCounters
    _eos_ids: frozenset[int]
    _finished: int

    thread_name = "vramancer-engine"
    _thread: threading.Thread | None

    def start(self) -> None:
        """Start the scheduler thread (its ``_run``) once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def _join_thread(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def check_context(self, prompt_tokens: int, max_tokens: int) -> int:
        """Prompt + new tokens (RequestRejected when empty, or beyond the planned context)."""
        total = prompt_tokens + max_tokens
        if prompt_tokens < 1:
            raise RequestRejected("the prompt is empty (0 tokens)")
        if max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        if total > self.context_tokens:
            raise RequestRejected(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} tokens exceeds "
                f"the planned context of {self.context_tokens} tokens; lower max_tokens or shorten the "
                f"prompt (the server's --context sets the limit)", code="context_length_exceeded")
        return total

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejected when such a request could never run here."""
        self.check_context(prompt_tokens, max_tokens)

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams,
                     sink: Callable[[Event], None]) -> Sequence:
        """A checked request as a Sequence (not queued yet)."""
        self.check(len(prompt_ids), params.max_tokens)
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return Sequence(
            id=str(next(self._ids)), prompt_ids=[int(t) for t in prompt_ids], params=params, sink=sink,
            arrival_s=time.perf_counter(), detok=IncrementalDetokenizer(self.tokenizer),
            stopper=StopMatcher(tuple(params.stop)), sampler=Sampler(params))

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Event], None]) -> Sequence:  # pragma: no cover - every engine has its own
        raise NotImplementedError

    def cancel(self, seq: Sequence) -> None:  # pragma: no cover - every engine has its own
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float = 600.0) -> Event:
        """Blocking helper: run one request to the end; returns the finish Event with the
        whole text in ``text``."""
        done = threading.Event()
        parts: list[str] = []
        final: list[Event] = []

        def sink(ev: Event) -> None:
            parts.append(ev.text)
            if ev.kind == "finish":
                final.append(ev)
                done.set()

        seq = self.submit(prompt_ids, params, sink)
        if not done.wait(timeout_s):
            self.cancel(seq)
            raise TimeoutError(f"request did not finish in {timeout_s} s")
        ev = final[0]
        return Event("finish", "".join(parts), ev.finish_reason, ev.prompt_tokens,
                     ev.completion_tokens, ev.error)

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Record a generated token, send its text; True when the sequence is finished."""
        now = time.perf_counter()
        first = not seq.output_ids
        self.counters.token(now - (seq.arrival_s if first else seq.last_token_s), first)
        seq.last_token_s = now
        seq.output_ids.append(token)
        if token in self._eos_ids and not seq.params.ignore_eos:
            self._finish(seq, "stop")
            return True
        text = seq.stopper.push(seq.detok.add(token))
        if seq.stopper.stopped:
            self._finish(seq, "stop", text)
            return True
        if len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length", text)
            return True
        if text:
            self._send(seq, Event("token", text))
        return False

    @staticmethod
    def _send(seq: Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a broken sink (a closed event loop) must not stop the scheduler
            log.exception("request sink failed")

    def _finish(self, seq: Sequence, reason: FinishReason, text: str = "", error: str = "") -> None:
        if seq.state == "done":
            return
        if reason in ("stop", "length"):
            text += seq.stopper.push(seq.detok.flush()) + seq.stopper.flush()
        seq.state = "done"
        seq.cache = None
        self._finished += 1
        self.counters.finished(len(seq.prompt_ids), len(seq.output_ids))
        self._send(seq, Event("finish", text, reason, len(seq.prompt_ids), len(seq.output_ids), error))



class Engine(EngineBase):
    """Continuous batching over one model. Thread-safe API: ``submit``, ``cancel``, ``stats``;
    everything else runs on the scheduler thread started by ``start()``.

    context_tokens: the longest prompt + max_tokens a request may have (the planned context).
    plan: the plan whose per-stage KV budgets admission keeps to (default: the plan of a model
        split by ``vramancer.load``); without one, a single stage with ``kv_budget_bytes``
        (default: room for ``max_batch`` full-context sequences).
    pipeline_lanes: micro-batches in flight over a split model's stages (None: one per CUDA
        device among the stages; 1: plain batched forwards); a new lane opens once the
        others hold ``min_rows_per_lane`` rows.
    """

    def __init__(self, model: Any, tokenizer: Any, *, context_tokens: int, max_batch: int = 16,
                 prefill_chunk_tokens: int = 512, plan: Plan | None = None,
                 kv_budget_bytes: int | None = None,
                 pipeline_lanes: int | None = None, min_rows_per_lane: int = 8) -> None:
        import torch

        if context_tokens < 2 or max_batch < 1 or prefill_chunk_tokens < 1:
            raise BadInputError("context must be >= 2 tokens, max batch and prefill chunk >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.context_tokens = int(context_tokens)
        self.max_batch = int(max_batch)
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.counters = EngineCounters()   # tokens and latencies, read by /metrics when scraped
        self._config = getattr(model, "config", None)
        _check_cache_kind(self._config)
        self._cache_kw, self._logits_to_keep = _forward_kwargs(model)
        self._input_device = model.get_input_embeddings().weight.device
        self._eos_ids = self._find_eos_ids()
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        # the plan's --kv-dtype: every cache the engine makes stores it (serve/kv.py new_cache)
        kv_plan = plan if plan is not None else getattr(getattr(model, "vramancer", None), "plan", None)
        self._kv_dtype = (getattr(getattr(kv_plan, "workload", None), "kv_dtype", None)
                          or getattr(getattr(model, "vramancer", None), "kv_dtype", None))

        with torch.inference_mode():
            self.layer_kv_bytes_per_token = self._measure_kv_bytes_per_token()
        self.kv_bytes_per_token = sum(self.layer_kv_bytes_per_token)
        runtime = getattr(model, "vramancer", None)
        if plan is None and runtime is not None:
            plan = runtime.plan
        if plan is not None:
            self.stages = stages_from_plan(plan, self.layer_kv_bytes_per_token)
        else:
            budget = (kv_budget_bytes if kv_budget_bytes is not None
                      else self.context_tokens * self.max_batch * self.kv_bytes_per_token)
            self.stages = [StageKV(index=0, device=str(self._input_device),
                                   layers=(0, len(self.layer_kv_bytes_per_token)),
                                   budget_bytes=int(budget),
                                   kv_bytes_per_token=self.kv_bytes_per_token)]
        self._layer_stage = [0] * len(self.layer_kv_bytes_per_token)
        for st in self.stages:
            for layer in range(*st.layers):
                self._layer_stage[layer] = st.index

        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        # scheduler-thread state
        self._queue: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        from .pipeline import StagePipeline, default_lanes

        lanes = default_lanes(model) if pipeline_lanes is None else int(pipeline_lanes)
        if lanes < 1 or min_rows_per_lane < 1:
            raise BadInputError("pipeline lanes and rows per lane must be >= 1")
        self.min_rows_per_lane = int(min_rows_per_lane)
        self._pipeline = StagePipeline(model, lanes) if lanes > 1 else None
        self._lanes = [_Lane() for _ in range(lanes)]
        zeros = tuple(0 for _ in self.stages)
        self._stats = EngineStats(0, 0, 0, zeros, zeros, zeros)
        self._waited = 0
        self._finished = 0
        self._peak_lanes = 0
        self._publish()

    # ---- setup -------------------------------------------------------------------------
    def _find_eos_ids(self) -> frozenset[int]:
        from ..runtime.sampling import eos_id_set

        gen = getattr(self.model, "generation_config", None)
        return eos_id_set(getattr(gen, "eos_token_id", None), getattr(self._config, "eos_token_id", None),
                          getattr(self.tokenizer, "eos_token_id", None))

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        """input_ids [B, T] -> logits of the last position [B, V]; ``cache`` grows by T."""
        dev = self._input_device
        kwargs = {self._cache_kw: cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                         position_ids=position_ids.to(dev), use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _measure_kv_bytes_per_token(self) -> list[int]:
        """Bytes one token adds to each layer's cache, from a one-token forward."""
        import torch

        cache = new_cache(self._kv_dtype)
        one = torch.ones(1, 1, dtype=torch.long)
        self._forward(torch.zeros(1, 1, dtype=torch.long), one, torch.zeros(1, 1, dtype=torch.long), cache)
        return cache_layer_bytes(cache)

    # ---- public, thread-safe ---------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._join_thread(timeout_s)
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestRejected when such a request could never run here."""
        total = self.check_context(prompt_tokens, max_tokens)
        for st in self.stages:
            need = st.needed_bytes(1, total)
            if need > st.budget_bytes:
                raise RequestRejected(
                    f"{total} tokens need {need} bytes of KV cache on stage {st.index} ({st.device}), "
                    f"which has a budget of {st.budget_bytes} bytes", code="context_length_exceeded")

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Event], None]) -> Sequence:
        """Queue a request; ``sink`` gets its events on the engine thread (keep it quick)."""
        seq = self.new_sequence(prompt_ids, params, sink)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._inbox.append(seq)
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` and free its KV cache at the next token boundary."""
        with self._cv:
            if seq.state != "done":
                seq.cancelled = True
                self._cv.notify_all()

    def stats(self) -> EngineStats:
        return self._stats

    def wait_idle(self, timeout_s: float = 60.0) -> EngineStats:
        """Block until nothing is queued or running and the stats say so (or the timeout)."""
        def idle() -> bool:
            st = self._stats
            return not self._inbox and st.queued == st.prefilling == st.running == 0
        with self._cv:
            if not self._cv.wait_for(idle, timeout_s):
                raise TimeoutError(f"the engine was still busy after {timeout_s} s")
        return self._stats

    # ---- admission -------------------------------------------------------------------
    def fits(self, seqs: list[Sequence]) -> bool:
        """Can these sequences all run at once, each growing to prompt + max_tokens?"""
        if len(seqs) > self.max_batch:
            return False
        width = max((s.reserved_tokens for s in seqs), default=0)
        return all(st.needed_bytes(len(seqs), width) <= st.budget_bytes for st in self.stages)

    @property
    def _running(self) -> list[Sequence]:
        return [s for lane in self._lanes for s in lane.seqs]

    def _reserved_bytes(self) -> tuple[int, ...]:
        seqs = self._running + self._prefilling
        width = max((s.reserved_tokens for s in seqs), default=0)
        return tuple(st.needed_bytes(len(seqs), width) for st in self.stages)

    def _admit(self) -> None:
        active = self._running + self._prefilling
        while self._queue and self.fits(active + [self._queue[0]]):
            seq = self._queue.popleft()
            seq.state = "prefill"
            seq.cache = new_cache(self._kv_dtype)
            self._prefilling.append(seq)
            active.append(seq)
        for seq in self._queue:
            if not seq.waited:
                seq.waited = True
                self._waited += 1

    # ---- scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not (self._inbox or self._queue or self._prefilling
                                                      or self._running):
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._queue.extend(self._inbox)
                    self._inbox.clear()
                try:
                    self._reap_cancelled()
                    self._admit()
                    self._prefill_some()
                    self._decode_step()
                except Exception as e:  # a failed forward ends every request in flight, not the server
                    log.exception("generation step failed")
                    self._fail_all(self._describe_failure(e))
                self._publish()
                with self._cv:
                    self._cv.notify_all()
            self._fail_all("the server is shutting down")
            with self._cv:
                for s in self._inbox:
                    self._finish(s, "error", error="the server is shutting down")
                self._inbox.clear()
            self._publish()

    def _describe_failure(self, e: Exception) -> str:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            from ..runtime.generate import oom_error

            return str(oom_error(self.model, e, "serving"))
        return f"{type(e).__name__}: {e}"

    def _reap_cancelled(self) -> None:
        for s in [s for s in self._queue if s.cancelled]:
            self._queue.remove(s)
            self._finish(s, "cancelled")
        for s in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(s)
            self._finish(s, "cancelled")
        for lane in self._lanes:
            if any(s.cancelled for s in lane.seqs):
                for s in lane.seqs:
                    if s.cancelled:
                        self._finish(s, "cancelled")
                lane.keep([i for i, s in enumerate(lane.seqs) if not s.cancelled])

    def _prefill_some(self) -> None:
        """About one chunk of prompt tokens per iteration, in fixed per-request chunks."""
        import torch

        budget = self.prefill_chunk_tokens
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            n = len(seq.prompt_ids)
            while seq.prefilled_tokens < n and budget > 0:
                start = seq.prefilled_tokens
                end = min(n, start + self.prefill_chunk_tokens)
                ids = torch.tensor([seq.prompt_ids[start:end]], dtype=torch.long)
                mask = torch.ones(1, end, dtype=torch.long)
                pos = torch.arange(start, end, dtype=torch.long)[None]
                logits = self._forward(ids, mask, pos, seq.cache)
                seq.prefilled_tokens = end
                budget -= end - start
            if seq.prefilled_tokens < n:
                break
            self._prefilling.remove(seq)
            token = sample_rows(logits, [seq.sampler])[0]
            if self._emit(seq, token):
                seq.cache = None
                continue
            lane = self._lane_for_new_row()
            lane.kv.join(seq.cache, n)
            seq.cache = None
            seq.state = "running"
            seq.next_token = token
            lane.seqs.append(seq)

    def _lane_for_new_row(self) -> _Lane:
        """Fill the first lane up to min_rows_per_lane, then open the next; once all are open,
        the one with fewest rows."""
        for lane in self._lanes:
            if len(lane.seqs) < self.min_rows_per_lane:
                return lane
        return min(self._lanes, key=lambda lane: len(lane.seqs))

    def _decode_lane(self, lane: _Lane) -> list[int]:
        """One token for every row of ``lane``: one batched forward, then sampling."""
        import torch

        ids = torch.tensor([[s.next_token] for s in lane.seqs], dtype=torch.long)  # [B, 1]
        mask, positions = lane.kv.step()  # [B, W+1], [B, 1]
        logits = self._forward(ids, mask, positions, lane.kv.cache)  # [B, V]
        lane.kv.advance(mask)
        return sample_rows(logits, [s.sampler for s in lane.seqs])

    def _decode_step(self) -> None:
        lanes = [lane for lane in self._lanes if lane.seqs]
        if not lanes:
            return
        self._peak_lanes = max(self._peak_lanes, len(lanes))
        if self._pipeline is not None and len(lanes) > 1:
            results = self._pipeline.run([lambda lane=lane: self._decode_lane(lane) for lane in lanes])
        else:
            results = [self._decode_lane(lane) for lane in lanes]
        for lane, tokens in zip(lanes, results):
            keep = []
            for i, (seq, tok) in enumerate(zip(lane.seqs, tokens)):
                if not self._emit(seq, tok):
                    seq.next_token = tok
                    keep.append(i)
            if len(keep) < len(lane.seqs):
                lane.keep(keep)

    def _fail_all(self, message: str) -> None:
        for s in list(self._queue) + self._prefilling + self._running:
            self._finish(s, "error", error=message)
        self._queue.clear()
        self._prefilling.clear()
        for lane in self._lanes:
            lane.kv.clear()
            lane.seqs = []

    def _publish(self) -> None:
        """Refresh the stats from the real cache tensors."""
        per_stage = [0] * len(self.stages)
        layer_bytes: list[int] = []
        parts = [lane.kv.layer_bytes() for lane in self._lanes]
        parts += [cache_layer_bytes(s.cache) for s in self._prefilling if s.cache is not None]
        for extra in parts:
            layer_bytes = [a + b for a, b in itertools.zip_longest(layer_bytes, extra, fillvalue=0)]
        for layer, nbytes in enumerate(layer_bytes):
            if layer < len(self._layer_stage):
                per_stage[self._layer_stage[layer]] += nbytes
        prev = self._stats
        running = sum(len(lane.seqs) for lane in self._lanes)
        self._stats = EngineStats(
            len(self._queue) + len(self._inbox), len(self._prefilling), running,
            tuple(per_stage), self._reserved_bytes(),
            tuple(max(a, b) for a, b in zip(prev.peak_kv_bytes_by_stage, per_stage)),
            max(prev.peak_running, running), self._waited, self._finished, self._peak_lanes)
