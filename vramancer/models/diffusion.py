"""Profiles of diffusion denoisers (Flux transformer, SDXL UNet) from the catalog's block data.

Unit of "per token": one image token is one 16x16-pixel patch of the output image (a 1024x1024
image is 64 x 64 = 4096 tokens). Flux runs exactly these tokens (VAE /8, then 2x2 patches) plus its
512 T5 text tokens; a UNet runs 2x2 = 4 latent positions per token at full resolution, 1 at the
/2 level, 1/4 at the /4 level, and the per-token numbers below are scaled that way. The sequence a
denoising step processes is ``ModelProfile.max_position_embeddings`` tokens (image + text), so one
step needs ``act_bytes_per_token x sequence x batch`` of activation workspace on the stage running a
block (classifier-free guidance doubles the batch), plus ``attn_score_bytes x sequence^2 x batch``
when attention materialises its scores (eager attention; SDPA's memory-efficient kernels do not).

Formulas (d = hidden size, r = MLP ratio, b = bytes of the compute dtype, C = UNet channels at the
block's level, p = latent positions per token at that level):

Flux double-stream block (each token in its own stream's weights)
    act      = max(11, 2 + 2r) * d * b   attention phase: residual, normed, q/k/v, rotated q/k, the
                                         joint (text+image) q/k/v and the attention output = 11 d;
                                         MLP phase: residual, normed, fc1 (r d), GELU (r d) = (2+2r) d
    flops    = 2 * (4 d^2 + 4 d + 2 r d^2 + (r + 1) d)   q, k, v, out + fc1, fc2 of one stream
Flux single-stream block
    act      = max(8 + r, 2 + 2r) * d * b   residual, normed, MLP hidden (r d), q/k/v, rotated q/k and
                                            attention output live together = (8 + r) d
    flops    = 2 * ((4 + 2r) d^2 + (4 + r) d)   q, k, v, proj_mlp, proj_out([attn, mlp])
attention (both): scores = heads * b per (query, key) pair; QK^T + AV = 4 d FLOPs per pair.
The per-sample modulation linears (AdaLayerNorm) do not scale with tokens and are left out of FLOPs.

SDXL UNet block at level l (p = 4 / 4^l)
    resnet peak          5 C per position (input, norm, conv1, norm2, conv2)
    transformer peak     18 C per position (residual, normed, GEGLU projection 8 C, GELU 4 C, product 4 C)
    act      = (peak [+ 2 C concatenated skip input for up blocks]) * p * b
               + skips a down block emits (held until the matching up block) * b
               + cross-attention scores over the 77 text tokens: heads * 77 * p * b
    flops    = 2 * params * p   (every conv / linear weight applies once per position of its level)
    scores   = heads * b * p^2 per token pair; attention FLOPs 4 C p^2 per pair per transformer layer.
No KV cache (kv_bytes_per_token = 0); a denoising step reads every weight once
(read_bytes_per_token = weights_bytes).
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import UnknownModelError, WorkloadError
from .catalog import CatalogModel, DiffusionBlock
from .dtypes import DType, resolve_dtype
from .profile import BlockProfile, ModelProfile

__all__ = ["diffusion_profile", "denoiser_blocks", "FLUX_TEXT_TOKENS", "SDXL_TEXT_TOKENS", "PIXELS_PER_TOKEN_SIDE"]

PIXELS_PER_TOKEN_SIDE = 16   # one image token = a 16 x 16 pixel patch
FLUX_TEXT_TOKENS = 512       # FLUX.1-dev's T5 max_sequence_length
SDXL_TEXT_TOKENS = 77        # CLIP context of SDXL's cross-attention
_FLUX_MLP_RATIO = 4.0        # FluxTransformerBlock / FluxSingleTransformerBlock mlp_ratio
_UNET_FF_MULT = 4            # GEGLU feed-forward of BasicTransformerBlock


def _block(name: str, modules: tuple[str, ...], params: int, dt: DType, *, act_elems: float,
           flops: float, heads: int = 0, attn_flops_per_pair: float = 0.0,
           score_scale: float = 1.0) -> BlockProfile:
    weights = dt.matrix_bytes(params)
    b = dt.compute_bytes
    return BlockProfile(
        name=name, weights_bytes=weights, modules=list(modules), params=params,
        kv_bytes_per_token=0, kv_window=None,
        act_bytes_per_token=math.ceil(act_elems * b),          # rounded up: a budget, not a count
        attn_score_bytes=math.ceil(heads * b * score_scale),
        flops_per_token=float(flops), attn_flops_per_token_per_ctx=float(attn_flops_per_pair),
        read_bytes_per_token=weights,
    )


def _flux_blocks(cfg: dict[str, Any], blocks: tuple[DiffusionBlock, ...], dt: DType,
                 image_tokens: int) -> list[BlockProfile]:
    heads = int(cfg["num_attention_heads"])
    d = heads * int(cfg["attention_head_dim"])
    r = _FLUX_MLP_RATIO
    text_tokens = FLUX_TEXT_TOKENS
    in_ch = int(cfg["in_channels"])
    out_ch = int(cfg.get("out_channels") or in_ch) * int(cfg.get("patch_size", 1)) ** 2
    ctx = int(cfg["joint_attention_dim"])
    double_linear = 4 * d * d + 4 * d + 2 * r * d * d + (r + 1) * d
    single_linear = (4 + 2 * r) * d * d + (4 + r) * d
    # x_embedder runs on image tokens, context_embedder on text tokens: FLOPs averaged over the sequence
    embed_linear = (image_tokens * (in_ch * d + d) + text_tokens * (ctx * d + d)) / (image_tokens + text_tokens)
    out: list[BlockProfile] = []
    for name, modules, params in blocks:
        if name.startswith("transformer_blocks."):
            out.append(_block(name, modules, params, dt, act_elems=max(11, 2 + 2 * r) * d,
                              flops=2 * double_linear, heads=heads, attn_flops_per_pair=4 * d))
        elif name.startswith("single_transformer_blocks."):
            out.append(_block(name, modules, params, dt, act_elems=max(8 + r, 2 + 2 * r) * d,
                              flops=2 * single_linear, heads=heads, attn_flops_per_pair=4 * d))
        elif name == "embed":
            out.append(_block(name, modules, params, dt, act_elems=ctx + d, flops=2 * embed_linear))
        else:  # norm_out + proj_out
            out.append(_block(name, modules, params, dt, act_elems=2 * d + out_ch, flops=2 * (d * out_ch + out_ch)))
    return out


def _per_level(value: Any, levels: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * levels


def _unet_blocks(cfg: dict[str, Any], blocks: tuple[DiffusionBlock, ...], dt: DType) -> list[BlockProfile]:
    chans = [int(c) for c in cfg["block_out_channels"]]
    levels = len(chans)
    # diffusers' SDXL config stores the head count per level in attention_head_dim
    heads = _per_level(cfg.get("num_attention_heads") or cfg["attention_head_dim"], levels)
    tlayers = _per_level(cfg.get("transformer_layers_per_block", 1), levels)
    per_block = int(cfg["layers_per_block"])
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    ff = 2 + 4 * _UNET_FF_MULT            # 18 C: transformer peak per position
    resnet = 5                           # 5 C: resnet peak per position

    def pos(level: int) -> float:        # latent positions per 16x16-pixel token at this level
        return 4.0 / 4**level

    out: list[BlockProfile] = []
    for name, modules, params in blocks:
        if name == "embed":
            c0 = chans[0]
            act = (in_ch + c0) * pos(0) + c0 * pos(0)  # conv_in output is also the first skip
            conv_in = 9 * in_ch * c0 + c0
            out.append(_block(name, modules, params, dt, act_elems=act, flops=2 * conv_in * pos(0)))
        elif name.startswith("down_blocks."):
            i = int(name.split(".")[1])
            c, p = chans[i], pos(i)
            cross = down_types[i].startswith("CrossAttn")
            skips = per_block * c * p + (c * pos(i + 1) if i < levels - 1 else 0)
            act = (ff if cross else resnet) * c * p + skips
            if cross:
                act += heads[i] * SDXL_TEXT_TOKENS * p
            n_attn = per_block * tlayers[i] if cross else 0
            out.append(_block(name, modules, params, dt, act_elems=act, flops=2 * params * p,
                              heads=heads[i] if cross else 0, attn_flops_per_pair=n_attn * 4 * c * p * p,
                              score_scale=p * p))
        elif name == "mid_block":
            i = levels - 1
            c, p = chans[i], pos(i)
            act = ff * c * p + heads[i] * SDXL_TEXT_TOKENS * p
            out.append(_block(name, modules, params, dt, act_elems=act, flops=2 * params * p, heads=heads[i],
                              attn_flops_per_pair=tlayers[i] * 4 * c * p * p, score_scale=p * p))
        elif name.startswith("up_blocks."):
            j = int(name.split(".")[1])
            lvl = levels - 1 - j
            c, p = chans[lvl], pos(lvl)
            cross = up_types[j].startswith("CrossAttn")
            act = ((ff if cross else resnet) * c + 2 * c) * p      # + concatenated skip input
            if lvl > 0:
                act += 2 * c * pos(lvl - 1)                        # upsampled map + its conv output
            if cross:
                act += heads[lvl] * SDXL_TEXT_TOKENS * p
            n_attn = (per_block + 1) * tlayers[lvl] if cross else 0
            out.append(_block(name, modules, params, dt, act_elems=act, flops=2 * params * p,
                              heads=heads[lvl] if cross else 0, attn_flops_per_pair=n_attn * 4 * c * p * p,
                              score_scale=p * p))
        else:  # conv_norm_out + conv_out
            c0 = chans[0]
            out.append(_block(name, modules, params, dt, act_elems=(2 * c0 + out_ch) * pos(0),
                              flops=2 * params * pos(0)))
    return out


def diffusion_profile(entry: CatalogModel, dtype: str | None = None, image_tokens: int = 4096) -> ModelProfile:
    """The per-block profile of a catalog diffusion denoiser in ``dtype`` (its default when None;
    quantized dtypes size every weight at their bits per weight). ``image_tokens``: 16x16-pixel
    patches per image (4096 for 1024x1024); the denoising sequence is image tokens plus, for Flux,
    its 512 text tokens (``max_position_embeddings`` of the result)."""
    if entry.kind != "diffusion" or not entry.blocks:
        raise UnknownModelError(f"{entry.key!r} is not a diffusion model with block data in the catalog")
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens <= 0:
        raise WorkloadError(f"image_tokens must be a positive whole number, not {image_tokens!r}")
    dt = resolve_dtype(dtype or entry.default_dtype)
    cfg = entry.config
    arch = entry.arch
    if arch == "FluxTransformer2DModel":
        blocks = _flux_blocks(cfg, entry.blocks, dt, image_tokens)
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        text_tokens = FLUX_TEXT_TOKENS
    elif arch == "UNet2DConditionModel":
        blocks = _unet_blocks(cfg, entry.blocks, dt)
        hidden = int(cfg["block_out_channels"][-1])
        text_tokens = 0  # text enters only as cross-attention keys/values (77 CLIP tokens)
    else:
        raise UnknownModelError(f"no diffusion profile for {arch} ({entry.key})")
    return ModelProfile(
        name=entry.key, arch=arch, kind="diffusion", dtype=dt.name, blocks=blocks, source="catalog",
        hidden_size=hidden, num_layers=len(blocks) - 2, vocab_size=0,
        max_position_embeddings=image_tokens + text_tokens, kv_dtype=dt.compute, layers_prefix="",
        config=entry.config_copy(), quantization=dt.name if dt.quantized else None,
        notes=[
            f"diffusion denoiser: one token = one {PIXELS_PER_TOKEN_SIDE}x{PIXELS_PER_TOKEN_SIDE}-pixel patch; "
            f"sequence = {image_tokens} image + {text_tokens} text tokens per denoising step",
            "activation workspace = act_bytes_per_token x sequence x batch (classifier-free guidance doubles batch)",
            "no KV cache; every weight is read once per denoising step",
        ],
    )


def _joint_blocks(cfg: dict[str, Any], blocks: tuple[DiffusionBlock, ...] | list, dt: DType, d: int,
                  heads: int) -> list[BlockProfile]:
    """A joint-attention transformer (SD3's MMDiT, or any DiT): every listed block as a Flux
    double-stream block (``max(11, 2 + 2r) d`` per token, r = 4), embed / final as Flux's."""
    r = _FLUX_MLP_RATIO
    in_ch = int(cfg.get("in_channels") or 16) * int(cfg.get("patch_size") or 1) ** 2
    linear = 4 * d * d + 4 * d + 2 * r * d * d + (r + 1) * d
    out: list[BlockProfile] = []
    for name, modules, params in blocks:
        if name == "embed":
            out.append(_block(name, modules, params, dt, act_elems=in_ch + d, flops=2 * (in_ch * d + d)))
        elif name == "final":
            out.append(_block(name, modules, params, dt, act_elems=2 * d + in_ch, flops=2 * (d * in_ch + in_ch)))
        else:
            out.append(_block(name, modules, params, dt, act_elems=max(11, 2 + 2 * r) * d, flops=2 * linear,
                              heads=heads, attn_flops_per_pair=4 * d))
    return out


def denoiser_blocks(arch: str, cfg: dict[str, Any], blocks: list, dt: DType, text_tokens: int = 0,
                    hidden: int = 0, image_tokens: int = 4096) -> list[BlockProfile]:
    """Block profiles of any denoiser with the formulas above: ``blocks`` are (name, module
    prefixes, params) in run order (names "embed", "<list>.<i>", "mid_block", "final"). UNet2D and
    Flux use their own formulas; SD3 and any other transformer the joint-attention block; a model
    whose config gives no width uses ``hidden`` (its widest norm, for single-file checkpoints)."""
    blocks = [tuple(b) for b in blocks]
    if arch == "UNet2DConditionModel" and "block_out_channels" in cfg:
        return _unet_blocks(cfg, blocks, dt)
    if arch == "FluxTransformer2DModel" and "joint_attention_dim" in cfg:
        return _flux_blocks(cfg, blocks, dt, image_tokens)
    heads = int(cfg.get("num_attention_heads") or 0)
    d = heads * int(cfg.get("attention_head_dim") or 0) if heads else 0
    d = d or hidden or 1
    return _joint_blocks(cfg, blocks, dt, d, heads or max(1, d // 64))
