"""Run by the ComfyUI venv's python (not by pytest): writes a tiny SD1.5 single-file checkpoint and a LoRA.

    python comfy_fixture_build.py COMFY_DIR OUT_DIR

Built from ComfyUI's own modules so that ComfyUI detects it as SD1.5 (the UNet's model_channels 320 and
context_dim 768 are what detection matches on; it has 2 levels of 1 res block each instead of 4 of 2).
The CLIP-L text encoder has its real size (ComfyUI builds SD1.5's CLIP from a fixed config: every weight
must be in the file); the VAE is whole, encoder included, as in published checkpoints (diffusers'
single-file loader needs it; text-to-image runs only the decoder). Every tensor is
filled from a generator seeded by its name, so the file is the same on every machine. Writes
OUT_DIR/tiny-sd15.safetensors and OUT_DIR/tiny-sd15-lora.safetensors (kohya key names, 5 UNet layers
spread over the blocks) and checks with ComfyUI's model detection that the checkpoint reads as SD15.
"""
from __future__ import annotations

import os
import sys
import zlib


def _fill(sd: dict) -> dict:
    import torch

    out = {}
    for name, t in sd.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if t.ndim >= 2:
            fan_in = max(1, t[0].numel())
            v = torch.randn(t.shape, generator=g) / fan_in ** 0.5
        elif name.endswith("bias"):
            v = torch.randn(t.shape, generator=g) * 0.01
        else:   # norm scales
            v = 1.0 + torch.randn(t.shape, generator=g) * 0.01
        out[name] = v.to(torch.float16).contiguous()
    return out


def main(comfy_dir: str, out_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    import torch
    from comfy.cli_args import args
    from safetensors.torch import save_file
    args.cpu = True     # before comfy.model_management is imported: no accelerator is probed
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.model_detection import model_config_from_unet
    from comfy.supported_models import SD15

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
                     channel_mult=[1, 1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1, 0],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1, 0, 0], context_dim=768,
                     use_linear_in_transformer=False, legacy=False, dtype=torch.float32, device="cpu",
                     operations=ops)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    vae_cfg = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=vae_cfg, embed_dim=4)
    sd: dict = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in _fill(unet.state_dict()).items()})
    sd.update({f"cond_stage_model.{k}": v for k, v in _fill(clip.state_dict()).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in _fill(vae.state_dict()).items()})
    cfg = model_config_from_unet(sd, "model.diffusion_model.")
    if not isinstance(cfg, SD15):
        raise SystemExit(f"ComfyUI detects the tiny checkpoint as {type(cfg).__name__}, not SD15")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".tiny-sd15.{os.getpid()}.tmp")
    save_file(sd, tmp)
    os.replace(tmp, os.path.join(out_dir, "tiny-sd15.safetensors"))
    # the LoRA: rank 4 on layers of the first, middle and last blocks (so both sides of a split)
    lora = {}
    targets = ["input_blocks.1.1.proj_in", "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
               "middle_block.1.transformer_blocks.0.attn1.to_q", "output_blocks.2.1.proj_out", "out.2"]
    unet_sd = unet.state_dict()
    for i, t in enumerate(targets):
        w = unet_sd[f"{t}.weight"]
        out_f, in_f = w.shape[0], w[0].numel()
        g = torch.Generator().manual_seed(1000 + i)
        key = "lora_unet_" + t.replace(".", "_")
        down = torch.randn((4, in_f), generator=g) * 0.5
        up = torch.randn((out_f, 4), generator=g) * 0.5
        if w.ndim == 4:
            k = w.shape[2:]
            down = down.reshape(4, w.shape[1], *k) if k != (1, 1) else down.reshape(4, in_f, 1, 1)
            up = up.reshape(out_f, 4, 1, 1)
        lora[f"{key}.lora_down.weight"] = down.to(torch.float16).contiguous()
        lora[f"{key}.lora_up.weight"] = up.to(torch.float16).contiguous()
        lora[f"{key}.alpha"] = torch.tensor(4.0)
    tmp = os.path.join(out_dir, f".tiny-sd15-lora.{os.getpid()}.tmp")
    save_file(lora, tmp)
    os.replace(tmp, os.path.join(out_dir, "tiny-sd15-lora.safetensors"))
    print(f"wrote {out_dir}: {sum(v.numel() for v in sd.values())} checkpoint values, {len(lora)} LoRA tensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
