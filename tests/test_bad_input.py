"""Every bad input answered in one line: exit 2, exactly one non-empty stderr line starting with
``vramancer: error:``, no traceback, nothing left behind (no stray ``.tmp``, no half-written file).

The table covers each class of failure (config values, JSON structure, safetensors / GGUF
headers, device specs, workload numbers, output paths, traces, generation flags, argparse);
cases that used to hang or eat memory run in a subprocess with a timeout and an address-space
cap. Property tests mutate config fields at random (a fixed seed: tests/conftest.py) and
require a valid profile or a BadInputError, never another exception. Then the writer: device
nodes, FIFOs and symlinks are written through, never replaced; and the disk tier's scratch is
removed however a run ends (normally, by exception, SIGTERM, SIGINT) and at the next start.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramancer.cli import main
from vramancer.errors import BadInputError, MalformedCheckpointError, WorkloadError

ROOT = Path(__file__).resolve().parents[1]

LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2}
MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
QWEN2_MOE = dict(LLAMA, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, decoder_sparse_step=1)
GEMMA3 = dict(LLAMA, model_type="gemma3_text", head_dim=8, sliding_window=16, sliding_window_pattern=2)
BASES = {"llama": LLAMA, "gpt2": GPT2, "bert": BERT, "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE,
         "gemma3_text": GEMMA3}


# -- file builders ------------------------------------------------------------------------------
def cfg(base: dict = LLAMA, **over) -> str:
    return json.dumps({**base, **over})


def deep(n: int = 100_000) -> str:
    return '{"a": ' * n + "1" + "}" * n


def gguf_header(n_tensors: int = 0, n_kv: int = 0, kv: bytes = b"", tail: int = 64) -> bytes:
    """A GGUF v3 file start: magic, version, counts, ``kv`` bytes, then ``tail`` zero bytes."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + b"\0" * tail


# one KV entry "abcd": an array of 2**40 uint32 items in a file of a few bytes
_HUGE_ARRAY_KV = struct.pack("<Q", 4) + b"abcd" + struct.pack("<IIQ", 9, 4, 2**40)


def safetensors(header: dict | bytes | None = None, data_bytes: int = 32, length: int | None = None) -> bytes:
    """A .safetensors file: 8-byte little-endian header length (``length`` overrides it), the header,
    then ``data_bytes`` of data. Default header: one F32 tensor of 8 elements."""
    if header is None:
        header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * data_bytes


def trace_csv(rows: list[dict]) -> str:
    from vramancer.telemetry.export import CSV_COLUMNS

    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({"timestamp": "1700000000.0", "device": "cuda:0", "name": "gpu", "used_bytes": "1",
                    "total_bytes": "10", "source": "nvml", "lost": "0", **r})
    return buf.getvalue()


def trace_json(devices: list[dict]) -> str:
    return json.dumps({"schema": 1, "snapshots": [{"timestamp": 1.0, "devices": devices, "processes": []}]})


def gguf_truncated(path: Path) -> None:
    from tests.models.test_gguf import write_llama_gguf

    full = path.with_name("full.gguf.src")
    write_llama_gguf(full)
    path.write_bytes(full.read_bytes()[:300])
    full.unlink()


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _assert_one_line(code: int, err: str, expect_code: int = 2) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expect_code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("vramancer: error: ") and len(lines[0]) > len("vramancer: error: ") + 3, err


