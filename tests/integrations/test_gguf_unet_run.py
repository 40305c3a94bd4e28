"""`vramancer run UNET.gguf --pipeline-config DIR`: an SD1.5 UNet as ComfyUI-GGUF writes it
(general.architecture "sd1", LDM names without the ``model.diffusion_model.`` prefix, Q8_0 linears),
made from the UNet of the ComfyUI-written tiny SD1.5 checkpoint (comfy_fixture_build.py); DIR is that
checkpoint's text encoder, VAE, tokenizer and scheduler saved by diffusers (no UNet weights). The UNet
is split over two simulated GPUs kept quantized (each stage's storage bytes == the plan's) and the PNG
equals diffusers' own unsplit GGUF pipeline's (from_single_file of the same tensors under their
prefixed names, which diffusers reads and converts itself)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.integrations.test_single_file_run import write_config_dir
from tests.pipeline.gguf_flux import write_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ARGS = ["-p", "a cat at the", "--steps", "2", "--height", "64", "--width", "64", "--guidance", "7.5", "--seed", "3",
        "--reserve", "0"]
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def sd1(comfy_models, tmp_path_factory) -> dict[str, Path]:
    import diffusers
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("gguf-sd1")
    ckpt = comfy_models / "tiny-sd15.safetensors"
    unet = {k.removeprefix(PREFIX): v for k, v in load_file(str(ckpt)).items() if k.startswith(PREFIX)}
    write_gguf(root / "tiny-sd15-unet-Q8_0.gguf", unet, "sd1")
    write_gguf(root / "prefixed.gguf", {PREFIX + k: v for k, v in unet.items()}, "sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(ckpt), config=str(write_config_dir(root / "configs")), dtype=torch.float16, local_files_only=True)
        pipe.save_pretrained(root / "dir", safe_serialization=True)
    for f in (root / "dir" / "unet").glob("*.safetensors"):
        f.unlink()                                  # the folder's UNet is the GGUF's: no weights needed here
    return {"gguf": root / "tiny-sd15-unet-Q8_0.gguf", "prefixed": root / "prefixed.gguf", "dir": root / "dir"}


def test_gguf_unet_split_kept_quantized_equals_diffusers_unsplit(sd1, tmp_path, capsys):
    import diffusers
    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter
    from PIL import Image

    import vramancer
    from vramancer.cli import main
    from vramancer.devices.spec import parse_devices
    from vramancer.models.pipeline import ImageWorkload, pipeline_profile
    from vramancer.plan.pipeline import plan_pipeline

    prof = pipeline_profile(sd1["gguf"], config=sd1["dir"])
    assert prof.pipeline_class == "StableDiffusionPipeline" and prof.denoiser_component.stored == "GGUF Q8_0"
    assert {c.name for c in prof.components} == {"unet", "text_encoder", "vae"}
    devs = parse_devices("rtx3060:800MiB,rtx3060:800MiB,cpu")
    n = prof.denoiser.num_blocks
    ids = [devs[0].id if b < n // 2 else devs[1].id for b in range(n)]
    plan = plan_pipeline(prof, devs, ImageWorkload(height=64, width=64, steps=2, guidance=7.5), reserve_bytes=0,
                         block_devices=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = vramancer.load_pipeline(sd1["gguf"], plan=plan, config=sd1["dir"])
    for st, run in zip(plan.stages, pipe.vramancer.stages, strict=True):
        seen: dict[int, int] = {}
        for _, m in run.units:
            for t in list(m.parameters()) + list(m.buffers()):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        assert sum(seen.values()) == st.weights_bytes
        assert any(isinstance(p, GGUFParameter) for _, m in run.units for p in m.parameters())
    pipe.vramancer.detach()

    out = tmp_path / "split.png"
    code = main(["run", str(sd1["gguf"]), "--pipeline-config", str(sd1["dir"]), "-d",
                 "rtx3060:800MiB,rtx3060:800MiB,cpu", "-o", str(out), *ARGS])
    err = capsys.readouterr().err
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DConditionModel.from_single_file(
            str(sd1["prefixed"]), config=str(sd1["dir"]), subfolder="unet", torch_dtype=torch.float16,
            local_files_only=True, quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float16))
        ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1["dir"], unet=unet, dtype=torch.float16,
                                                                local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        img = ref("a cat at the", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(3)).images[0]
    split = np.asarray(Image.open(out).convert("RGB"))
    assert split.std() > 0 and np.array_equal(split, np.asarray(img.convert("RGB")))
