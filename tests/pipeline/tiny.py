"""Tiny random diffusers pipelines built from config classes and saved with save_pretrained: nothing
is downloaded. Tokenizers are CLIP BPE tokenizers written from a vocab/merges made here (the T5
slots of SD3 and Flux take one too: the pipelines only ask a tokenizer for ids, and the tiny T5's
vocabulary covers them)."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_pipeline", "KINDS", "HEIGHT", "WIDTH", "tokenizer"]

KINDS = ("sd15", "sdxl", "sd3", "flux")
HEIGHT = WIDTH = 32           # pixels; the tiny VAEs downscale by 2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for pair in ("th", "the</w>", "an", "at</w>"):
        vocab[pair] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\na n\na t</w>\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    return tok


VOCAB = 2 + 2 * len(_LETTERS) + 4


def _clip(hidden: int = 16, projection: bool = False, proj_dim: int = 16):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=77,
                         projection_dim=proj_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    cfg = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, **kw):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=HEIGHT, **kw).eval()


def build_pipeline(kind: str, folder: Path) -> Path:
    """Save a tiny random pipeline of ``kind`` (sd15, sdxl, sd3, flux) in ``folder``; returns it."""
    import torch

    folder = Path(folder)
    if kind == "sd15":
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=HEIGHT // 2, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(), tokenizer=tokenizer(folder / "_tok"),
                                       unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=HEIGHT // 2, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32, norm_num_groups=4).eval()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_clip(), text_encoder_2=_clip(projection=True),
            tokenizer=tokenizer(folder / "_tok"), tokenizer_2=tokenizer(folder / "_tok2"), unet=unet,
            scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    elif kind == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=HEIGHT // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32,
            out_channels=4).eval()
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0609,
                                                                                          scaling_factor=1.5035),
            text_encoder=_clip(projection=True), tokenizer=tokenizer(folder / "_tok"),
            text_encoder_2=_clip(projection=True), tokenizer_2=tokenizer(folder / "_tok2"),
            text_encoder_3=_t5(32), tokenizer_3=tokenizer(folder / "_tok3", max_length=256))
    elif kind == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
        pipe = FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(
                latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                use_post_quant_conv=False),
            text_encoder=_clip(), tokenizer=tokenizer(folder / "_tok"), text_encoder_2=_t5(32),
            tokenizer_2=tokenizer(folder / "_tok2", max_length=512))
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    for tmp in folder.glob("_tok*"):
        shutil.rmtree(tmp)
    return folder
