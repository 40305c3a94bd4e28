"""Serving throughput: continuous batching against the same model served one request at a time.

    python benchmarks/serve.py                       # random 24M-parameter Llama, 2 simulated GPUs
    python benchmarks/serve.py --devices auto        # on a real GPU machine
    python benchmarks/serve.py --model ./my-model --devices cuda:0,cuda:1

Starts the real command (``vramancer serve``) in two subprocesses on the same model and plan:
the anchor with ``--max-batch 1`` (requests queue and run one at a time) and ours with
``--max-batch 16``, measured in turn at each load level. For 1, 4 and 16 concurrent streaming
clients (official ``openai`` client, each on its own thread), it prints total generated tokens/s,
the ratio to the anchor under the same load, and time to first token (median / p95). Every request
asks for the same number of tokens (``ignore_eos``), greedy. vLLM is compared when it is installed and a CUDA GPU is
present (it serves the same folder); llama.cpp's server when ``llama-server`` is on PATH and
``--gguf`` names the same model as GGUF. Otherwise each prints "not installed". Nothing here
is asserted: speeds are printed as ratios measured side by side in one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
PROMPTS = ["Tell me about GPUs.", "What is VRAM?", "Once upon a time", "Explain pipeline stages.",
           "Write a haiku about memory.", "Why split a model?", "Hello there!", "Summarize KV caches."]


@dataclass
class Load:
    clients: int
    tokens: int
    seconds: float
    ttft_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def ttft(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_load(base_url: str, model: str, clients: int, requests_total: int, max_tokens: int,
             api_key: str = "bench") -> Load:
    """``clients`` threads share ``requests_total`` streamed chat requests."""
    import openai

    per_client = math.ceil(requests_total / clients)
    tokens = [0] * clients
    ttfts: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as c:
                barrier.wait()
                for j in range(per_client):
                    prompt = PROMPTS[(i * per_client + j) % len(PROMPTS)]
                    start = time.perf_counter()
                    first = None
                    stream = c.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
                    for chunk in stream:
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter() - start
                        if chunk.usage is not None:
                            tokens[i] += chunk.usage.completion_tokens
                    with lock:
                        ttfts.append(first if first is not None else time.perf_counter() - start)
        except BaseException as e:  # reported after the run
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}")
    return Load(clients, sum(tokens), seconds, ttfts)


class Served:
    """A server subprocess; ``url`` once it listens."""

    def __init__(self, argv: list[str], ready_marker: str, url_of, env: dict | None = None) -> None:
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True,
                                     env=env or os.environ.copy())

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.url is None and ready_marker in line:
                    self.url = url_of(line)
                    self._ready.set()
            self._ready.set()

        threading.Thread(target=read, daemon=True).start()

    def wait(self, timeout_s: float) -> str:
        if not self._ready.wait(timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serve_ours(folder: Path, args: argparse.Namespace, max_batch: int) -> Served:
    argv = [sys.executable, "-m", "vramancer", "serve", str(folder), "--port", "0", "--api-key", "bench",
            "--served-model-name", "bench", "--max-batch", str(max_batch), "--context", str(args.context),
            "--batch", "16", "--devices", args.devices, "--log-level", "warning", "--telemetry-interval", "0"]
    if args.split:
        argv += ["--split", args.split]
    if args.backing:
        argv += ["--backing", args.backing]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Served(argv, "vramancer: serving bench at", lambda line: line.split(" at ", 1)[1].split()[0], env)


def wait_http(url: str, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/models", timeout=2, headers={"Authorization": "Bearer bench"}).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args: argparse.Namespace, folder: Path) -> Path:
    from vramancer.serve.testing import build_tiny_chat_model

    return build_tiny_chat_model(folder, hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.heads, num_kv_heads=max(1, args.heads // 2),
                                 intermediate_size=int(args.hidden * 2.75), max_position_embeddings=4096)


def table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a transformers folder (default: build a random Llama)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--devices", default="rtx3060,rtx3060")
    p.add_argument("--split", default="1,1", help="--split for the plan ('' for the planner's choice)")
    p.add_argument("--backing", default=None, help="real device behind simulated GPUs (e.g. cuda:0)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="requests per load level")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--gguf", default=None, help="the same model as GGUF, for llama.cpp's server")
    p.add_argument("--no-others", action="store_true", help="skip the vLLM and llama.cpp comparisons")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_model(args, Path(tmp) / "model")
        print(f"model: {folder if args.model else f'random Llama, hidden {args.hidden}, {args.layers} layers'}; "
              f"devices {args.devices} (split {args.split or 'planned'}); {args.requests} streamed chat "
              f"requests of {args.max_tokens} tokens per load level; {os.cpu_count()} CPU cores")
        # both servers up at once (an idle one costs nothing), measured in turn at each load level,
        # so a busy moment on the machine hits both sides alike
        labels = {"one at a time (anchor)": 1, "vramancer batched": 16}
        servers = {label: serve_ours(folder, args, mb) for label, mb in labels.items()}
        results: dict[str, dict[int, Load]] = {label: {} for label in labels}
        try:
            urls = {label: srv.wait(300) for label, srv in servers.items()}
            for label in labels:
                run_load(urls[label], "bench", 1, 1, 4)  # warm-up
            for n in levels:
                for label in labels:
                    results[label][n] = run_load(urls[label], "bench", n, args.requests, args.max_tokens)
        finally:
            for srv in servers.values():
                srv.stop()

        anchor = results["one at a time (anchor)"]
        rows = [("clients", "anchor tok/s", "batched tok/s", "ratio", "anchor TTFT p50/p95 s",
                 "batched TTFT p50/p95 s")]
        for n in levels:
            a, b = anchor[n], results["vramancer batched"][n]
            rows.append((n, f"{a.tokens_per_s:.1f}", f"{b.tokens_per_s:.1f}", f"{b.tokens_per_s / a.tokens_per_s:.2f}x",
                         f"{a.ttft(0.5):.3f}/{a.ttft(0.95):.3f}", f"{b.ttft(0.5):.3f}/{b.ttft(0.95):.3f}"))
        print()
        table(rows)
        top = max(levels)
        ratio = results["vramancer batched"][top].tokens_per_s / anchor[top].tokens_per_s
        print(f"\nat {top} clients: {ratio:.2f}x the anchor's tokens/s (goal >= 3x): "
              f"{'met' if ratio >= 3 else 'NOT met'}")
        if args.json:
            figures = {"devices": args.devices, "backing": args.backing, "max_tokens": args.max_tokens,
                       "levels": {str(n): {"anchor_tokens_per_s": anchor[n].tokens_per_s,
                                           "batched_tokens_per_s": results["vramancer batched"][n].tokens_per_s,
                                           "anchor_ttft_p50_s": anchor[n].ttft(0.5),
                                           "batched_ttft_p50_s": results["vramancer batched"][n].ttft(0.5)}
                                  for n in levels}}
            Path(args.json).write_text(json.dumps(figures, indent=2))

        if not args.no_others:
            print()
            compare_vllm(folder, args, levels, results)
            compare_llama_cpp(args, levels, results)
    return 0


def compare_vllm(folder: Path, args: argparse.Namespace, levels: list[int], results: dict) -> None:
    if importlib.util.find_spec("vllm") is None:
        print("vLLM: not installed")
        return
    import torch

    if not torch.cuda.is_available():
        print("vLLM: installed, but no CUDA GPU here: skipped")
        return
    port = free_port()
    srv = Served([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                  "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1",
                  "--api-key", "bench", "--max-model-len", str(args.context)],
                 "Uvicorn running", lambda line: f"http://127.0.0.1:{port}/v1")
    try:
        url = srv.wait(600)
        if not wait_http(url, 120):
            print("vLLM: did not answer")
            return
        loads = {n: run_load(url, "bench", n, args.requests, args.max_tokens) for n in levels}
    finally:
        srv.stop()
    print_other("vLLM", loads, results, levels)


def compare_llama_cpp(args: argparse.Namespace, levels: list[int], results: dict) -> None:
    exe = shutil.which("llama-server")
    if exe is None:
        print("llama.cpp server: not installed")
        return
    if not args.gguf:
        print("llama.cpp server: installed; pass --gguf with this model as GGUF to compare")
        return
    port = free_port()
    srv = Served([exe, "-m", args.gguf, "--port", str(port), "--host", "127.0.0.1", "--api-key", "bench",
                  "-c", str(args.context * 16), "-np", "16", "-ngl", "999"],
                 "server is listening", lambda line: f"http://127.0.0.1:{port}/v1")
    try:
        url = srv.wait(300)
        loads = {n: run_load(url, "bench", n, args.requests, args.max_tokens) for n in levels}
    finally:
        srv.stop()
    print_other("llama.cpp server", loads, results, levels)


def print_other(name: str, loads: dict, results: dict, levels: list[int]) -> None:
    rows = [("clients", f"{name} tok/s", "vramancer tok/s", "vramancer / other", f"{name} TTFT p50 s")]
    for n in levels:
        o, b = loads[n], results["vramancer batched"][n]
        rows.append((n, f"{o.tokens_per_s:.1f}", f"{b.tokens_per_s:.1f}", f"{b.tokens_per_s / o.tokens_per_s:.2f}x",
                     f"{o.ttft(0.5):.3f}"))
    table(rows)


if __name__ == "__main__":
    sys.exit(main())