# -- the table: (id, files to create in tmp, argv) ----------------------------------------------
P = "plan"
D = ["-d", "rtx3090"]
CASES: list[tuple[str, dict, list[str]]] = [
    # config values: NaN, zero, negative, absurd, wrong types, relations
    ("hidden-nan", {"m/config.json": cfg(hidden_size=float("nan"))}, [P, "m", *D]),
    ("hidden-zero", {"m/config.json": cfg(hidden_size=0)}, [P, "m", *D]),
    ("hidden-negative", {"m/config.json": cfg(hidden_size=-32)}, [P, "m", *D]),
    ("hidden-fraction", {"m/config.json": cfg(hidden_size=32.5)}, [P, "m", *D]),
    ("hidden-infinity", {"m/config.json": cfg(hidden_size=float("inf"))}, [P, "m", *D]),
    ("hidden-string", {"m/config.json": cfg(hidden_size="32")}, [P, "m", *D]),
    ("hidden-bool", {"m/config.json": cfg(hidden_size=True)}, [P, "m", *D]),
    ("hidden-list", {"m/config.json": cfg(hidden_size=[32])}, [P, "m", *D]),
    ("kv-heads-zero", {"m/config.json": cfg(num_key_value_heads=0)}, [P, "m", *D]),
    ("kv-heads-not-dividing", {"m/config.json": cfg(num_key_value_heads=3)}, [P, "m", *D]),
    ("heads-zero", {"m/config.json": cfg(num_attention_heads=0)}, [P, "m", *D]),
    ("heads-over-hidden", {"m/config.json": cfg(hidden_size=2, num_attention_heads=4, num_key_value_heads=4)},
     [P, "m", *D]),
    ("vocab-zero", {"m/config.json": cfg(vocab_size=0)}, [P, "m", *D]),
    ("vocab-huge-int", {"m/config.json": cfg(vocab_size=10**400)}, [P, "m", *D]),
    ("intermediate-negative", {"m/config.json": cfg(intermediate_size=-1)}, [P, "m", *D]),
    ("head-dim-zero", {"m/config.json": cfg(head_dim=0)}, [P, "m", *D]),
    ("head-dim-string", {"m/config.json": cfg(head_dim="8")}, [P, "m", *D]),
    ("positions-absurd", {"m/config.json": cfg(max_position_embeddings=1e30)}, [P, "m", *D]),
    ("layers-absurd", {"m/config.json": cfg(num_hidden_layers=10**9)}, [P, "m", *D]),
    ("layers-zero", {"m/config.json": cfg(num_hidden_layers=0)}, [P, "m", *D]),
    ("tie-string", {"m/config.json": cfg(tie_word_embeddings="yes")}, [P, "m", *D]),
    ("layer-types-not-list", {"m/config.json": cfg(layer_types=5)}, [P, "m", *D]),
    ("window-pattern-zero", {"m/config.json": cfg(GEMMA3, sliding_window_pattern=0)}, [P, "m", *D]),
    ("window-nan", {"m/config.json": cfg(GEMMA3, sliding_window=float("nan"))}, [P, "m", *D]),
    ("experts-zero", {"m/config.json": cfg(MIXTRAL, num_local_experts=0)}, [P, "m", *D]),
    ("moe-only-layers-string", {"m/config.json": cfg(QWEN2_MOE, mlp_only_layers="all")}, [P, "m", *D]),
    ("gpt2-heads-not-dividing", {"m/config.json": cfg(GPT2, n_head=5)}, [P, "m", *D]),
    ("bert-type-vocab-zero", {"m/config.json": cfg(BERT, type_vocab_size=0)}, [P, "m", *D]),
    ("unknown-type-absurd-layers", {"m/config.json": cfg(model_type="nosuchmodel", num_hidden_layers=10**9)},
     [P, "m", *D]),
    ("quant-bits-string", {"m/config.json": cfg(quantization_config={"quant_method": "gptq", "bits": "four"},
                                                hidden_size=0)}, [P, "m", *D]),
    ("quant-config-string", {"m/config.json": cfg(quantization_config="bnb")}, [P, "m", *D]),
    ("quant-config-list", {"m/config.json": cfg(quantization_config=["bitsandbytes"])}, [P, "m", *D]),
    # JSON structure of the config
    ("config-deep", {"m/config.json": deep()}, [P, "m", *D]),
    ("config-deep-arrays", {"m/config.json": "[" * 100_000 + "]" * 100_000}, [P, "m", *D]),
    ("config-binary", {"m/config.json": b"\xff\xfe\x00\x01binary"}, [P, "m", *D]),
    ("config-empty", {"m/config.json": b""}, [P, "m", *D]),
    ("config-not-object", {"m/config.json": "[1, 2]"}, [P, "m", *D]),
    ("config-truncated", {"m/config.json": cfg()[:40]}, [P, "m", *D]),
    ("config-file-direct-deep", {"c.json": deep()}, [P, "c.json", *D]),
    # safetensors headers
    ("st-length-huge", {"m/config.json": cfg(), "m/model.safetensors": safetensors(length=2**63)}, [P, "m", *D]),
    ("st-length-past-end", {"m/config.json": cfg(), "m/model.safetensors": safetensors(length=10**6)},
     [P, "m", *D]),
    ("st-header-deep", {"m/config.json": cfg(), "m/model.safetensors": safetensors(deep().encode())},
     [P, "m", *D]),
    ("st-header-binary", {"m/config.json": cfg(), "m/model.safetensors": safetensors(b"\xff" * 16)},
     [P, "m", *D]),
    ("st-offsets-past-end", {"m/config.json": cfg(), "m/model.safetensors": safetensors(data_bytes=8)},
     [P, "m", *D]),
    ("st-offsets-overlap", {"m/config.json": cfg(), "m/model.safetensors": safetensors({
        "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
        "b": {"dtype": "F32", "shape": [8], "data_offsets": [16, 48]}}, data_bytes=48)}, [P, "m", *D]),
    ("st-offsets-reversed", {"m/config.json": cfg(), "m/model.safetensors": safetensors({
        "a": {"dtype": "F32", "shape": [0], "data_offsets": [32, 0]}})}, [P, "m", *D]),
    ("st-shape-negative", {"m/config.json": cfg(), "m/model.safetensors": safetensors({
        "a": {"dtype": "F32", "shape": [-8], "data_offsets": [0, 32]}})}, [P, "m", *D]),
    ("st-metadata-string", {"m/config.json": cfg(), "m/model.safetensors": safetensors({
        "__metadata__": "x", "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})}, [P, "m", *D]),
    ("st-file-truncated", {"x.safetensors": safetensors()[:12]}, [P, "x.safetensors", *D]),
    ("st-index-deep", {"m/config.json": cfg(), "m/model.safetensors.index.json": deep()}, [P, "m", *D]),
    ("gguf-truncated", {"t.gguf": gguf_truncated}, [P, "t.gguf", *D]),
    ("gguf-tensor-count-huge", {"t.gguf": gguf_header(n_tensors=2**40)}, [P, "t.gguf", *D]),
    ("gguf-kv-count-huge", {"t.gguf": gguf_header(n_kv=2**40)}, [P, "t.gguf", *D]),
    ("gguf-string-length-huge", {"t.gguf": gguf_header(n_kv=1, kv=struct.pack("<Q", 2**62))}, [P, "t.gguf", *D]),
    ("gguf-not-gguf", {"t.gguf": b"GGML" + b"\0" * 64}, [P, "t.gguf", *D]),
    ("model-name-too-long", {}, [P, "x" * 5000, *D]),
    ("device-bandwidth-dot", {}, [P, "llama-3.1-8b", "-d", "g:16GiB@.GBps@30TFLOPS"]),
    ("device-bandwidth-overflow", {}, [P, "llama-3.1-8b", "-d", "g:16GiB@" + "9" * 400 + "GBps@30TFLOPS"]),
    # devices
    ("devices-1000", {}, [P, "llama-3.1-8b", "-d", ",".join(["rtx3090"] * 1000)]),
    ("devices-65-distinct", {}, [P, "llama-3.1-8b", "-d",
                                 ",".join(f"g{i}:{i + 1}GiB@100GBps@10TFLOPS" for i in range(65))]),
    ("devices-garbage", {}, [P, "llama-3.1-8b", "-d", "rtx3090:lots"]),
    ("backing-missing", {}, [P, "llama-3.1-8b", *D, "--backing", "cuda:9"]),
    ("backing-garbage", {}, [P, "llama-3.1-8b", *D, "--backing", "tpu"]),
    ("devices-backing-missing", {}, ["devices", *D, "--backing", "cuda:9"]),
    ("problem-too-big", {"m/config.json": cfg(num_hidden_layers=1000)},
     [P, "m", "-d", ",".join(f"g{i}:{i + 1}GiB@100GBps@10TFLOPS" for i in range(8))]),
    # workload numbers
    ("split-inf", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "inf,1"]),
    ("split-zero", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "0,0"]),
    ("split-negative", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "-1,2"]),
    ("split-nan", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "nan,1"]),
    ("split-overflow", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "1e400,1"]),
    ("split-words", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "three,one"]),
    ("split-count", {}, [P, "llama-3.1-8b", "-d", "rtx3090,rtx3060", "--split", "1,1,1"]),
    ("reserve-nan", {}, [P, "llama-3.1-8b", *D, "--reserve", "nan"]),
    ("reserve-negative", {}, [P, "llama-3.1-8b", *D, "--reserve", "-1GiB"]),
    ("reserve-overflow", {}, [P, "llama-3.1-8b", *D, "--reserve", "1" + "0" * 400 + "GiB"]),
    ("context-zero", {}, [P, "llama-3.1-8b", *D, "--context", "0"]),
    ("context-negative", {}, [P, "llama-3.1-8b", *D, "--context", "-5"]),
    ("context-absurd", {}, [P, "llama-3.1-8b", *D, "--context", str(2**40)]),
    ("batch-zero", {}, [P, "llama-3.1-8b", *D, "--batch", "0"]),
    # argparse, in one line
    ("argparse-not-int", {}, [P, "llama-3.1-8b", "--context", "lots"]),
    ("argparse-unknown-flag", {}, [P, "llama-3.1-8b", "--frobnicate"]),
    ("argparse-unknown-command", {}, ["frobnicate"]),
    ("argparse-missing-arg", {}, ["report"]),
    ("argparse-bad-choice", {}, [P, "llama-3.1-8b", "--objective", "fastest"]),
    # output paths: refused before the work, nothing left behind
    ("output-missing-folder", {}, [P, "llama-3.1-8b", *D, "-o", "nodir/plan.json"]),
    ("output-is-folder", {"out/keep": ""}, [P, "llama-3.1-8b", *D, "-o", "out"]),
    ("output-under-a-file", {"afile": "x"}, [P, "llama-3.1-8b", *D, "-o", "afile/plan.json"]),
    ("output-symlink-loop", {"loop": ("symlink", "loop2"), "loop2": ("symlink", "loop")},
     [P, "llama-3.1-8b", *D, "-o", "loop"]),
    ("output-empty", {}, [P, "llama-3.1-8b", *D, "-o", " "]),
    ("plot-missing-folder", {"t.csv": trace_csv([{}])}, ["report", "t.csv", "--plot", "nodir/x.png"]),
    ("plot-is-folder", {"t.csv": trace_csv([{}]), "pics/keep": ""}, ["report", "t.csv", "--plot", "pics"]),
    ("monitor-export-missing-folder", {}, ["monitor", "--no-tui", "-d", "rtx3090", "--duration", "0.1",
                                           "--export", "nodir/t.csv"]),
    ("monitor-export-slash", {}, ["monitor", "--no-tui", "-d", "rtx3090", "--duration", "0.1",
                                  "--export", "out.csv/"]),
    ("monitor-export-folder", {"d.csv/keep": ""}, ["monitor", "--no-tui", "-d", "rtx3090", "--duration", "0.1",
                                                   "--export", "d.csv"]),
    # traces given to report
    ("trace-negative-bytes-csv", {"t.csv": trace_csv([{"used_bytes": "-5"}])}, ["report", "t.csv"]),
    ("trace-negative-total-csv", {"t.csv": trace_csv([{"total_bytes": "-1"}])}, ["report", "t.csv"]),
    ("trace-negative-pid-csv", {"t.csv": trace_csv([{"pid": "-3"}])}, ["report", "t.csv"]),
    ("trace-words-csv", {"t.csv": trace_csv([{"used_bytes": "lots"}])}, ["report", "t.csv"]),
    ("trace-nan-csv", {"t.csv": trace_csv([{"timestamp": "nan"}])}, ["report", "t.csv"]),
    ("trace-negative-bytes-json", {"t.json": trace_json([{"device": "a", "used_bytes": -5}])},
     ["report", "t.json"]),
    ("trace-deep-json", {"t.json": deep()}, ["report", "t.json"]),
    ("trace-binary", {"t.csv": b"\xff\xfe\x00garbage\n\x80\x81"}, ["report", "t.csv"]),
    ("trace-binary-no-suffix", {"t": b"\x00\x01\x02\xff"}, ["report", "t"]),
    ("trace-empty", {"t.csv": b""}, ["report", "t.csv"]),
    ("trace-giant-line", {"t.csv": trace_csv([]) + "1," + "x" * (3 * 2**20) + "\n"}, ["report", "t.csv"]),
    ("trace-empty-json", {"t.json": b""}, ["report", "t.json"]),
    ("trace-missing", {}, ["report", "none.csv"]),
    ("trace-folder", {"d/keep": ""}, ["report", "d"]),
    # generation flags: refused before anything loads
    ("prompt-empty", {}, ["run", "llama-3.1-8b", "--prompt", ""]),
    ("prompt-blank", {}, ["run", "llama-3.1-8b", "--prompt", "   "]),
    ("temperature-nan", {}, ["run", "llama-3.1-8b", "-p", "hi", "--temperature", "nan"]),
    ("temperature-negative", {}, ["run", "llama-3.1-8b", "-p", "hi", "--temperature", "-1"]),
    ("temperature-inf", {}, ["run", "llama-3.1-8b", "-p", "hi", "--temperature", "inf"]),
    ("top-p-high", {}, ["run", "llama-3.1-8b", "-p", "hi", "--top-p", "1.5"]),
    ("top-p-nan", {}, ["run", "llama-3.1-8b", "-p", "hi", "--top-p", "nan"]),
    ("max-new-tokens-zero", {}, ["run", "llama-3.1-8b", "-p", "hi", "-n", "0"]),
    ("max-new-tokens-negative", {}, ["run", "llama-3.1-8b", "-p", "hi", "-n", "-1"]),
    ("chat-temperature-nan", {}, ["chat", "llama-3.1-8b", "--temperature", "nan"]),
    ("prompt-file-huge", {"p.txt": "a" * (2**24 + 1)}, ["run", "llama-3.1-8b", "--prompt-file", "p.txt"]),
    ("prompt-file-binary", {"p.txt": b"\xff\xfe\x00"}, ["run", "llama-3.1-8b", "--prompt-file", "p.txt"]),
    ("prompt-file-missing", {}, ["run", "llama-3.1-8b", "--prompt-file", "none.txt"]),
    ("run-trace-missing-folder", {}, ["run", "llama-3.1-8b", "-p", "hi", "--trace", "nodir/t.csv"]),
    ("run-backing-missing", {}, ["run", "llama-3.1-8b", "-p", "hi", *D, "--backing", "cuda:9"]),
    # plan files given to run
    ("plan-file-deep", {"p.json": deep()}, ["run", "llama-3.1-8b", "-p", "hi", "--plan", "p.json"]),
    ("plan-file-binary", {"p.json": b"\xff\xfe\xfd"}, ["run", "llama-3.1-8b", "-p", "hi", "--plan", "p.json"]),
    ("plan-file-empty", {"p.json": b""}, ["run", "llama-3.1-8b", "-p", "hi", "--plan", "p.json"]),
]


