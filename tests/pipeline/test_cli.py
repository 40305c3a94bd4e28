"""vramancer plan / run / demo with image pipelines: tables, JSON, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vramancer.cli import main
from vramancer.plan.plan import Plan

from .tiny import HEIGHT, WIDTH

SMALL = ["--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "2", "--reserve", "0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_pipeline_table_and_json(pipelines, capsys, tmp_path):
    code, out, err = run(capsys, "plan", pipelines["sdxl"], "-d", "rtx3060:1MiB,rtx3060:1MiB", *SMALL)
    assert code == 0, err
    for word in ("unet", "text_encoder_2", "vae", "peak per phase", "encode", "denoise", "decode", "s/image"):
        assert word in out
    code, out, err = run(capsys, "plan", pipelines["flux"], "-d", "rtx3060:3MiB,rtx3060:3MiB", *SMALL, "--json",
                         "-o", tmp_path / "p.json")
    assert code == 0, err
    d = json.loads(out)
    assert d["schema"] == 2 and {c["name"] for c in d["components"]} == {
        "transformer", "text_encoder", "text_encoder_2", "vae"}
    assert {p["phase"] for p in d["phase_peaks"]} == {"encode", "denoise", "decode"}
    assert d["image"]["seconds_per_image"] > 0
    plan = Plan.load(tmp_path / "p.json")           # the pipeline fields survive a round trip
    assert plan.is_pipeline and plan.to_dict() == Plan.from_dict(d).to_dict()
    assert plan.image.steps == 2 and plan.components[0].role == "denoiser"


def test_llm_plan_json_has_no_pipeline_fields(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "-d", "rtx4090", "--json")
    assert code == 0
    d = json.loads(out)
    assert "components" not in d and "phase_peaks" not in d and "image" not in d


def test_plan_does_not_fit_exit_3_with_suggestions(pipelines, capsys):
    code, out, err = run(capsys, "plan", pipelines["sd15"], "-d", "rtx3060:1MiB", "--height", "64", "--width", "64",
                         "--steps", "2", "--reserve", "0")
    assert code == 3
    line = err.strip().splitlines()[-1]
    assert line.startswith("vramancer: error:") and "does not fit" in line
    assert "--height 32 --width 32" in line and "s/image" in line


@pytest.mark.parametrize("case", ["size", "neither", "missing", "layout"])
def test_bad_input_one_line_exit_2(pipelines, tmp_path, case):
    import shutil

    if case == "size":
        argv = ["plan", pipelines["sd15"], "--height", "30", "--width", "32"]
    elif case == "neither":
        (tmp_path / "empty").mkdir()
        argv = ["plan", tmp_path / "empty"]
    elif case == "missing":
        shutil.copytree(pipelines["sd3"], tmp_path / "p")
        shutil.rmtree(tmp_path / "p" / "text_encoder_3")
        argv = ["plan", tmp_path / "p", "-d", "rtx3060"]
    else:
        import torch
        from safetensors.torch import save_file

        save_file({"model.diffusion_model.new_thing.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
        argv = ["plan", tmp_path / "x.safetensors", "-d", "rtx3060"]
    p = subprocess.run([sys.executable, "-m", "vramancer", *map(str, argv)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramancer: error:") and "Traceback" not in p.stderr


def test_run_writes_the_image(pipelines, tmp_path):
    out = tmp_path / "out.png"
    p = subprocess.run([sys.executable, "-m", "vramancer", "run", str(pipelines["sd15"]), "--prompt", "the cat",
                        "--steps", "2", "--seed", "0", "-o", str(out), "--height", str(HEIGHT), "--width", str(WIDTH),
                        "-d", "rtx3060,rtx3060", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["output"] == str(out) and d["plan"]["image"]["steps"] == 2
    import diffusers
    import numpy as np

    # the same image as diffusers' own pipeline with the same seed
    import torch
    from PIL import Image

    ref = diffusers.DiffusionPipeline.from_pretrained(pipelines["sd15"], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    img = ref("the cat", num_inference_steps=2, height=HEIGHT, width=WIDTH, guidance_scale=3.5,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(img))


def test_demo_image(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vramancer", "demo", "--image", "--json", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["matches_unsplit"] is True and d["stages"] == 2
    assert d["boundary"][1]["crossings"] == 4     # 4 steps, CFG in one batch: stage 1 entered once per step


def test_run_trace_has_the_three_phases(pipelines, tmp_path):
    trace = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-m", "vramancer", "run", str(pipelines["flux"]), "--prompt", "the cat",
                        "--steps", "2", "--seed", "0", "-o", str(tmp_path / "o.png"), "--height", str(HEIGHT),
                        "--width", str(WIDTH), "-d", "rtx3060,rtx3060", "--trace", str(trace), "--monitor"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Phases by peak" in p.stdout
    d = json.loads(trace.read_text())
    names = [ph["name"] for ph in d["phases"]]
    assert names == ["encode", "denoise", "decode"]
    bad = subprocess.run([sys.executable, "-m", "vramancer", "run", str(pipelines["flux"]), "--prompt", "x",
                          "--trace", str(tmp_path / "t.txt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
