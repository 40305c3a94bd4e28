"""`vramancer cluster start | status | stop` (a real `ray start` head with token auth, inside a network
namespace the test creates), `run --cluster` and `serve --cluster` against it, and the bad inputs
refused in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess

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
    (["serve", "m", "--cluster", "10.0.0.1:6379", "--port", "0", "--max-batch", "4"], "--max-batch"),
    (["serve", "m", "--cluster", "10.0.0.1:6379", "--port", "0", "--pipeline-lanes", "2"], "--pipeline-lanes"),
    (["serve", "m", "--cluster", "10.0.0.1:6379", "--port", "0", "--devices", "cpu"], "--devices"),
    (["cluster", "start", "--host", "10.0.0.1", "--num-cpus", "-3"], "--num-cpus"),
    (["cluster", "join", "127.0.0.1:6379", "--token", "a" * 32], "loopback"),
    (["cluster", "join", "[::1]:6379", "--token", "a" * 32], "loopback"),
    (["run", "m", "--cluster", "10.0.0.1:6379", "-p", "x", "--kv-dtype", "q8_0"], "--kv-dtype"),
    (["run", "m", "--cluster", "10.0.0.1:6379", "-p", "x", "--dtype", "nf4"], "quantized on load"),
    (["serve", "m", "--cluster", "10.0.0.1:6379", "--port", "0", "--quant-backend", "torchao"], "--quant-backend"),
    (["plan", "m", "--cluster", "10.0.0.1:6379", "--link", "tcp"], "--trusted-network"),
    (["run", "m", "--cluster", "10.0.0.1:6379", "-p", "x", "--link", "torch"], "--trusted-network"),
    (["serve", "m", "--cluster", "10.0.0.1:6379", "--port", "0", "--link", "tcp"], "--trusted-network"),
    (["run", "m", "--cluster", "10.0.0.1:6379", "-p", "x", "--temperature", "0.7", "--top-p", "1.5"], "--top-p"),
    (["run", "m", "--cluster", "10.0.0.1:6379", "-p", "x", "--temperature", "-1"], "--temperature"),
    (["run", "m", "-p", "x", "--trusted-network"], "goes with --cluster"),
    (["plan", "m", "--link", "tls"], "goes with --cluster"),
    (["serve", "m", "--port", "0", "--trusted-network"], "goes with --cluster"),
])
def test_bad_input_is_one_line_exit_2(node_home, capsys, argv, words):
    assert main(argv) == 2
    assert words in _one_error_line(capsys)


def _free_port() -> int:
    """A port free on this machine (the namespace's ports are all free but for what the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLIENT = """
import json, sys, urllib.error, urllib.request
url, key, body = sys.argv[1], sys.argv[2], sys.argv[3]
def post(key, body):
    req = urllib.request.Request(url, data=body.encode(), headers={"content-type": "application/json",
                                                                   "authorization": "Bearer " + key})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
wrong, _ = post("not-" + key, body)
status, text = post(key, body)
b = json.loads(body)
b["stream"] = True
_, events = post(key, json.dumps(b))
chunks = [json.loads(ln[6:]) for ln in events.splitlines() if ln.startswith("data: {")]
stream = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
print(json.dumps({"wrong_key": wrong, "status": status, "body": json.loads(text), "stream": stream}))
"""


def _serve_one_completion(ns, env: dict, folder, address: str, prompt: str, max_tokens: int) -> dict:
    """`serve --cluster` on the namespace's address with an API key; a client inside the namespace
    sends one completion with a wrong key, then with the key, then streamed. The server is stopped
    (SIGTERM, the pid this test started) before returning; its stderr comes back as ``log``."""
    import time

    key = "k" * 24
    port = _free_port()
    srv = subprocess.Popen(ns.python("-m", "vramancer", "serve", str(folder), "--cluster", address, "--context", "64",
                                     "--host", ns.address, "--port", str(port), "--api-key", key,
                                     "--telemetry-interval", "0"),
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = srv.stderr.readline()
            if not line:
                break
            log.append(line)
            if line.startswith("vramancer: serving"):
                break
        assert log and log[-1].startswith("vramancer: serving") and f"from the cluster {address}" in log[-1], log
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        p = subprocess.run(ns.python("-c", _CLIENT, f"http://{ns.address}:{port}/v1/completions", key, body),
                           capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
    finally:
        srv.terminate()
        try:
            rest = srv.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            srv.kill()
            rest = srv.communicate(timeout=10)[1]
    out["log"] = "".join(log) + (rest or "")
    # SIGTERM: uvicorn shuts down, then re-raises it, which Ray's driver handler turns into exit(15)
    assert srv.returncode in (0, 15), out["log"][-3000:]
    assert "vramancer: the cluster's stage workers are closed" in out["log"]
    return out


def _one_process_sampled(folder, plan_dict: dict, prompt: str, n: int, temperature: float, top_p: float,
                         seed: int) -> str:
    """The text one process draws from the same plan with serve's Sampler (stopping at EOS as run does)."""
    from transformers import AutoTokenizer

    from vramancer.plan.plan import Plan
    from vramancer.runtime.sampling import Sampler, SamplingParams

    from .test_pipeline import single_process_tokens

    tok = AutoTokenizer.from_pretrained(folder)
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    ids = single_process_tokens(folder, Plan.from_dict(plan_dict), sampler, tok(prompt)["input_ids"], n)
    if 2 in ids:        # the tiny model's EOS id
        ids = ids[:ids.index(2) + 1]
    return tok.decode(ids, skip_special_tokens=True)


def test_start_status_run_stop(node_home, tmp_path, cluster_ns):
    """Every process runs inside the test's network namespace, on its address (Ray refuses loopback)."""
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
    host, port = cluster_ns.address, _free_port()

    def _vramancer(env: dict, *argv: str) -> subprocess.CompletedProcess:
        """`vramancer ARGV` inside the namespace, in a process of its own (Ray's connection is per process)."""
        return subprocess.run(cluster_ns.python("-m", "vramancer", *argv), env=env, capture_output=True,
                              text=True, timeout=180)

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
        # the driver and its one stage share node1: both hops are shared memory, in the plan and in the run
        assert [(h["src"], h["dst"], h["transport"]) for h in res["plan"]["hops"]] == [
            ("driver", "stage 0", "shm"), ("stage 0", "driver", "shm")]
        assert (res["stages"][0]["transport_in"], res["stages"][0]["transport_out"]) == ("shm", "shm")
        # sampled: the driver draws with serve's Sampler seeded by --seed, as one process does from the same plan
        sampling = ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]
        p = _vramancer(env, "run", str(folder), "--cluster", address, "--context", "64", "-p", "t5 t9 t17 t33",
                       "-n", "5", "--json", *sampling)
        assert p.returncode == 0, p.stderr
        sampled = json.loads(p.stdout)
        assert sampled["text"] == _one_process_sampled(folder, sampled["plan"], "t5 t9 t17 t33", 5, 0.9, 0.9, 7)
        assert sampled["text"] != res["text"]

        served = _serve_one_completion(cluster_ns, env, folder, address, "t5 t9 t17 t33", 5)
        assert served["wrong_key"] == 401
        assert served["status"] == 200, served
        (choice,) = served["body"]["choices"]
        assert choice["text"] == res["text"] and choice["finish_reason"] == "length"
        assert served["body"]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
        assert served["stream"] == res["text"]    # streamed token by token, the same text
        assert "POST /v1/completions 200 tokens=4+5" in served["log"]
    finally:
        p = _vramancer(env, "cluster", "stop")
    assert p.returncode == 0 and "stopped the cluster head" in p.stdout
    assert _processes_of(state.temp_dir) == [] and ClusterState.load() is None