def _make(tmp: Path, files: dict) -> None:
    for name, content in files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(content[1], p)
        elif isinstance(content, tuple) and content[0] == "fifo":
            os.mkfifo(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


@pytest.mark.parametrize("files, argv", [pytest.param(f, a, id=i) for i, f, a in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, files, argv):
    if argv[0] == "run" or argv[0] == "chat":
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / ".cache"))
    _make(tmp_path, files)
    before = _files_under(tmp_path)
    code = main(list(argv))
    _, err = capsys.readouterr()
    _assert_one_line(code, err)
    assert _files_under(tmp_path) == before


# -- what used to hang or eat memory: a subprocess, a timeout, an address-space cap ---------------
def _capped() -> None:
    cap = 2 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@pytest.mark.parametrize("files, argv", [
    pytest.param({"m/config.json": cfg(num_hidden_layers=10**9)}, [P, "m", *D], id="layers-1e9"),
    pytest.param({"m/config.json": cfg(model_type="nosuchmodel", num_hidden_layers=10**9)}, [P, "m", *D],
                 id="unknown-type-layers-1e9"),
    pytest.param({}, [P, "llama-3.1-8b", "-d", ",".join(["rtx3090"] * 5000)], id="devices-5000"),
    pytest.param({"m/config.json": deep(200_000)}, [P, "m", *D], id="config-deep-200k"),
    pytest.param({"m/config.json": cfg(), "m/model.safetensors": safetensors(length=2**40)}, [P, "m", *D],
                 id="safetensors-header-length-1TiB"),
    pytest.param({"t.json": deep(200_000)}, ["report", "t.json"], id="trace-deep"),
    pytest.param({"t.gguf": gguf_header(n_kv=1, kv=_HUGE_ARRAY_KV)}, [P, "t.gguf", *D], id="gguf-array-2**40"),
    # a FIFO with no writer would block a reader forever: model files are regular files or refused
    pytest.param({"m/config.json": ("fifo",)}, [P, "m/config.json", *D], id="config-fifo"),
    pytest.param({"f.safetensors": ("fifo",)}, [P, "f.safetensors", *D], id="safetensors-fifo"),
    pytest.param({"f.gguf": ("fifo",)}, [P, "f.gguf", *D], id="gguf-fifo"),
    pytest.param({"t.csv": ("fifo",)}, ["report", "t.csv"], id="trace-fifo"),
])
def test_no_hang_no_memory_blowup(tmp_path, files, argv):
    _make(tmp_path, files)
    before = _files_under(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vramancer.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, preexec_fn=_capped,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "VRAMANCER_CACHE_DIR": str(tmp_path / ".c")})
    _assert_one_line(proc.returncode, proc.stderr)
    assert _files_under(tmp_path) == before


