"""`vramancer cluster start | status | stop` on this machine (a real `ray start` head with token
auth), `plan --cluster` and `run --cluster` against it, and the bad inputs refused in one line."""
from __future__ import annotations

import json
import socket

import pytest

from vramancer.cli import main

from .conftest import ray, torch  # noqa: F401  (skips without Ray / torch)


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


def test_start_status_plan_run_stop(node_home, capsys, tmp_path):
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

    host, port = _machine_address(), _free_port()
    address = f"{host}:{port}"
    assert main(["cluster", "start", "--host", host, "--port", str(port), "--num-cpus", "1",
                 "--devices", "cpu:16GiB"]) == 0
    state = ClusterState.load()
    try:
        out = capsys.readouterr().out
        fp = load_identity().fingerprint
        assert f"this node's Link fingerprint: {fp}" in out
        join = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("vramancer cluster join")]
        token = (node_home / "cluster" / "token").read_text().strip()
        assert join == [f"vramancer cluster join {address} --token {token}"]
        assert (node_home / "cluster" / "token").stat().st_mode & 0o777 == 0o600
        assert _processes_of(state.temp_dir)

        assert main(["cluster", "status", "--json", "--probe-bytes", "64KiB"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["driver_node"] == "node1" and st["links"] == []
        (node,) = st["nodes"]
        assert node["fingerprint"] == fp and node["address"] == host and node["is_head"]
        assert [d["id"] for d in node["devices"]] == ["node1/cpu"] and node["link_port"] > 0

        assert main(["plan", str(folder), "--cluster", address, "--context", "64", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert [s["device"] for s in plan["stages"]] == ["node1/cpu"]
        assert any("cluster: driver(node1) -> node1 -> driver(node1)" in n for n in plan["notes"])

        assert main(["run", str(folder), "--cluster", address, "--context", "64", "-p", "t5 t9 t17 t33",
                     "-n", "5", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["tokens"] == 5 and res["stages"][0]["forwards"] == 5
        assert res["stages"][0]["loaded_from"] == f"local copy {folder}"
    finally:
        assert main(["cluster", "stop"]) == 0
    assert "stopped the cluster head" in capsys.readouterr().out
    assert _processes_of(state.temp_dir) == [] and ClusterState.load() is None
