"""The web dashboard served on 127.0.0.1 (uvicorn in a thread, free port): the JSON API, the
SSE stream, Prometheus /metrics parsed back, offline assets, and the page in headless Chromium
with its charts present and updating."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from vramancer.telemetry.recorder import Recorder  # noqa: E402
from vramancer.ui.web.app import STATIC_DIR, create_app  # noqa: E402
from vramancer.ui.web.server import ThreadedServer  # noqa: E402

from .cdp import Chromium, find_chromium  # noqa: E402
from .scripted import ScriptedSampler  # noqa: E402

GiB = 2**30


@pytest.fixture
def served(recorder):
    with ThreadedServer(create_app(recorder, interval_s=0.05)) as server:
        yield server


def test_snapshot_schema(served, recorder, sampler):
    empty = httpx.get(served.url + "/api/snapshot", timeout=10).json()
    assert empty["schema"] == 1 and empty["snapshot"] is None and empty["devices"] == []
    with recorder.phase("load"):
        recorder.sample_once()
    sampler.used["rtx3090#0"] = 20 * GiB
    recorder.sample_once()
    r = httpx.get(served.url + "/api/snapshot", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"schema", "interval_s", "devices", "snapshot", "peaks", "display"}
    assert body["interval_s"] == 0.05
    assert body["devices"] == ["rtx3090#0", "rtx3060#0"]
    snap = body["snapshot"]
    assert set(snap) >= {"timestamp", "phase", "devices", "processes", "missing"}
    dev = {d["device"]: d for d in snap["devices"]}
    assert dev["rtx3090#0"]["used_bytes"] == 20 * GiB and dev["rtx3090#0"]["total_bytes"] == 24 * GiB
    assert dev["rtx3090#0"]["power_w"] is None and dev["rtx3090#0"]["missing"] == ["power_w"]
    assert snap["processes"] == [{"device": "rtx3090#0", "pid": 4242, "used_bytes": 5 * GiB, "name": "python"}]
    peak = {p["device"]: p for p in body["peaks"]["devices"]}["rtx3090#0"]
    assert peak["peak_used_bytes"] == 20 * GiB and peak["headroom_bytes"] == 4 * GiB
    assert [p["name"] for p in body["peaks"]["phases"]] == ["load"]
    shown = body["display"]["devices"]["rtx3090#0"]
    assert shown["usage"] == "20.00 / 24.00 GiB (83%)" and "power: n/a (not supported)" in shown["details"]


def test_history_limit_and_since(served, recorder, sampler):
    stamps = []
    for i in range(5):
        sampler.used["rtx3060#0"] = i * GiB
        stamps.append(recorder.sample_once().timestamp)
    hist = httpx.get(served.url + "/api/history", timeout=10).json()
    assert hist["schema"] == 1 and [s["timestamp"] for s in hist["snapshots"]] == stamps
    last2 = httpx.get(served.url + "/api/history", params={"limit": 2}, timeout=10).json()["snapshots"]
    assert [s["timestamp"] for s in last2] == stamps[-2:]
    since = httpx.get(served.url + "/api/history", params={"since": stamps[2]}, timeout=10).json()["snapshots"]
    used = [[d["used_bytes"] for d in s["devices"] if d["device"] == "rtx3060#0"][0] for s in since]
    assert used == [3 * GiB, 4 * GiB]
    assert httpx.get(served.url + "/api/history", params={"limit": 0}, timeout=10).status_code == 422


def test_metrics_parse_back(served, recorder, sampler):
    sampler.power_w = 215.0
    recorder.sample_once()
    r = httpx.get(served.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, s.labels.get("device"))] = s.value
    assert samples[("vramancer_gpu_memory_used_bytes", "rtx3090#0")] == 6 * GiB
    assert samples[("vramancer_gpu_memory_total_bytes", "rtx3060#0")] == 12 * GiB
    assert samples[("vramancer_gpu_power_watts", "rtx3090#0")] == 215.0
    assert samples[("vramancer_process_gpu_memory_used_bytes", "rtx3090#0")] == 5 * GiB


def test_events_stream_pushes_new_snapshots(served, recorder, sampler):
    got: list[dict] = []
    stop = threading.Event()

    def feed() -> None:   # samples until the stream has delivered two (at most 60 s)
        for i in range(1200):
            if stop.is_set():
                return
            sampler.used["rtx3090#0"] = (i % 24) * GiB
            recorder.sample_once()
            time.sleep(0.05)

    feeder = threading.Thread(target=feed, daemon=True)
    with httpx.stream("GET", served.url + "/api/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        feeder.start()
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "snapshot":
                got.append(json.loads(line.split(":", 1)[1]))
                if len(got) == 2:
                    break
    stop.set()
    feeder.join(10)
    assert len(got) == 2
    assert got[0]["snapshot"]["timestamp"] < got[1]["snapshot"]["timestamp"]
    assert "peaks" in got[0] and got[0]["display"]["peaks"][0][0] == "rtx3090#0"
    assert {d["device"] for d in got[1]["snapshot"]["devices"]} == {"rtx3090#0", "rtx3060#0"}


def test_page_and_assets_are_served_locally(served):
    page = httpx.get(served.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    external = [u for u in refs if re.match(r"^(https?:)?//", u)]
    assert external == []                        # nothing from a CDN: works offline
    assets = [u for u in refs if u.startswith("static/")]
    wanted = {"static/uPlot.iife.min.js", "static/uPlot.min.css", "static/dashboard.js", "static/dashboard.css"}
    assert wanted <= set(assets)
    for asset in assets:
        r = httpx.get(f"{served.url}/{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 100, asset
    for path in STATIC_DIR.iterdir():
        if path.suffix in (".js", ".css", ".html"):
            assert not re.search(r"https?://(?!github\.com/leeoniya)", path.read_text()), path.name
    assert (STATIC_DIR / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")


def test_stop_ends_open_streams(recorder):
    server = ThreadedServer(create_app(recorder, interval_s=0.05)).start()
    opened = threading.Event()

    def listen() -> None:
        try:
            with httpx.stream("GET", server.url + "/api/events", timeout=30) as r:
                opened.set()
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(10)
    server.stop(timeout_s=15)
    t.join(15)
    assert not t.is_alive() and not server._thread.is_alive()


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_in_headless_chromium(screenshots):
    sampler = ScriptedSampler()
    rec = Recorder(samplers=[sampler], interval=0.1)
    step = {"i": 0}
    real_sample = sampler.sample

    def ramp():                                   # a load ramp then a plateau: something to see
        i = step["i"] = step["i"] + 1
        sampler.used["rtx3090#0"] = int(min(i, 40) * 0.5 * GiB)
        sampler.used["rtx3060#0"] = int(min(i, 30) * 0.3 * GiB)
        return real_sample()

    sampler.sample = ramp
    with rec.phase("load"):
        for _ in range(15):                       # history the page loads first
            rec.sample_once()
    server = ThreadedServer(create_app(rec, interval_s=0.1))
    with rec, rec.phase("generate"), server, Chromium(find_chromium()) as browser:
        browser.open(server.url + "/")
        browser.wait_for("document.querySelectorAll('.card canvas').length >= 2")
        samples = "Number(document.body.dataset.samples)"
        first = browser.wait_for(f"{samples} >= 16 && {samples}")
        points_first = browser.evaluate("Number(document.querySelector('[data-device=\"rtx3090#0\"]').dataset.points)")
        # The SSE stream keeps it moving: more samples, more chart points, a later last timestamp.
        later = browser.wait_for(f"{samples} >= {first + 5} && {samples}")
        points_later = browser.evaluate("Number(document.querySelector('[data-device=\"rtx3090#0\"]').dataset.points)")
        assert later >= first + 5 and points_later > points_first
        assert browser.evaluate("document.body.dataset.connected") == "true"
        used = browser.evaluate("Number(document.querySelector('[data-device=\"rtx3090#0\"]').dataset.lastUsed)")
        assert used > 0 and used % (GiB // 2) == 0
        browser.wait_for("document.querySelector('#processes tbody').textContent.includes('4242')")
        browser.wait_for("document.querySelector('#peaks tbody').textContent.includes('rtx3090#0')")
        browser.wait_for("document.getElementById('top-phases').textContent.startsWith('top phases: ')")
        text = browser.evaluate("document.body.innerText")
        assert "power: n/a (not supported)" in text and "NVIDIA GeForce RTX 3090" in text
        browser.wait_for(f"{samples} >= {later + 5}")   # a few more points for the picture
        shot = browser.screenshot(screenshots / "dashboard.png")
    assert shot.stat().st_size > 10_000
