"""A loopback Hub per test ($HF_ENDPOINT -> 127.0.0.1), a temp HF cache, and tiny real models."""
from __future__ import annotations

import pytest

from .hubserver import HubServer


@pytest.fixture(autouse=True)
def _caches_in_tmp(tmp_path, monkeypatch):
    """The HF cache and VRAMancer's cache under tmp_path for every test, never the user's."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "vramancer-cache"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A started loopback Hub; HF_HOME / HF_HUB_CACHE under tmp_path; plain HTTP (no Xet)."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "vramancer-cache"))
    yield server
    server.stop()