# -- the Python API: the same errors, typed ---------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"reserve_bytes": float("nan")}, {"reserve_bytes": float("inf")}, {"reserve_bytes": -1},
    {"reserve_bytes": "lots"}, {"split": [math.inf, 1]}, {"split": [math.nan, 1]}, {"split": [0, 0]},
    {"split": [-1, 2]}, {"split": "3,1"}, {"split": [True, 1]}, {"context": 0}, {"context": 2.5},
    {"batch": -1}, {"prefill_chunk": 0},
], ids=repr)
def test_api_workload_errors(kwargs):
    import vramancer

    with pytest.raises(WorkloadError) as e:
        vramancer.plan("llama-3.1-8b", devices="rtx3090,rtx3060", **kwargs)
    assert "\n" not in str(e.value)


def test_api_many_devices_is_a_device_error_not_recursion():
    import vramancer
    from vramancer.errors import DeviceSpecError

    with pytest.raises(DeviceSpecError, match="at most"):
        vramancer.plan("llama-3.1-8b", devices=",".join(["rtx3090"] * 1000))


def test_distinct_orders_is_iterative():
    from vramancer.plan.partition import _distinct_orders

    limit = sys.getrecursionlimit()
    orders = _distinct_orders(list(range(limit * 2)), [("same",)] * (limit * 2))
    assert next(orders) == list(range(limit * 2))
    assert next(orders, None) is None                  # identical devices: one order
    assert len(list(_distinct_orders([0, 1, 2, 3], [("a",), ("b",), ("a",), ("c",)]))) == 12   # 4!/2!


