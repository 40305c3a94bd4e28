"""VRAMancer's nodes inside a real ComfyUI (v0.3.64, headless on the CPU; see conftest.py).

A tiny SD1.5 single-file checkpoint that ComfyUI detects as SD1.5 goes through API-format workflows:
CheckpointLoaderSimple -> [Split model over GPUs: 2 simulated GPUs, blocks split 1:1] -> KSampler ->
VAEDecode -> SaveImage, with CLIP to device / VAE to device / VRAM report in the split variant. The
split image must equal the unsplit one pixel for pixel; with a LoRA loaded after the split node too
(and the LoRA must change the image); after ComfyUI unloads every model, the split model loads again
and still matches.
"""
from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vramancer import parse_devices

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEVICES = "rtx3060:4GiB,rtx3060:4GiB"


def _workflow(prefix: str, *, split: bool, lora: bool = False, seed: int = 7) -> dict:
    wf: dict = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if split:
        wf["10"] = {"class_type": "VRAMancerSplitModel", "inputs": {
            "model": ["1", 0], "devices": DEVICES, "width": 64, "height": 64, "batch_size": 1, "cfg": True,
            "split": "1,1", "reserve": ""}}
        wf["11"] = {"class_type": "VRAMancerClipToDevice", "inputs": {"clip": ["1", 1], "device": "cpu"}}
        wf["12"] = {"class_type": "VRAMancerVaeToDevice", "inputs": {"vae": ["1", 2], "device": "cpu"}}
        wf["13"] = {"class_type": "VRAMancerVramReport", "inputs": {"images": ["6", 0]}}
        wf["2"]["inputs"]["clip"] = ["11", 0]
        wf["3"]["inputs"]["clip"] = ["11", 0]
        wf["6"]["inputs"]["vae"] = ["12", 0]
        model = ["10", 0]
    if lora:   # after the split node: ComfyUI clones the split MODEL and patches its weights
        wf["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": "tiny-sd15-lora.safetensors", "strength_model": 1.0}}
        model = ["20", 0]
    wf["5"]["inputs"]["model"] = model
    return wf


