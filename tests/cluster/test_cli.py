"""`vramancer cluster start | status | stop` on this machine (a real `ray start` head with token
auth), `run --cluster` against it, and the bad inputs refused in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from vramancer.cli import main

from .conftest import RAY_MISSING

ray = pytest.importorskip("ray", reason=RAY_MISSING)
pytest.importorskip("torch")


@pytest.fixture
def node_home(tmp_path, monkeypatch):
    """This machine's config (keys, token, cluster state) under tmp; Ray's auth variables restored after."""
    monkeypatch.setenv("VRAMANCER_CONFIG", str(tmp_path / "config.toml"))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vramancer: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, words", [
    (["cluster", "start", "--host", "127.0.0.1"], "loopback"),
    (["cluster", "join", "no-port-here", "--token", "a" * 32], "HOST:PORT"),
    (["cluster", "join", "10.0.0.1:6379"], "--token"),
    (["cluster", "join", "10.0.0.1:6379", "--token", "short"], "16 printable"),
    (["cluster", "start", "--host", "10.0.0.1", "--devices", "nonsense-gpu"], "nonsense-gpu"),
    (["cluster", "status"], "which cluster"),
])
def test_bad_input_is_one_line_exit_2(node_home, capsys, argv, words):
    assert main(argv) == 2
    assert words in _one_error_line(capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _machine_address() -> str:
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address for a Ray head")
    return ip


def _vramancer(env: dict, *argv: str) -> subprocess.CompletedProcess:
    """`vramancer ARGV` in a process of its own: Ray's connection and auth settings are per process,
    and the pipeline tests hold one in this process."""
    return subprocess.run([sys.executable, "-m", "vramancer", *argv], env=env, capture_output=True, text=True,
                          timeout=180)


def test_start_status_run_stop(node_home, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vramancer.cluster.control import ClusterState, _processes_of
    from vramancer.link.keys import load_identity

    from .conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "model")
    vocab = {f"t{i}": i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["VRAMANCER_CONFIG"] = str(node_home / "config.toml")
    host, port = _machine_address(), _free_port()
    address = f"{host}:{port}"
    p = _vramancer(env, "cluster", "start", "--host", host, "--port", str(port), "--num-cpus", "1",
                   "--devices", "cpu:16GiB")
    assert p.returncode == 0, p.stderr
    state = ClusterState.load()
    try:
        fp = load_identity().fingerprint
        assert f"this node's Link fingerprint: {fp}" in p.stdout
        join = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("vramancer cluster join")]
        token = (node_home / "cluster" / "token").read_text().strip()
        assert join == [f"vramancer cluster join {address} --token {token}"]
        assert (node_home / "cluster" / "token").stat().st_mode & 0o777 == 0o600
        assert _processes_of(state.temp_dir)

        p = _vramancer(env, "cluster", "status", "--json", "--probe-bytes", "64KiB")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["driver_node"] == "node1" and st["links"] == []
        (node,) = st["nodes"]
        assert node["fingerprint"] == fp and node["address"] == host and node["is_head"]
        assert [d["id"] for d in node["devices"]] == ["node1/cpu"] and node["link_port"] > 0
        p = _vramancer(env, "cluster", "status", address, "--probe-bytes", "64KiB")
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == f"cluster {address}: 1 nodes"
        assert lines[1].startswith(f"  node1  {host} (") and lines[1].endswith("head, this machine)")
        assert lines[2].split() == ["key", fp] and lines[3].split()[0] == "link"
        assert lines[4].split()[:3] == ["node1/cpu", "cpu", "16.0"]

        p = _vramancer(env, "run", str(folder), "--cluster", address, "--context", "64", "-p", "t5 t9 t17 t33",
                       "-n", "5", "--json")
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["tokens"] == 5 and res["stages"][0]["forwards"] == 5
        assert res["stages"][0]["loaded_from"] == f"local copy {folder}"
        assert [s["device"] for s in res["plan"]["stages"]] == ["node1/cpu"]
        assert any("cluster: driver(node1) -> node1 -> driver(node1)" in n for n in res["plan"]["notes"])
    finally:
        p = _vramancer(env, "cluster", "stop")
    assert p.returncode == 0 and "stopped the cluster head" in p.stdout
    assert _processes_of(state.temp_dir) == [] and ClusterState.load() is None