# -- property tests: any mutated numeric config field -> a valid profile or BadInputError ----------
_NUMERIC_KEYS = sorted({k for base in BASES.values() for k, v in base.items() if isinstance(v, int)})
_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-4, max_value=4096),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 3, 7, 2**31, 2**63, 1e30, -0.0, 0.5, "8", "", None, True, False, [], [8], {}]),
    st.text(max_size=8),
)


@given(arch=st.sampled_from(sorted(BASES)), key=st.sampled_from(_NUMERIC_KEYS), value=_values)
def test_mutated_config_field_profiles_or_says_why(arch, key, value):
    from vramancer.models.arch import profile_from_config

    config = {**BASES[arch], key: value}
    try:
        prof = profile_from_config(config)
    except BadInputError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert prof.num_blocks >= 3
    assert all(b.weights_bytes >= 0 and b.kv_bytes_per_token >= 0 and b.act_bytes_per_token >= 0
               for b in prof.blocks)


@given(key=st.sampled_from(_NUMERIC_KEYS + ["sliding_window", "head_dim", "num_local_experts", "n_inner"]),
       value=_values, second=st.sampled_from(_NUMERIC_KEYS), value2=_values)
def test_two_mutated_fields_plan_or_say_why(key, value, second, value2):
    """Through the planner (a catalog-free config dict): a plan, DoesNotFit, or a BadInputError."""
    from vramancer.errors import DoesNotFitError
    from vramancer.models.arch import profile_from_config
    from vramancer.plan.planner import plan

    config = {**LLAMA, key: value, second: value2}
    try:
        result = plan(profile_from_config(config), devices="rtx3060,cpu:2GiB", context=64)
    except (BadInputError, DoesNotFitError) as e:
        assert "\n" not in str(e)
        return
    assert result.stages