def _image(server, entry: dict) -> np.ndarray:
    files = entry["outputs"]["7"]["images"]
    assert len(files) == 1
    path = server.base / "output" / files[0].get("subfolder", "") / files[0]["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def test_nodes_are_registered(comfy_server):
    info = comfy_server.get("/object_info")
    for name in ("VRAMancerSplitModel", "VRAMancerClipToDevice", "VRAMancerVaeToDevice", "VRAMancerVramReport"):
        assert name in info, f"{name} not loaded:\n{comfy_server.log_tail()}"
    assert info["VRAMancerSplitModel"]["output"] == ["MODEL", "STRING"]
    assert info["VRAMancerVramReport"]["output_node"] is True
    assert "vramancer" in comfy_server.log.read_text()   # the loader was imported from custom_nodes/
    # WEB_DIRECTORY: the frontend script that shows the plan / report text on the nodes is served
    scripts = comfy_server.get("/extensions")
    assert "/extensions/vramancer/vramancer.js" in scripts, scripts
    with urllib.request.urlopen(comfy_server.url + "/extensions/vramancer/vramancer.js", timeout=30) as r:
        assert b"registerExtension" in r.read()


def test_split_image_equals_unsplit(comfy_server):
    ref_entry = comfy_server.run(_workflow("unsplit", split=False))
    entry = comfy_server.run(_workflow("split", split=True))
    ref, img = _image(comfy_server, ref_entry), _image(comfy_server, entry)
    assert ref.shape == (64, 64, 3)
    assert ref.std() > 1.0, "a flat image would prove nothing"
    assert np.array_equal(img, ref), f"max pixel difference {np.abs(img.astype(int) - ref.astype(int)).max()}"
    ids = [d.id for d in parse_devices(DEVICES)]
    plan = entry["outputs"]["10"]["text"][0]
    assert f"stage 0: {ids[0]}" in plan and f"stage 1: {ids[1]}" in plan, plan
    report = entry["outputs"]["13"]["text"][0]
    lines = report.splitlines()
    for phase, device in (("encode", "cpu"), ("denoise", ids[0]), ("denoise", ids[1]), ("decode", "cpu")):
        assert any(ln.split()[:2] == [phase, device] for ln in lines), report
    # each simulated GPU held its stage's weights, once per denoiser call (3 steps, cond + uncond batched)
    held = [ln for ln in lines if ln.startswith("denoise") and "weights held" in ln]
    assert len(held) == 2 and all("[3 calls]" in ln for ln in held), report


def test_lora_through_the_split_node(comfy_server):
    plain = _image(comfy_server, comfy_server.run(_workflow("nolora", split=False, seed=11)))
    ref = _image(comfy_server, comfy_server.run(_workflow("lora-unsplit", split=False, lora=True, seed=11)))
    img = _image(comfy_server, comfy_server.run(_workflow("lora-split", split=True, lora=True, seed=11)))
    assert not np.array_equal(ref, plain), "the LoRA changed nothing: the test would prove nothing"
    assert np.array_equal(img, ref), f"max pixel difference {np.abs(img.astype(int) - ref.astype(int)).max()}"


def _placements(entry: dict) -> int:
    report = entry["outputs"]["13"]["text"][0]
    m = re.search(r"placed on their devices (\d+) times?", report)
    assert m, report
    return int(m.group(1))


def test_split_model_reloads_after_unload(comfy_server):
    before = _placements(comfy_server.run(_workflow("before-free", split=True, seed=23)))
    comfy_server.post("/free", {"unload_models": True})   # node outputs stay cached: the same split MODEL
    time.sleep(2)   # ComfyUI's prompt worker unloads between prompts, woken by the flag
    entry = comfy_server.run(_workflow("reload-split", split=True, seed=29))
    assert _placements(entry) == before + 1, "ComfyUI's reload did not place the blocks again (ON_LOAD)"
    ref = _image(comfy_server, comfy_server.run(_workflow("reload-unsplit", split=False, seed=29)))
    assert np.array_equal(_image(comfy_server, entry), ref)


def test_bad_devices_fail_the_split_node_in_one_line(comfy_server):
    wf = _workflow("bad-devices", split=True, seed=31)
    wf["10"]["inputs"]["devices"] = "rtx3060,notagpu"
    pid = comfy_server.post("/prompt", {"prompt": wf, "client_id": "vramancer-tests"})["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        entry = comfy_server.get(f"/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the prompt never finished")
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "VRAMancerSplitModel"
    message = errors[0]["exception_message"].strip()
    assert "notagpu" in message and "\n" not in message, message


def test_streamed_stage_runs_through_comfyui_weight_casting(comfy_server):
    # a 100 MiB card and the host: the middle blocks stay in host RAM and are cast onto the card's
    # device layer by layer (ComfyUI's comfy_cast_weights), the rest runs on the card
    wf = _workflow("streamed", split=True, seed=41)
    wf["10"]["inputs"].update(devices="rtx3060:100MiB,cpu", split="", reserve="0")
    entry = comfy_server.run(wf)
    plan = entry["outputs"]["10"]["text"][0]
    assert "streamed to" in plan, plan
    ref = comfy_server.run(_workflow("streamed-ref", split=False, seed=41))
    assert np.array_equal(_image(comfy_server, entry), _image(comfy_server, ref))


def test_vramancer_plans_the_checkpoint_comfyui_loads(comfy_models, tmp_path):
    """Issue 11 item 1 on the file ComfyUI detects as SD1.5: planned offline, each component's bytes exact."""
    import json
    import os
    import struct
    import subprocess
    import sys

    path = comfy_models / "tiny-sd15.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VRAMANCER_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "vramancer", "plan", str(path), "-d", DEVICES, "--height", "512",
                           "--width", "512", "--steps", "20", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    want: dict[str, int] = {}
    with path.open("rb") as f:       # the safetensors header: each tensor's byte range
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    for name, meta in header.items():
        if name != "__metadata__":
            comp = {"model": "unet", "cond_stage_model": "text_encoder", "first_stage_model": "vae"}[name.split(".")[0]]
            want[comp] = want.get(comp, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    assert {c["name"]: c["weights_bytes"] for c in plan["components"]} == want
