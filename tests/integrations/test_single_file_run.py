"""`vramancer run CHECKPOINT.safetensors --pipeline-config DIR` on a single-file SD1.5 checkpoint in the
original (LDM) layout, written by ComfyUI's own modules (comfy_fixture_build.py; ComfyUI detects it as
SD1.5): diffusers' single-file converter reads it with the configs of DIR (written here from config
classes; nothing is downloaded), our plan splits the UNet over two simulated GPUs, and the PNG equals
diffusers' own unsplit ``from_single_file`` of the same file with the same seed. A pruned copy without
the VAE encoder (as ComfyUI-pruned files are) is one line, exit 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.tiny import tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# the UNet split over both cards (each ~40 MiB after the CUDA context reserve); CLIP and VAE in host RAM
DEVICES = "rtx3060:800MiB,rtx3060:800MiB,cpu"
ARGS = ["-p", "a cat at the", "--steps", "2", "--height", "64", "--width", "64", "--guidance", "7.5",
        "--seed", "3"]


def write_config_dir(folder: Path) -> Path:
    """A diffusers StableDiffusionPipeline folder without weights, shaped like comfy_fixture_build.py's
    checkpoint: UNet of 2 levels of 320 channels, 1 res block each, attention on the first level; CLIP-L
    text encoder; the SD VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    UNet2DConditionModel.from_config(dict(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=[320, 320], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=768, attention_head_dim=8)).save_config(folder / "unet")
    AutoencoderKL.from_config(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=256)).save_config(folder / "vae")
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=0, eos_token_id=1, pad_token_id=1).save_pretrained(folder / "text_encoder")
    tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    DDIMScheduler(steps_offset=1, clip_sample=False).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    return write_config_dir(tmp_path_factory.mktemp("sd15-configs"))


def _run(argv: list[str], monkeypatch, tmp_path: Path, capsys) -> tuple[int, str, str]:
    from vramancer.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / ".cache"))
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_single_file_run_split_equals_diffusers_unsplit(comfy_models, config_dir, tmp_path, monkeypatch, capsys):
    import diffusers
    import torch
    from PIL import Image

    ckpt = comfy_models / "tiny-sd15.safetensors"
    out = tmp_path / "split.png"
    code, stdout, err = _run(["run", str(ckpt), "--pipeline-config", str(config_dir), "-d", DEVICES, "-o", str(out),
                              "--json", *ARGS], monkeypatch, tmp_path, capsys)
    assert code == 0, err
    comps = {c["name"]: c for c in json.loads(stdout)["plan"]["components"]}
    assert comps["unet"]["mode"] == "split" and len(comps["unet"]["device"].split(",")) == 2
    split = np.asarray(Image.open(out).convert("RGB"))

    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(ckpt), config=str(config_dir), dtype=torch.float16,
                                                             local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat at the", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(3)).images[0]
    ref_px = np.asarray(ref.convert("RGB"))
    assert split.shape == ref_px.shape == (64, 64, 3)
    assert split.std() > 0                                   # an image, not a blank
    assert np.abs(split.astype(int) - ref_px.astype(int)).max() <= 1


def test_pruned_single_file_is_one_line(comfy_models, config_dir, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    pruned = tmp_path / "pruned.safetensors"
    with safe_open(str(comfy_models / "tiny-sd15.safetensors"), "pt") as f:
        names = f.keys()
        save_file({k: f.get_tensor(k) for k in names if not k.startswith("first_stage_model.encoder.")}, str(pruned))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(["run", str(pruned), "--pipeline-config", str(config_dir), "-d", DEVICES,
                      "-o", str(tmp_path / "x.png"), *ARGS], monkeypatch, tmp_path, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("vramancer: error:")]
    assert code == 2
    assert len(lines) == 1 and "no encoder weights (first_stage_model.encoder.*" in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".cache") == \
        sorted(n for n in before if n != ".cache")