@given(text=st.text(alphabet="0123456789.,-+eEinfatyx ", max_size=16))
def test_split_text_is_proportions_or_a_workload_error(text):
    from vramancer.plan.commands import parse_split

    try:
        parts = parse_split(text)
    except WorkloadError:
        return
    assert parts and all(math.isfinite(x) and x >= 0 for x in parts) and sum(parts) > 0


@given(raw=st.binary(max_size=64))
def test_any_bytes_as_json_are_parsed_or_one_error(raw):
    from vramancer._json import parse_json

    try:
        parse_json(raw, error=MalformedCheckpointError)
    except MalformedCheckpointError as e:
        assert "\n" not in str(e)


# -- the writer: never replaces what is not a regular file, never leaves .tmp ---------------------
def test_write_through_a_fifo(tmp_path):
    from vramancer._io import atomic_write

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write(fifo, "through the fifo\n")
    reader.join(timeout=30)
    assert got == [b"through the fifo\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a character device needs root")
def test_char_device_is_written_not_replaced(tmp_path, monkeypatch, capsys):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))     # the null device's numbers, in tmp only
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "llama-3.1-8b", "-d", "rtx3090", "-o", str(node), "--json"]) == 0
    capsys.readouterr()
    assert stat.S_ISCHR(os.lstat(node).st_mode) and os.lstat(node).st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["null"]


