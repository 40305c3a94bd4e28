"""`vramancer serve MODEL --cluster ADDRESS`: the same OpenAI-compatible server, answering from the
stage workers of a Ray cluster (vramancer/cluster/pipeline.py).

Honest and minimal: ``ClusterEngine`` runs requests one at a time through the cluster pipeline, in
arrival order (a FIFO queue; the others wait in it). Each request starts a new sequence on every
stage (their caches reset), is prefilled in the plan's prefill chunks and decoded token by token,
greedy or with temperature / top-p / seed as ``serve`` samples them (the driver picks each token from
the last stage's logits), streamed as each token lands. Stop strings, EOS, max_tokens, cancellation
(at the next token), API key, limits, access log and /metrics are ``serve``'s own (app.py). Batching
and pipeline lanes are single-process only: ``--max-batch`` / ``--pipeline-lanes`` are refused here.

The /metrics KV figures per stage are the tokens the running request holds times the plan's KV
bytes per token of that stage (the caches live on the nodes; they are not measured from here).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .counters import EngineCounters
from .engine import EngineBase, EngineStats, Event, Sequence
from .kv import StageKV
from .sampling import SamplingParams, sample_rows

__all__ = ["ClusterEngine", "cluster_stages", "serve_on_cluster"]

log = logging.getLogger("vramancer.serve")


def cluster_stages(plan: Any) -> list[StageKV]:
    """One StageKV per stage of ``plan``: its KV budget and the plan's KV bytes per token there."""
    w = plan.workload
    tokens = max(1, int(w.context) * int(w.batch))
    return [StageKV(index=i, device=st.device, layers=(int(st.blocks[0]), int(st.blocks[1])),
                    budget_bytes=int(st.kv_cache_bytes), kv_bytes_per_token=int(st.kv_cache_bytes) // tokens)
            for i, st in enumerate(plan.stages)]


class ClusterEngine(EngineBase):
    """The ``Engine`` interface app.py uses (``submit``, ``cancel``, ``stats``, ``counters``,
    ``stages``, ``context_tokens``, ``tokenizer``) over a ``ClusterPipeline``: one request at a time.

    ``pipe``: anything with ``forward(ids, start) -> logits [1, V]`` and ``plan`` (a ClusterPipeline).
    ``eos_ids``: the token ids that end a sequence (unless the request sets ignore_eos)."""

    thread_name = "vramancer-cluster-engine"

    def __init__(self, pipe: Any, tokenizer: Any, *, vocab_size: int, eos_ids: frozenset[int] = frozenset()) -> None:
        plan = pipe.plan
        self.pipe = pipe
        self.tokenizer = tokenizer
        self.context_tokens = int(plan.workload.context)
        self.prefill_chunk_tokens = max(1, int(plan.workload.prefill_chunk))
        self.max_batch = 1
        self.vocab_size = int(vocab_size)
        self.stages = cluster_stages(plan)
        self.counters = EngineCounters()
        self._eos_ids = frozenset(eos_ids)
        self._cv = threading.Condition()
        self._queue: deque[Sequence] = deque()
        self._current: Sequence | None = None
        self._current_tokens = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._waited = self._finished = self._peak_running = 0
        zeros = tuple(0 for _ in self.stages)
        self._stats = EngineStats(0, 0, 0, zeros, zeros, zeros)

    # ---- the Engine interface -----------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            if self._current is not None:
                self._current.cancelled = True
            self._cv.notify_all()
        self._join_thread(timeout_s)
        with self._cv:
            while self._queue:
                self._finish(self._queue.popleft(), "error", error="the server is shutting down")

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Sequence:
        seq = self.new_sequence(prompt_ids, params, sink)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if self._current is not None or self._queue:
                seq.waited = True
                self._waited += 1
            self._queue.append(seq)
            self._publish()
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        with self._cv:
            if seq.state != "done":
                seq.cancelled = True
                if seq in self._queue:
                    self._queue.remove(seq)
                    self._finish(seq, "cancelled")
                    self._publish()
                self._cv.notify_all()

    def stats(self) -> EngineStats:
        return self._stats

    # ---- the request thread ---------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._queue:
                        self._cv.wait()
                    if self._stopping:
                        return
                    seq = self._queue.popleft()
                    self._current, self._current_tokens = seq, 0
                    seq.state = "prefill"
                    self._publish()
                try:
                    self._serve(seq)
                except Exception as e:  # noqa: BLE001 - a failed hop ends this request, not the server
                    log.warning("cluster generation failed: %s", e)
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                with self._cv:
                    self._current, self._current_tokens = None, 0
                    self._publish()
                    self._cv.notify_all()

    def _serve(self, seq: Sequence) -> None:
        """Prefill in the plan's chunks (a new sequence on every stage), then one token per forward."""
        ids, chunk = seq.prompt_ids, self.prefill_chunk_tokens
        logits = None
        for s in range(0, len(ids), chunk):
            if seq.cancelled:
                self._finish(seq, "cancelled")
                return
            logits = self.pipe.forward(ids[s:s + chunk], s)
            self._current_tokens = min(len(ids), s + chunk)
        seq.state = "running"
        self._publish()
        pos = len(ids)
        while True:
            token = sample_rows(logits, [seq.sampler])[0]
            if self._emit(seq, token):
                return
            if seq.cancelled:
                self._finish(seq, "cancelled")
                return
            logits = self.pipe.forward([token], pos)
            pos += 1
            self._current_tokens = pos

    def _publish(self) -> None:
        cur = self._current
        running = 1 if cur is not None and cur.state == "running" else 0
        prefilling = 1 if cur is not None and cur.state == "prefill" else 0
        in_use = tuple(self._current_tokens * st.kv_bytes_per_token for st in self.stages)
        reserved = tuple((cur.reserved_tokens if cur is not None else 0) * st.kv_bytes_per_token
                         for st in self.stages)
        prev = self._stats
        self._peak_running = max(self._peak_running, running)
        self._stats = EngineStats(len(self._queue), prefilling, running, in_use, reserved,
                                  tuple(max(a, b) for a, b in zip(prev.peak_kv_bytes_by_stage, in_use)),
                                  self._peak_running, self._waited, self._finished, 1 if running else prev.peak_lanes)


def _refuse_batching_flags(args: argparse.Namespace) -> None:
    given = getattr(args, "given", frozenset())
    for dest, flag in (("max_batch", "--max-batch"), ("pipeline_lanes", "--pipeline-lanes")):
        if dest in given:
            raise BadInputError(f"serve --cluster runs one request at a time through the cluster's stages: "
                                f"drop {flag} (batching is single-process only)")


def serve_on_cluster(args: argparse.Namespace, sock: Any, api_key: str | None, max_body_bytes: int,
                     access_log: Callable[[], None] = lambda: None) -> int:
    """`vramancer serve MODEL --cluster ADDRESS`: plan over the cluster, start the stage workers,
    serve the OpenAI API from them on ``sock`` until interrupted; workers and Ray connection closed after.
    ``access_log``: sets up serve's access log (commands.py), called once the server is about to listen."""
    import ray

    from .._net import serve_foreground
    from ..cluster.commands import (
        check_cluster_flags,
        cluster_plan,
        connect_and_discover,
        eos_token_ids,
        link_flags,
    )
    from ..cluster.pipeline import ClusterPipeline
    from ..models.checkpoint import read_config
    from ..runtime.commands import load_tokenizer
    from ..runtime.loader import weights_folder
    from .app import ServerConfig, create_app
    from .metrics import ServeMetrics

    check_cluster_flags(args, "serve")
    trusted, link = link_flags(args)
    _refuse_batching_flags(args)
    folder = weights_folder(args.model)
    tok = load_tokenizer(folder)
    config = read_config(folder / "config.json")
    text_cfg = config.get("text_config") or config
    vocab = int(text_cfg.get("vocab_size") or len(tok))
    eos = eos_token_ids(folder, tok, config)
    quiet = getattr(args, "quiet", False)
    pipe = None
    try:
        view, driver = connect_and_discover(args.cluster, args.cluster_token_file, 4 << 20)
        plan = cluster_plan(args, folder, view, driver)
        pipe = ClusterPipeline(plan, view, folder, trusted_network=trusted, link=link)
        engine = ClusterEngine(pipe, tok, vocab_size=vocab, eos_ids=eos)
        metrics = ServeMetrics(engine)  # type: ignore[arg-type]
        cfg = ServerConfig(model_name=args.served_model_name or Path(str(args.model).rstrip("/")).name, api_key=api_key,
                           max_body_bytes=max_body_bytes, max_tokens_limit=args.max_tokens_limit)
        app = create_app(engine, cfg, metrics)  # type: ignore[arg-type]
        host = f"[{args.host}]" if ":" in args.host else args.host
        where = " -> ".join(f"{s.device}" for s in plan.stages)
        if not quiet:
            print(f"vramancer: serving {cfg.model_name} at http://{host}:{sock.getsockname()[1]}/v1 from the "
                  f"cluster {args.cluster} - {len(plan.stages)} stage(s) ({where}), context {engine.context_tokens} "
                  f"tokens, one request at a time, {'API key required' if api_key else 'no API key'}",
                  file=sys.stderr, flush=True)
        access_log()
        engine.start()
        try:
            serve_foreground(app, sock, log_level=args.log_level)
        finally:
            engine.stop()
    finally:
        if pipe is not None:
            pipe.close()
            if not quiet:
                print("vramancer: the cluster's stage workers are closed", file=sys.stderr, flush=True)
        ray.shutdown()
    return 0
