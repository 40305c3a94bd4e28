"""Fixtures for the real-ComfyUI tests: the cached ComfyUI + venv (comfyui_env.py), the tiny SD1.5
checkpoint and LoRA (comfy_fixture_build.py, cached next to the venv), and a headless ComfyUI server
on the CPU with its own base directory, VRAMancer's loader installed by ``vramancer comfyui install``.
Everything is skipped, saying so, only when the ComfyUI tarball is absent."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .comfyui_env import REPO_ROOT, ComfyEnv, build_comfy_env, cache_lock, find_tarball

SERVER_START_TIMEOUT_S = 180
PROMPT_TIMEOUT_S = 300
_FIXTURE_SCRIPT = Path(__file__).with_name("comfy_fixture_build.py")


@dataclass
class ComfyServer:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path}: HTTP {e.code}: {e.read()[:4000]!r}") from None
        return json.loads(data) if data else {}

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def run(self, workflow: dict) -> dict:
        """Queue ``workflow`` (API format), wait for it, return its /history entry (fails on an error)."""
        pid = self.post("/prompt", {"prompt": workflow, "client_id": "vramancer-tests"})["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            entry = hist.get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise AssertionError(f"prompt failed: {json.dumps(status.get('messages'))[:4000]}\n"
                                         f"{self.log_tail()}")
                return entry
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"prompt {pid} did not finish in {PROMPT_TIMEOUT_S} s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def comfy_env() -> ComfyEnv:
    tarball = find_tarball()
    if tarball is None:
        pytest.skip("ComfyUI tarball absent (../shared/thirdparty/ComfyUI-*.tar.gz or $VRAMANCER_COMFYUI_TARBALL): "
                    "the real-ComfyUI tests need it")
    env = build_comfy_env(tarball)
    if env.build_seconds:
        print(f"\nComfyUI venv built in {env.build_seconds:.1f} s", file=sys.stderr)
    return env


@pytest.fixture(scope="session")
def comfy_models(comfy_env: ComfyEnv) -> Path:
    """The tiny SD1.5 checkpoint and its LoRA, built once per builder version."""
    key = hashlib.sha256(_FIXTURE_SCRIPT.read_bytes()).hexdigest()[:12]
    out = comfy_env.comfy_dir.parent / f"models-{key}"
    with cache_lock("comfyui-models"):
        if not (out / "tiny-sd15.safetensors").is_file() or not (out / "tiny-sd15-lora.safetensors").is_file():
            subprocess.run([str(comfy_env.python), str(_FIXTURE_SCRIPT), str(comfy_env.comfy_dir), str(out)],
                           check=True, timeout=600)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(comfy_env: ComfyEnv, comfy_models: Path, base: Path, *, cpu: bool = True):
    """A ComfyUI with its own base directory, the loader installed by ``vramancer comfyui install``;
    yields the ComfyServer, then stops that process (by pid)."""
    for sub in ("models/checkpoints", "models/loras", "custom_nodes", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True)
    (base / "models/checkpoints/tiny-sd15.safetensors").symlink_to(comfy_models / "tiny-sd15.safetensors")
    (base / "models/loras/tiny-sd15-lora.safetensors").symlink_to(comfy_models / "tiny-sd15-lora.safetensors")
    done = subprocess.run([sys.executable, "-m", "vramancer", "comfyui", "install", str(base)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    port = _free_port()
    log = base / "comfyui.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("PYTHONPATH", None)
    argv = [str(comfy_env.python), "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--base-directory", str(base)] + (["--cpu"] if cpu else [])
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=comfy_env.comfy_dir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log, proc)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({proc.returncode}) while starting:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not answer in {SERVER_START_TIMEOUT_S} s:\n"
                                         f"{server.log_tail()}") from None
                time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()        # by pid: only the ComfyUI this fixture started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def comfy_server(comfy_env: ComfyEnv, comfy_models: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _start_server(comfy_env, comfy_models, tmp_path_factory.mktemp("comfy-base"))


@pytest.fixture(scope="module")
def comfy_gpu_server(comfy_env: ComfyEnv, comfy_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI on this machine's CUDA GPU (its default device), for ``gpu``-marked tests."""
    yield from _start_server(comfy_env, comfy_models, tmp_path_factory.mktemp("comfy-gpu-base"), cpu=False)