def test_symlink_is_written_through(tmp_path, monkeypatch, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("created.json")
    monkeypatch.chdir(tmp_path)
    for path in (link, dangling):
        assert main(["plan", "llama-3.1-8b", "-d", "rtx3090", "-o", str(path)]) == 0
    capsys.readouterr()
    assert link.is_symlink() and dangling.is_symlink()
    assert json.loads(target.read_text())["model"] == "llama-3.1-8b"
    assert json.loads((tmp_path / "created.json").read_text())["model"] == "llama-3.1-8b"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640          # the replaced file keeps its mode
    assert sorted(os.listdir(tmp_path)) == ["created.json", "dangling.json", "link.json", "real.json"]


def test_interrupted_write_leaves_old_file_and_no_tmp(tmp_path):
    from vramancer._io import atomic_open

    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_refused_before_the_work(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["plan", "llama-3.1-8b", "-d", "rtx3090", "-o", "ro/plan.json"])
        _assert_one_line(code, capsys.readouterr().err)
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []


# -- `report` streams: the peaks of a CSV trace, row by row, equal the whole-file analysis -------
def test_streamed_report_equals_whole_file_analysis(tmp_path):
    from vramancer.telemetry.export import read_trace, write_csv
    from vramancer.telemetry.peaks import analyse
    from vramancer.telemetry.samples import DeviceSample, ProcessSample, Snapshot
    from vramancer.telemetry.summary import summarize_file

    snaps = []
    for i in range(300):
        phase = ("load", None, "decode", "decode")[(i // 40) % 4]
        snaps.append(Snapshot(timestamp=1000.0 + i * 0.5, phase=phase, devices=[
            DeviceSample("cuda:0", "gpu", "nvml", used_bytes=(i * 7919) % 1000, total_bytes=2000),
            DeviceSample("cpu", "host", "host", used_bytes=5000 + i, total_bytes=10**6)],
            processes=[ProcessSample("cuda:0", 42, (i * 31) % 700, "python")]))
    path = write_csv(tmp_path / "t.csv", snaps)
    whole = read_trace(path)
    summary, streamed = summarize_file(path)
    assert summary.streamed and summary.samples == 300
    assert streamed.to_dict() == analyse(whole.snapshots, whole.phases).to_dict()
    # rows out of time order: read whole and sorted, the same answer as analyse gives
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "s.csv"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    summary2, report2 = summarize_file(shuffled)
    assert not summary2.streamed
    again = read_trace(shuffled)
    assert report2.to_dict() == analyse(again.snapshots, again.phases).to_dict()


# -- the disk tier's scratch: removed however the run ends ----------------------------------------
_RUNNER = textwrap.dedent("""
    import os, sys, time
    from tests.runtime.conftest import build_model, offload_plan
    from vramancer.runtime.loader import load

    mode = sys.argv[1]
    model = build_model("gpt2")
    plan = offload_plan(model, context=16)
    if mode == "full-disk":       # files may not grow past 4 KiB: the offload file cannot be written
        import resource, signal
        from vramancer.errors import VramancerError

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            load(model, plan=plan)
        except VramancerError as e:
            print(type(e).__name__, e, flush=True)
            sys.exit(0)
    load(model, plan=plan)
    print(model.vramancer.offload_dir, flush=True)
    print("ready", flush=True)
    if mode == "wait":
        time.sleep(600)
    sys.stdin.readline()            # the test has seen the folder; now end
    if mode == "raise":
        raise RuntimeError("boom")
""")


def _start(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    return subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "VRAMANCER_CACHE_DIR": str(tmp_path / "cache")})


@pytest.mark.parametrize("mode, sig", [("normal", None), ("raise", None), ("wait", signal.SIGTERM),
                                       ("wait", signal.SIGINT)])
def test_offload_scratch_removed_when_the_run_ends(tmp_path, mode, sig):
    pytest.importorskip("torch")
    proc = _start(tmp_path, mode)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert folder.is_dir() and list(folder.glob("*.safetensors"))
        if sig is not None:
            os.kill(proc.pid, sig)
        else:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    # SIGTERM and an uncaught KeyboardInterrupt end the process by their signal, as shells expect
    expected = {"normal": 0, "raise": 1}.get(mode, -sig if sig else 0)
    assert proc.returncode == expected
    assert not folder.exists()
    assert os.listdir(folder.parent) == []


def test_stale_scratch_of_a_dead_process_removed_at_next_start(tmp_path):
    pytest.importorskip("torch")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60)
    dead_pid = int(dead.stdout)
    root = tmp_path / "cache" / "offload"
    stale = root / f"{dead_pid}-killed"
    stale.mkdir(parents=True)
    (stale / "offload-1.safetensors").write_bytes(b"\0" * 64)
    alive = root / f"{os.getpid()}-alive"          # this test's own process: alive, kept
    alive.mkdir()
    proc = _start(tmp_path, "normal")
    out, err = proc.communicate("go\n", timeout=240)
    assert proc.returncode == 0, err
    assert not stale.exists() and alive.is_dir()
    assert sorted(os.listdir(root)) == [alive.name]


def test_unusable_paths_are_bad_input_not_value_errors(tmp_path):
    from vramancer._io import atomic_write, check_writable

    for path in ("a\0b", "", tmp_path / "nodir" / "x", tmp_path):
        with pytest.raises(BadInputError):
            check_writable(path, "-o")
    long_name = tmp_path / ("n" * 250)          # the temporary name beside it stays within 255 bytes
    atomic_write(long_name, "ok")
    assert long_name.read_text() == "ok" and os.listdir(tmp_path) == [long_name.name]


def test_csv_trace_with_a_byte_order_mark_reads(tmp_path):
    from vramancer.telemetry.summary import summarize_file

    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + trace_csv([{"used_bytes": "7"}]).encode())
    summary, report = summarize_file(path)
    assert summary.samples == 1 and report.devices[0].peak_used_bytes == 7


