"""The live-view subcommands as a person runs them: `monitor --no-tui` lines through a pipe,
`--duration`, `--export`, `--replay`, the dashboard on a free loopback port, and one clear
line with the right exit code for bad input."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vramancer.cli import main as cli_main
from vramancer.telemetry.recorder import Recorder

from .scripted import GiB, ScriptedSampler

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (.+)$")


def _vramancer(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vramancer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=environ, stdin=subprocess.DEVNULL)


def test_monitor_no_tui_simulated_devices_lines():
    r = _vramancer("monitor", "--no-tui", "--devices", "rtx3090,rtx3060", "--interval", "0.1", "--duration", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert 2 <= len(lines) <= 40
    for line in lines:
        m = LINE.match(line)
        assert m, line
        assert m.group(1) == "rtx3090#0 0.00/24.00 GiB | rtx3060-12gb#0 0.00/12.00 GiB"
    stamps = [line.split(" ", 1)[0] for line in lines]
    assert stamps == sorted(stamps)


def test_monitor_replay_export_and_piped_stdout(tmp_path):
    # A recorded trace with a known ramp: the replay prints only values from it, and --export
    # writes what was shown.
    sampler = ScriptedSampler()
    rec = Recorder(samplers=[sampler], interval=0.05)
    with rec.phase("load"):
        for i in range(1, 6):
            sampler.used["rtx3090#0"] = i * GiB
            rec.sample_once()
            time.sleep(0.05)
    trace = rec.to_json(tmp_path / "trace.json")
    out = tmp_path / "seen.csv"
    # No --no-tui: stdout is a pipe, so the monitor prints lines and says so on stderr.
    r = _vramancer("monitor", "--replay", str(trace), "--interval", "0.05", "--duration", "1", "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert "not a terminal" in r.stderr and f"wrote {out}" in r.stderr
    recorded = {f"rtx3090#0 {i}.00/24.00 GiB | rtx3060#0 3.00/12.00 GiB phase=load" for i in range(1, 6)}
    shown = [LINE.match(line).group(1) for line in r.stdout.splitlines()]
    assert shown and set(shown) <= recorded
    assert shown[0].startswith("rtx3090#0 1.00/")          # the replay starts at the start
    header, *rows = out.read_text().splitlines()
    assert "used_bytes" in header and len(rows) >= 2 * len(shown)


@pytest.mark.parametrize("args, message", [
    (["monitor", "--no-tui", "--export", "trace.txt"], "must end in .csv or .json"),
    (["monitor", "--no-tui", "--interval", "0.01"], "--interval must be at least 0.05"),
    (["monitor", "--no-tui", "--duration", "-1"], "--duration must be 0 or more"),
    (["monitor", "--no-tui", "--devices", "no-such-gpu-9000"], "no-such-gpu-9000"),
    (["monitor", "--no-tui", "--replay", "/nonexistent/trace.json"], "trace.json"),
    (["monitor", "--no-tui", "--replay", "x.json", "--devices", "rtx3090"], "do not go together"),
    (["dashboard", "--host", "0.0.0.0"], "--insecure"),
    (["dashboard", "--port", "70000"], "--port must be 0..65535"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vramancer: error: ") and "\n" not in err and message in err


def test_gui_without_display_says_so(capsys, monkeypatch):
    pytest.importorskip("PySide6.QtWidgets")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    if sys.platform != "linux":
        pytest.skip("display detection is for Linux")
    assert cli_main(["gui", "--devices", "rtx3090", "--duration", "0"]) == 1
    assert "needs a display" in capsys.readouterr().err


def test_dashboard_command_serves_on_loopback_until_ctrl_c():
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vramancer", "dashboard", "--port", "0", "--devices", "rtx3090",
                             "--interval", "0.1"], cwd=REPO, env=environ,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert m, first
        url = m.group(0)
        body = None
        for _ in range(300):                        # until the recorder's first sample is in (bounded)
            body = httpx.get(url + "api/snapshot", timeout=30).json()
            if body["snapshot"]:
                break
            time.sleep(0.1)
        assert body["snapshot"]["devices"][0]["device"] == "rtx3090#0"
        assert body["snapshot"]["devices"][0]["total_bytes"] == 24 * GiB
        metrics = httpx.get(url + "metrics", timeout=30).text
        assert 'vramancer_gpu_memory_total_bytes{device="rtx3090#0"' in metrics
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130          # Ctrl-C: the CLI's exit code for an interrupt
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_dashboard_stops_by_itself_after_duration():
    r = _vramancer("dashboard", "--port", "0", "--devices", "rtx3090", "--interval", "0.1", "--duration", "0.5")
    assert r.returncode == 0, r.stderr
    assert "http://127.0.0.1:" in r.stderr


def test_dashboard_port_in_use_is_one_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli_main(["dashboard", "--port", str(port), "--devices", "rtx3090", "--duration", "0"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err
