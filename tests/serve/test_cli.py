"""`vramancer serve`: safe defaults refused in one line, and the real command serving a split model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from vramancer.cli import main
from vramancer.serve.server import check_bind, is_loopback

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_public_host_without_key_is_refused_in_one_line(host, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("VRAMANCER_API_KEY", raising=False)
    assert main(["serve", str(tmp_path), "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to listen on" in err and "--api-key" in err


def test_loopback_and_key_rules():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.8.9.10"):
        assert is_loopback(host)
        check_bind(host, None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, True)


def test_bad_flags_are_one_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert main(["serve", str(tmp_path), "--api-key-file", str(tmp_path / "missing")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("vramancer: error: ") for line in lines)


def test_serve_command_end_to_end(tiny_path, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sekret\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("VRAMANCER_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vramancer", "serve", str(tiny_path), "--devices", "rtx3060,rtx3060",
         "--split", "1,1", "--context", "128", "--batch", "2", "--port", "0", "--api-key-file", str(key_file),
         "--served-model-name", "tiny-split", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "serving tiny-split at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)
        line = next(x for x in lines if "serving tiny-split at" in x)
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "2 stage(s)" in line and "context 128" in line
        with openai.OpenAI(base_url=url, api_key="sekret", max_retries=0, timeout=60) as client:
            assert [m.id for m in client.models.list().data] == ["tiny-split"]
            r = client.chat.completions.create(model="tiny-split", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8
            with pytest.raises(openai.BadRequestError, match="planned context of 128"):
                client.completions.create(model="tiny-split", prompt="Hi", max_tokens=200)
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, "".join(lines)  # Ctrl-C: the conventional 128 + SIGINT
    assert "Traceback" not in "".join(lines)