def test_report_plot_draws_from_evenly_spaced_samples_with_exact_peaks(tmp_path):
    pytest.importorskip("matplotlib")
    from vramancer.telemetry.export import write_csv
    from vramancer.telemetry.samples import DeviceSample, Snapshot
    from vramancer.telemetry.summary import summarize_file

    snaps = [Snapshot(timestamp=float(i), phase="decode" if i > 500 else "load",
                      devices=[DeviceSample("cuda:0", "gpu", "nvml", used_bytes=i if i != 777 else 10**6,
                                            total_bytes=2 * 10**6)]) for i in range(1001)]
    path = write_csv(tmp_path / "t.csv", snaps)
    summary, report = summarize_file(path, keep=100)
    assert 100 <= len(summary.kept) < 200 and summary.kept[0].timestamp == 0.0
    gaps = {b.timestamp - a.timestamp for a, b in zip(summary.kept, summary.kept[1:])}
    assert len(gaps) == 1                                   # evenly spaced
    assert report.devices[0].peak_used_bytes == 10**6       # the peak sample itself need not be kept
    assert [p.name for p in summary.phases] == ["load", "decode"]
    assert main(["report", str(path), "--plot", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monitor_trace_kept_when_its_folder_goes_away_during_sampling(tmp_path, monkeypatch):
    import tempfile

    from vramancer.errors import VramancerError
    from vramancer.telemetry.recorder import Recorder
    from vramancer.ui.commands.monitor import _export_or_keep

    keep = tmp_path / "tmp"
    keep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(keep))
    rec = Recorder(samplers=[])
    rec.sample_once()
    rec.sample_once()
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "t.csv"
    (tmp_path / "out").rmdir()                      # checked at the start, a file by the end
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(VramancerError, match="the samples are kept in") as e:
        _export_or_keep(rec, target)
    assert "\n" not in str(e.value)
    (kept,) = keep.glob("vramancer-trace-*.csv")
    assert kept.read_text().startswith("timestamp,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]


def test_an_error_quoting_a_huge_input_stays_one_readable_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(cfg(model_type="m" * 1_000_000))
    code = main(["plan", "config.json", "-d", "rtx3090"])
    err = capsys.readouterr().err
    _assert_one_line(code, err)
    assert len(err) < 3000 and "more characters)" in err
    assert main(["plan", "llama-3.1-8b", "--objective", "x" * 100_000]) == 2
    err = capsys.readouterr().err
    _assert_one_line(2, err)
    assert len(err) < 3000


def test_offload_folder_under_an_unusable_cache_is_one_error(tmp_path):
    from vramancer.runtime.scratch import make_offload_dir

    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(BadInputError, match="VRAMANCER_CACHE_DIR"):
        make_offload_dir(blocker / "offload")
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_offload_write_failure_is_one_error_and_leaves_nothing(tmp_path):
    pytest.importorskip("torch")
    proc = _start(tmp_path, "full-disk")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.startswith("VramancerError cannot write the disk tier's offload file") and out.count("\n") == 1
    assert os.listdir(tmp_path / "cache" / "offload") == []


# -- a real model folder whose side files (read by transformers, not by us) are malformed ---------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.runtime.conftest import VOCAB, build_model

    folder = tmp_path_factory.mktemp("side") / "gpt2"
    build_model("gpt2").save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="t2").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", deep()), ("tokenizer_config.json", deep()), ("generation_config.json", deep()),
    ("generation_config.json", b"\xff\xfe"), ("special_tokens_map.json", ""), ("tokenizer.json", '{"a": 1}'),
    ("config.json", deep()),
], ids=["tokenizer-deep", "tokenizer-config-deep", "generation-config-deep", "generation-config-binary",
        "special-tokens-empty", "tokenizer-wrong-shape", "config-deep"])
def test_malformed_side_files_of_a_model_folder(model_folder, tmp_path, monkeypatch, capsys, name, content):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / ".cache"))
    before = _files_under(tmp_path)
    code = main(["run", "m", "-p", "t1 t2", "-n", "2", "-d", "rtx3090", "--json"])
    _assert_one_line(code, capsys.readouterr().err)
    assert _files_under(tmp_path) == before
