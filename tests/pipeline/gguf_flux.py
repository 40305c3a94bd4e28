"""A tiny Flux pipeline and its transformer as a ComfyUI-GGUF file (city96's layout): the original
BFL tensor names (``double_blocks.0.img_attn.qkv.weight``, ``single_blocks.0.linear1.weight``, ...),
Q8_0 linears (gguf.quants.quantize), F32 vectors and F16 matrices whose rows are not a multiple of
32, ``general.architecture`` "flux". The transformer is 32 wide (2 heads of 16) so that its linears
quantize to Q8_0 (32-element blocks). Built here from config classes: nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

__all__ = ["build_flux_folder", "bfl_state_dict", "write_flux_gguf", "write_diffusers_gguf", "gguf_type", "write_gguf"]


def build_flux_folder(folder: Path) -> Path:
    """A tiny FluxPipeline (transformer 32 wide, guidance embedded as in FLUX.1-dev) saved in ``folder``."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from .tiny import _clip, _t5, _vae, tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8)).eval()
    with torch.no_grad():   # random, not zero-initialised, modulations and outputs: every block matters
        for p in transformer.parameters():
            p.normal_(0.0, 0.2)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(
            latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
            use_post_quant_conv=False),
        text_encoder=_clip(), tokenizer=tokenizer(folder / "_tok"), text_encoder_2=_t5(32),
        tokenizer_2=tokenizer(folder / "_tok2", max_length=512))
    pipe.save_pretrained(folder, safe_serialization=True)
    for tmp in folder.glob("_tok*"):
        shutil.rmtree(tmp)
    return folder


def _swap(w):
    import torch

    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def bfl_state_dict(sd: dict) -> dict:
    """The original BFL names of a diffusers FluxTransformer2DModel state dict: the inverse of
    diffusers' convert_flux_transformer_checkpoint_to_diffusers (q, k, v fused; the single blocks'
    q, k, v and MLP input fused into linear1; the final modulation's halves swapped back)."""
    import torch

    sd = dict(sd)
    out: dict = {}

    def take(dst: str, src: str) -> None:
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd.pop(f"{src}.{s}")

    for dst, src in (("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                     ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out")):
        take(dst, src)
    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap(sd.pop(f"norm_out.linear.{s}"))
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in doubles:
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        take(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        take(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        for s in ("weight", "bias"):
            out[f"{d}.img_attn.qkv.{s}"] = torch.cat([sd.pop(f"{b}.attn.to_{x}.{s}") for x in "qkv"])
            out[f"{d}.txt_attn.qkv.{s}"] = torch.cat([sd.pop(f"{b}.attn.add_{x}_proj.{s}") for x in "qkv"])
        for dst, src in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                         ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{d}.{dst}.scale"] = sd.pop(f"{b}.{src}.weight")
        for dst, src in (("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                         ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")):
            take(f"{d}.{dst}", f"{b}.{src}")
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        take(f"{d}.modulation.lin", f"{b}.norm.linear")
        for s in ("weight", "bias"):
            out[f"{d}.linear1.{s}"] = torch.cat([sd.pop(f"{b}.attn.to_{x}.{s}") for x in "qkv"]
                                                + [sd.pop(f"{b}.proj_mlp.{s}")])
        out[f"{d}.norm.query_norm.scale"] = sd.pop(f"{b}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = sd.pop(f"{b}.attn.norm_k.weight")
        take(f"{d}.linear2", f"{b}.proj_out")
    if sd:
        raise ValueError(f"not mapped to BFL names: {sorted(sd)[:4]}")
    return out


def gguf_type(shape: tuple[int, ...], quant: str = "Q8_0") -> str:
    """city96's rule, reduced: vectors F32, matrices whose rows are not whole 32-element blocks F16,
    the rest ``quant``."""
    if len(shape) == 1:
        return "F32"
    return quant if shape[-1] % 32 == 0 else "F16"


def write_gguf(path: Path, tensors: dict, arch: str, quant: str = "Q8_0") -> dict[str, int]:
    """``tensors`` (name -> torch tensor) as a GGUF file of ``arch`` (types by ``gguf_type``); returns
    each tensor's bytes as written."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    sizes: dict[str, int] = {}
    for name, t in tensors.items():
        a = t.detach().float().numpy()
        kind = gguf_type(tuple(a.shape), quant)
        qt = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            data = a.astype(np.float32)
        elif kind == "F16":
            data = a.astype(np.float16)
        else:
            data = gguf.quants.quantize(a.astype(np.float32), qt)
        w.add_tensor(name, data, raw_dtype=qt if kind not in ("F32", "F16") else None)
        sizes[name] = int(data.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def write_flux_gguf(folder: Path, path: Path, quant: str = "Q8_0") -> dict[str, int]:
    """The folder's transformer as a ComfyUI-GGUF file at ``path`` (BFL names); returns each tensor's
    bytes as written."""
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    return write_gguf(path, bfl_state_dict(tr.state_dict()), "flux", quant)


def write_diffusers_gguf(folder: Path, path: Path, quant: str = "Q8_0") -> dict[str, int]:
    """The same transformer quantized the same way, under diffusers' own names: what diffusers'
    from_single_file loads without any conversion (the reference)."""
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    return write_gguf(path, dict(tr.state_dict()), "flux", quant)
