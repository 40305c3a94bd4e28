"""Profiles of whole image pipelines (diffusers folders and single-file checkpoints), without
loading a weight: each component's exact weight bytes from its safetensors headers, the denoiser as
ordered blocks (a ModelProfile the LLM partitioner places), and activation bytes per image size.

Units. One *image token* is one 2x2 patch of latent positions (a 16x16-pixel patch at the usual VAE
scale of 8), the unit vramancer/models/diffusion.py uses: Flux and SD3 run exactly these tokens
(plus their text tokens for joint attention); a UNet runs 4 latent positions per token at full
resolution, 1 at the /2 level, 1/4 at the /4 level. The denoiser's ``ModelProfile`` takes the
per-token figures of diffusion.py (``denoiser_blocks``) with its weights replaced by the exact bytes
of the checkpoint; one denoising forward processes ``denoise_tokens(h, w)`` tokens for
``denoise_batch`` images (classifier-free guidance runs the conditional and the unconditional
prediction in one batch: twice the images).

Attention scores. diffusers' default processors (AttnProcessor2_0, FluxAttnProcessor2_0,
JointAttnProcessor2_0) call ``F.scaled_dot_product_attention``; on CUDA its flash and
memory-efficient kernels never hold the (query x key) score matrix, so the profile counts none
unless ``eager_attention`` is asked for (the classic AttnProcessor, or SDPA's math fallback on some
CPUs and dtypes): then each block's ``attn_score_bytes`` (heads x bytes per query-key pair) counts
against ``tokens x tokens x batch`` (the denoiser profile's config carries
``attn_implementation: "eager"``, which the planner's BlockTable reads).

Text encoders: ``tokens x hidden x bytes x 12`` while a layer runs (hidden in/out, q/k/v, MLP
intermediate of 4 hidden) + scores only with eager attention. VAE decode: its full-resolution
level holds 3 maps of C1 channels at H x W (the upsampled map entering it, its conv output, a
norm) per image, C1 = ``block_out_channels[1]`` (the channels that enter that level), plus its
mid-block attention at latent resolution when eager.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..errors import BadInputError, MalformedCheckpointError, UnknownModelError, WorkloadError
from .checkpoint import HeaderTensor, checkpoint_dtype, read_config, read_safetensors_header
from .diffusion import FLUX_TEXT_TOKENS, SDXL_TEXT_TOKENS, denoiser_blocks
from .dtypes import resolve_dtype
from .profile import ModelProfile

__all__ = ["ComponentProfile", "PipelineProfile", "ImageWorkload", "Role", "pipeline_profile", "catalog_pipeline",
           "CATALOG_PIPELINES",
           "is_pipeline", "single_file_layout", "SINGLE_FILE_LAYOUTS", "BODY_LISTS", "module_denoiser_profile",
           "GGUF_DIFFUSION_ARCHES", "GGUF_DENOISERS", "GGUF_PLAIN_TYPES", "GGUF_PREFIX", "gguf_denoiser_arch"]

Role = Literal["text_encoder", "denoiser", "vae", "other"]
Phase = Literal["encode", "denoise", "decode"]
PHASES: tuple[Phase, ...] = ("encode", "denoise", "decode")
_PHASE_OF: dict[str, Phase] = {"text_encoder": "encode", "other": "encode", "denoiser": "denoise", "vae": "decode"}

# Block lists of denoisers in run order (diffusers names, then the original single-file names);
# a list not named here runs after these, in name order. "mid_block" / "middle_block" are one block.
BODY_LISTS = ("down_blocks", "input_blocks", "mid_block", "middle_block", "up_blocks", "output_blocks",
              "transformer_blocks", "joint_blocks", "double_blocks", "single_transformer_blocks", "single_blocks",
              "blocks", "layers")
_SINGLE_BODY = ("mid_block", "middle_block")
# top-level modules that run after the body (the rest run before it)
_TAIL = ("norm_out", "proj_out", "conv_norm_out", "conv_act", "conv_out", "final_layer", "out", "norm_final")
_DENOISER_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
_DENOISER_NAMES = ("unet", "transformer", "prior", "decoder_unet")


@dataclass(frozen=True)
class ImageWorkload:
    """What one call makes: ``batch`` images of ``height`` x ``width`` pixels in ``steps`` denoising
    steps; ``guidance`` > 1 runs classifier-free guidance (the denoiser sees twice the batch; Flux-dev
    embeds guidance instead: ``cfg_doubles`` False)."""

    height: int = 1024
    width: int = 1024
    batch: int = 1
    steps: int = 28
    guidance: float = 3.5
    cfg_doubles: bool = True

    @property
    def denoise_batch(self) -> int:
        return self.batch * (2 if self.cfg_doubles and self.guidance > 1.0 else 1)


@dataclass
class ComponentProfile:
    """One component of a pipeline. ``weights_bytes``: exact bytes of its stored tensors;
    ``hidden``: its width (text encoders' hidden size, the VAE decoder's widest channels, the
    denoiser's model width); ``tokens``: text tokens a text encoder reads per prompt."""

    name: str
    class_name: str
    role: Role
    weights_bytes: int
    params: int
    dtype: str
    files: tuple[str, ...] = ()
    hidden: int = 0
    heads: int = 1
    tokens: int = 0
    config: dict = field(default_factory=dict)
    stored: str = ""    # a quantized checkpoint's tensor types as stored (a GGUF denoiser: "GGUF Q8_0")

    @property
    def phase(self) -> Phase:
        return _PHASE_OF[self.role]

    def to_dict(self) -> dict:
        d = {"name": self.name, "class_name": self.class_name, "role": self.role, "phase": self.phase,
             "weights_bytes": self.weights_bytes, "params": self.params, "dtype": self.dtype,
             "files": list(self.files)}
        if self.stored:
            d["stored"] = self.stored
        return d


@dataclass
class PipelineProfile:
    """A pipeline's needs. ``denoiser`` is the denoiser's block profile (blocks in run order with
    their module prefixes, as the runtime splits it); ``vae_scale`` pixels per latent position;
    ``patch`` latent positions per token side (2: the 2x2 patch of the unit)."""

    name: str
    path: str | None
    pipeline_class: str
    source: Literal["folder", "single-file", "catalog"]
    components: list[ComponentProfile]
    denoiser: ModelProfile
    vae_scale: int = 8
    latent_channels: int = 4
    text_tokens: int = 0
    layout: str | None = None
    eager_attention: bool = False
    notes: list[str] = field(default_factory=list)
    dequant_bytes: int = 0     # a quantized denoiser: its largest layer dequantized (live while it runs)
    config_folder: str | None = None    # where the components around a GGUF denoiser come from

    @property
    def weights_bytes(self) -> int:
        return sum(c.weights_bytes for c in self.components)

    def component(self, name: str) -> ComponentProfile:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def denoiser_component(self) -> ComponentProfile:
        return next(c for c in self.components if c.role == "denoiser")

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (the VAE's scale x the 2x2 token patch)."""
        return self.vae_scale * 2

    def check_size(self, w: ImageWorkload) -> None:
        m = self.pixel_multiple
        for what, v in (("height", w.height), ("width", w.width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise WorkloadError(f"{what} must be a positive whole number of pixels, not {v!r:.40}")
            if v % m:
                raise WorkloadError(f"{what} {v} is not a multiple of {m} (VAE scale {self.vae_scale} x 2x2 "
                                    f"latent patches); try {max(m, v // m * m)} or {(v // m + 1) * m}")
            if v > 1 << 16:
                raise WorkloadError(f"{what} {v} is beyond the {1 << 16} pixels this planner takes")
        for what, v, most in (("batch", w.batch, 1 << 12), ("steps", w.steps, 1 << 14)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise WorkloadError(f"{what} must be a whole number from 1 to {most}, not {v!r:.40}")
        if isinstance(w.guidance, bool) or not isinstance(w.guidance, (int, float)) or not math.isfinite(w.guidance) \
                or w.guidance < 0:
            raise WorkloadError(f"guidance must be a finite number >= 0, not {w.guidance!r:.40}")

    def image_tokens(self, w: ImageWorkload) -> int:
        m = self.pixel_multiple
        return (w.height // m) * (w.width // m)

    def denoise_tokens(self, w: ImageWorkload) -> int:
        """Tokens of one denoising forward per image: image tokens (+ text tokens for joint attention)."""
        return self.image_tokens(w) + self.text_tokens

    def activation_bytes(self, comp: ComponentProfile, w: ImageWorkload) -> int:
        """Peak workspace of a text encoder or the VAE decode for this workload (the denoiser's is
        the planner's BlockTable, per stage)."""
        b = resolve_dtype(comp.dtype).compute_bytes
        if comp.role in ("text_encoder", "other"):
            n = w.batch * (2 if w.cfg_doubles and w.guidance > 1.0 else 1)
            act = 12 * comp.tokens * comp.hidden * b * n
            if self.eager_attention:
                act += comp.heads * comp.tokens * comp.tokens * b * n
            return act
        if comp.role == "vae":
            act = 3 * comp.hidden * w.height * w.width * b * w.batch
            if self.eager_attention:
                pos = (w.height // self.vae_scale) * (w.width // self.vae_scale)
                act += pos * pos * b * w.batch
            return act
        return 0

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "pipeline_class": self.pipeline_class, "source": self.source,
                "layout": self.layout, "components": [c.to_dict() for c in self.components],
                "denoiser_blocks": [{"name": b.name, "weights_bytes": b.weights_bytes, "modules": b.modules}
                                    for b in self.denoiser.blocks],
                "weights_bytes": self.weights_bytes, "vae_scale": self.vae_scale, "text_tokens": self.text_tokens,
                **({"dequant_bytes": self.dequant_bytes} if self.dequant_bytes else {})}


# -- folders ---------------------------------------------------------------------------------------
# key prefixes only diffusion checkpoints (LDM / ComfyUI / A1111 single files) use
_DIFFUSION_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.",
                       "text_encoders.", "double_blocks.", "single_blocks.")


def is_pipeline(path: str | Path) -> bool:
    """A diffusers pipeline folder (model_index.json), or a single-file checkpoint whose keys are a
    diffusion checkpoint's (its layout known or not: an unknown one is refused by ``pipeline_profile``),
    or a folder with neither a model nor a pipeline in it (refused by ``pipeline_profile`` too)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return True
        return not ((p / "config.json").is_file() or any(p.glob("*.safetensors")) or any(p.glob("*.gguf"))
                    or (p / "model.safetensors.index.json").is_file())
    if p.is_file() and p.suffix == ".safetensors":
        try:
            tensors, _ = read_safetensors_header(p)
        except BadInputError:
            return False
        return any(t.name.startswith(_DIFFUSION_PREFIXES) for t in tensors)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_denoiser_arch(p) is not None
    return False


def _component_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        data = read_config(index[0])
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise MalformedCheckpointError(f"malformed safetensors index {index[0]}: no weight_map")
        missing = sorted({v for v in wm.values() if not (folder / v).is_file()})
        if missing:
            raise BadInputError(f"pipeline component {folder.name}: shard {missing[0]} is missing")
        return [folder / v for v in sorted(set(wm.values()))]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    # variants (model.fp16.safetensors) beside the main file: the main one
    plain = [p for p in files if p.name.count(".") == 1]
    return plain or files


def _role(name: str, class_name: str) -> Role:
    if class_name in _DENOISER_CLASSES or name in _DENOISER_NAMES:
        return "denoiser"
    if name.startswith("vae") or class_name.startswith("Autoencoder"):
        return "vae"
    if name.startswith("text_encoder"):
        return "text_encoder"
    return "other"


def _int(cfg: dict, *keys: str, default: int = 0) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def _text_tokens_of(cfg: dict, name: str, pipeline_class: str) -> int:
    if cfg.get("model_type") == "t5" or "T5" in str(cfg.get("architectures", "")):
        return FLUX_TEXT_TOKENS if "Flux" in pipeline_class else 256
    return _int(cfg, "max_position_embeddings", default=SDXL_TEXT_TOKENS)


def _read_component(folder: Path, name: str, class_name: str, pipeline_class: str) -> tuple[ComponentProfile,
                                                                                             list[HeaderTensor]]:
    sub = folder / name
    if not sub.is_dir():
        raise BadInputError(f"pipeline {folder} lists component {name!r} ({class_name}) but has no folder {name}/")
    files = _component_files(sub)
    if not files:
        raise BadInputError(f"pipeline component {name}/ has no .safetensors weights (pickle weights are refused)")
    cfg_path = sub / "config.json"
    if not cfg_path.is_file():
        raise BadInputError(f"pipeline component {name}/ has no config.json")
    cfg = read_config(cfg_path)
    tensors: list[HeaderTensor] = []
    for f in files:
        tensors.extend(read_safetensors_header(f)[0])
    role = _role(name, class_name)
    dtype = checkpoint_dtype(tensors) or "float32"
    hidden = heads = tokens = 0
    if role in ("text_encoder", "other"):
        hidden = _int(cfg, "hidden_size", "d_model")
        heads = _int(cfg, "num_attention_heads", "num_heads", default=1)
        tokens = _text_tokens_of(cfg, name, pipeline_class)
    elif role == "vae":
        chans = [int(c) for c in (cfg.get("block_out_channels") or [128])]
        hidden = chans[min(1, len(chans) - 1)]   # the channels that enter the full-resolution level
    comp = ComponentProfile(name=name, class_name=class_name, role=role,
                            weights_bytes=sum(t.nbytes for t in tensors), params=sum(t.numel for t in tensors),
                            dtype=dtype, files=tuple(str(f) for f in files), hidden=hidden, heads=heads,
                            tokens=tokens, config=cfg)
    return comp, tensors


def _grouped_blocks(tensors: list[HeaderTensor], prefix: str = "") -> list[tuple[str, tuple[str, ...], int, int]]:
    """(name, module prefixes, params, bytes) of a denoiser's blocks in run order: the modules before the
    body as "embed", each entry of each block list (``down_blocks.0``, ``transformer_blocks.3``, the mid
    block), then the modules after it as "final". Found from tensor names, for any ModelMixin."""
    heads: dict[str, list[int]] = {}
    body: dict[str, list[int]] = {}
    tails: dict[str, list[int]] = {}
    for t in tensors:
        if not t.name.startswith(prefix):
            continue
        parts = t.name[len(prefix):].split(".")
        top = parts[0]
        if len(parts) > 2 and parts[1].isdigit() and top not in _TAIL and \
                (top in BODY_LISTS or top.endswith("blocks") or top.endswith("layers")):
            key = f"{top}.{parts[1]}"
            acc = body
        elif top in _SINGLE_BODY:
            key, acc = top, body
        elif top in _TAIL:
            key, acc = top, tails
        else:
            key, acc = top, heads
        cell = acc.setdefault(key, [0, 0])
        cell[0] += t.numel
        cell[1] += t.nbytes

    def order(key: str) -> tuple:
        top, _, idx = key.partition(".")
        rank = BODY_LISTS.index(top) if top in BODY_LISTS else len(BODY_LISTS)
        return (rank, top, int(idx) if idx else 0)

    out: list[tuple[str, tuple[str, ...], int, int]] = []
    if heads:
        out.append(("embed", tuple(prefix + k for k in heads), sum(v[0] for v in heads.values()),
                    sum(v[1] for v in heads.values())))
    for k in sorted(body, key=order):
        out.append((k, (prefix + k,), body[k][0], body[k][1]))
    if tails:
        keys = [k for k in _TAIL if k in tails]
        out.append(("final", tuple(prefix + k for k in keys), sum(tails[k][0] for k in keys),
                    sum(tails[k][1] for k in keys)))
    if not body:
        raise BadInputError("the denoiser has no lists of blocks (down_blocks / transformer_blocks / ...) to split")
    return out


# single-file (original) names -> the diffusers modules the converted denoiser has
_SF_EMBED = {"sd15": ("conv_in", "time_embedding"), "sdxl": ("conv_in", "time_embedding", "add_embedding"),
             "sd3": ("pos_embed", "context_embedder", "time_text_embed"),
             "flux": ("x_embedder", "context_embedder", "time_text_embed")}
_SF_FINAL = {"sd15": ("conv_norm_out", "conv_out"), "sdxl": ("conv_norm_out", "conv_out"),
             "sd3": ("norm_out", "proj_out"), "flux": ("norm_out", "proj_out")}
_LDM_PER_LEVEL = 3    # SD1.5 / SDXL: 2 resnets (+ attentions) and a down/upsampler per level


def _sf_name(layout: str, name: str, per_level: int = _LDM_PER_LEVEL) -> str:
    top, _, idx = name.partition(".")
    if layout in ("sd15", "sdxl"):
        if top == "input_blocks":
            i = int(idx)
            return "embed" if i == 0 else f"down_blocks.{(i - 1) // per_level}"
        if top == "middle_block":
            return "mid_block"
        if top == "output_blocks":
            return f"up_blocks.{int(idx) // per_level}"
    return {"joint_blocks": "transformer_blocks", "double_blocks": "transformer_blocks",
            "single_blocks": "single_transformer_blocks"}.get(top, top) + (f".{idx}" if idx else "")


def _diffusers_groups(layout: str, groups: list[tuple[str, tuple[str, ...], int, int]],
                      per_level: int = _LDM_PER_LEVEL) -> list[tuple[str, tuple[str, ...], int, int]]:
    """A single file's blocks under the names of the diffusers model it converts to (the runtime
    splits the converted model): consecutive original blocks of one diffusers block merged. An LDM
    UNet has ``per_level`` input (and output) blocks per level: its resnets and the resampler
    (``layers_per_block`` + 1; 3 for SD1.5 and SDXL)."""
    out: list[tuple[str, tuple[str, ...], int, int]] = []
    for name, _, params, nbytes in groups:
        new = name if name in ("embed", "final") else _sf_name(layout, name, per_level)
        mods = _SF_EMBED[layout] if new == "embed" else _SF_FINAL[layout] if new == "final" else (new,)
        if out and out[-1][0] == new:
            last = out[-1]
            out[-1] = (new, last[1], last[2] + params, last[3] + nbytes)
        else:
            out.append((new, tuple(mods), params, nbytes))
    return out


def _denoiser_profile(name: str, comp: ComponentProfile, tensors: list[HeaderTensor], text_tokens: int,
                      eager: bool, prefix: str = "", arch: str | None = None,
                      layout: str | None = None) -> ModelProfile:
    groups = _grouped_blocks(tensors, prefix)
    if layout is not None:
        lpb = comp.config.get("layers_per_block")
        per_level = lpb + 1 if isinstance(lpb, int) and not isinstance(lpb, bool) and lpb > 0 else _LDM_PER_LEVEL
        groups = _diffusers_groups(layout, groups, per_level)
    dt = resolve_dtype(comp.dtype)
    cfg = dict(comp.config)
    arch = arch or str(cfg.get("_class_name") or comp.class_name)
    blocks = denoiser_blocks(arch, cfg, [(g[0], g[1], g[2]) for g in groups], dt, text_tokens, hidden=comp.hidden)
    blocks = [replace(b, weights_bytes=g[3], read_bytes_per_token=g[3]) for b, g in zip(blocks, groups, strict=True)]
    if eager:
        cfg["attn_implementation"] = "eager"
    hidden = comp.hidden or max((b.act_bytes_per_token for b in blocks), default=0)
    return ModelProfile(name=f"{name}/{comp.name}", arch=arch, kind="diffusion", dtype=dt.name, blocks=blocks,
                        source="local", hidden_size=hidden, num_layers=max(0, len(blocks) - 2), vocab_size=0,
                        max_position_embeddings=None, kv_dtype=dt.compute, layers_prefix="", config=cfg)


def module_denoiser_profile(module, name: str, *, arch: str = "module", text_tokens: int = 0,
                            eager_attention: bool = False) -> ModelProfile:
    """The block profile of a denoiser held as an ``nn.Module`` under its original names (ComfyUI's
    ``UNetModel`` / ``Flux`` ...: ``input_blocks.N``, ``middle_block``, ``double_blocks.N``), its
    parameters and buffers grouped into blocks as a checkpoint's tensors are (each tensor counted once,
    at the bytes it holds now). ``hidden`` (the width the activation formulas use) is its widest norm."""
    tensors: list[HeaderTensor] = []
    seen: set[int] = set()
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for tname, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        dt = str(t.dtype).removeprefix("torch.")
        tensors.append(HeaderTensor(tname, tuple(t.shape), codes.get(dt, dt), t.numel() * t.element_size(), ""))
    if not tensors:
        raise BadInputError(f"{name}: the denoiser holds no weights")
    dtype = checkpoint_dtype(tensors) or "float32"
    hidden = max((t.shape[0] for t in tensors if len(t.shape) == 1), default=0)
    comp = ComponentProfile(name="denoiser", class_name=type(module).__name__, role="denoiser",
                            weights_bytes=sum(t.nbytes for t in tensors), params=sum(t.numel for t in tensors),
                            dtype=dtype, hidden=hidden)
    prof = _denoiser_profile(name, comp, tensors, text_tokens, eager_attention, arch=arch)
    prof.name = name
    return prof


def _denoiser_hidden(cfg: dict) -> int:
    if cfg.get("num_attention_heads") and cfg.get("attention_head_dim") and "block_out_channels" not in cfg:
        return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    chans = cfg.get("block_out_channels")
    if isinstance(chans, list) and chans:
        return int(chans[-1])
    return _int(cfg, "hidden_size", "inner_dim")


def _folder_profile(folder: Path, eager: bool) -> PipelineProfile:
    index = read_config(folder / "model_index.json")
    pipeline_class = str(index.get("_class_name") or "")
    if not pipeline_class:
        raise BadInputError(f"{folder}/model_index.json names no pipeline class (_class_name)")
    comps: list[ComponentProfile] = []
    denoiser: tuple[ComponentProfile, list[HeaderTensor]] | None = None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers") or not isinstance(class_name, str):
            continue
        if "Tokenizer" in class_name or "Scheduler" in class_name or "Processor" in class_name \
                or "FeatureExtractor" in class_name:
            if not (folder / name).is_dir():
                raise BadInputError(f"pipeline {folder} lists {name!r} ({class_name}) but has no folder {name}/")
            continue
        comp, tensors = _read_component(folder, name, class_name, pipeline_class)
        comps.append(comp)
        if comp.role == "denoiser":
            if denoiser is not None:
                raise BadInputError(f"pipeline {folder} has two denoisers ({denoiser[0].name}, {name}); "
                                    "one is planned at a time")
            denoiser = (comp, tensors)
    if denoiser is None:
        raise BadInputError(f"pipeline {folder} has no denoiser (unet / transformer) with weights")
    if not any(c.role == "vae" for c in comps):
        raise BadInputError(f"pipeline {folder} has no VAE (vae/) to decode its latents")
    dcomp, dtensors = denoiser
    dcomp.hidden = _denoiser_hidden(dcomp.config)
    vae = next(c for c in comps if c.role == "vae")
    vae_scale = 2 ** (len(vae.config.get("block_out_channels") or [0, 0, 0, 0]) - 1)
    joint = dcomp.class_name != "UNet2DConditionModel" and "joint_attention_dim" in dcomp.config
    text_tokens = 0
    if joint:
        t5 = [c for c in comps if c.role == "text_encoder" and c.config.get("model_type") == "t5"]
        text_tokens = t5[0].tokens if t5 else SDXL_TEXT_TOKENS
        if "StableDiffusion3" in pipeline_class:
            text_tokens += SDXL_TEXT_TOKENS     # CLIP tokens concatenated before the T5 ones
    den = _denoiser_profile(folder.name, dcomp, dtensors, text_tokens, eager)
    return PipelineProfile(name=folder.name, path=str(folder), pipeline_class=pipeline_class, source="folder",
                           components=comps, denoiser=den, vae_scale=vae_scale,
                           latent_channels=int(vae.config.get("latent_channels") or 4), text_tokens=text_tokens,
                           eager_attention=eager)


# -- single files ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SingleFileLayout:
    """A single-file checkpoint layout: its key marker, the diffusers pipeline that loads it, and the
    key prefixes of each component (name, role, prefix)."""

    key: str
    pipeline_class: str
    marker: str
    components: tuple[tuple[str, Role, str], ...]
    text_tokens: int = 0


SINGLE_FILE_LAYOUTS: tuple[SingleFileLayout, ...] = (
    SingleFileLayout("sd3", "StableDiffusion3Pipeline", "model.diffusion_model.joint_blocks.",
                     (("text_encoder", "text_encoder", "text_encoders.clip_l."),
                      ("text_encoder_2", "text_encoder", "text_encoders.clip_g."),
                      ("text_encoder_3", "text_encoder", "text_encoders.t5xxl."),
                      ("transformer", "denoiser", "model.diffusion_model."),
                      ("vae", "vae", "first_stage_model.")), text_tokens=256 + SDXL_TEXT_TOKENS),
    SingleFileLayout("flux", "FluxPipeline", "double_blocks.",
                     (("transformer", "denoiser", "model.diffusion_model."), ("transformer", "denoiser", ""),
                      ("vae", "vae", "vae.")), text_tokens=FLUX_TEXT_TOKENS),
    SingleFileLayout("sdxl", "StableDiffusionXLPipeline", "conditioner.embedders.1.",
                     (("text_encoder", "text_encoder", "conditioner.embedders.0."),
                      ("text_encoder_2", "text_encoder", "conditioner.embedders.1."),
                      ("unet", "denoiser", "model.diffusion_model."), ("vae", "vae", "first_stage_model."))),
    SingleFileLayout("sd15", "StableDiffusionPipeline", "model.diffusion_model.input_blocks.",
                     (("text_encoder", "text_encoder", "cond_stage_model."),
                      ("unet", "denoiser", "model.diffusion_model."), ("vae", "vae", "first_stage_model."))),
)
_FLUX_KEY = re.compile(r"^(model\.diffusion_model\.)?double_blocks\.\d+\.")


def single_file_layout(names: list[str]) -> SingleFileLayout | None:
    """The layout a single-file checkpoint's tensor names show (SD3, Flux, SDXL, SD1.5), or None."""
    by = {lay.key: lay for lay in SINGLE_FILE_LAYOUTS}
    if any(n.startswith(by["sd3"].marker) for n in names):
        return by["sd3"]
    if any(_FLUX_KEY.match(n) for n in names):
        return by["flux"]
    if any(n.startswith(by["sdxl"].marker) for n in names) or any(
            n.startswith("model.diffusion_model.label_emb.") for n in names):
        return by["sdxl"]
    if any(n.startswith(by["sd15"].marker) for n in names):
        return by["sd15"]
    return None


def _single_file_profile(path: Path, eager: bool) -> PipelineProfile:
    tensors, _ = read_safetensors_header(path)
    layout = single_file_layout([t.name for t in tensors])
    if layout is None:
        raise UnknownModelError(f"{path.name}: not a single-file layout VRAMancer knows (SD1.5, SDXL, SD3, Flux "
                                "keys); a diffusers folder with model_index.json plans any pipeline")
    dtype = checkpoint_dtype(tensors) or "float32"
    owner: dict[str, tuple[str, Role, str]] = {}
    for t in tensors:
        for name, role, prefix in layout.components:   # the first prefix that matches (longest listed first)
            if t.name.startswith(prefix):
                owner.setdefault(t.name, (name, role, prefix))
                break
    comps: dict[str, ComponentProfile] = {}
    den_tensors: list[HeaderTensor] = []
    den_prefix = ""
    for t in tensors:
        hit = owner.get(t.name)
        if hit is None:
            continue
        name, role, prefix = hit
        c = comps.get(name)
        if c is None:
            c = comps[name] = ComponentProfile(name=name, class_name=name, role=role, weights_bytes=0, params=0,
                                               dtype=dtype, files=(str(path),))
        c.weights_bytes += t.nbytes
        c.params += t.numel
        if role == "denoiser":
            den_tensors.append(t)
            den_prefix = prefix
        if role == "text_encoder" and t.name.endswith(("token_embedding.weight", "shared.weight")) \
                and len(t.shape) == 2:
            c.hidden = t.shape[1]
            c.tokens = 256 if "t5" in prefix else SDXL_TEXT_TOKENS
        if role == "vae" and t.name.endswith("decoder.up.1.block.0.conv1.weight") and len(t.shape) == 4:
            c.hidden = t.shape[0]
    if "denoiser" not in {c.role for c in comps.values()}:  # pragma: no cover - the marker is a denoiser key
        raise UnknownModelError(f"{path.name}: no denoiser weights in the {layout.key} layout")
    den = next(c for c in comps.values() if c.role == "denoiser")
    den.hidden = max((t.shape[0] for t in den_tensors if len(t.shape) == 1), default=0)
    den_prof = _denoiser_profile(path.stem, den, den_tensors, layout.text_tokens, eager, prefix=den_prefix,
                                 arch=f"single-file:{layout.key}", layout=layout.key)
    notes = [f"single-file {layout.key} checkpoint; diffusers' from_single_file converts it when it runs "
             "(a local config folder is needed: nothing is downloaded)"]
    missing = [n for n, _, _ in layout.components if n not in comps]
    if missing:
        notes.append(f"not in the file: {', '.join(dict.fromkeys(missing))} (bring them as separate files)")
    return PipelineProfile(name=path.stem, path=str(path), pipeline_class=layout.pipeline_class,
                           source="single-file", components=list(comps.values()), denoiser=den_prof,
                           vae_scale=8, text_tokens=layout.text_tokens, layout=layout.key, eager_attention=eager,
                           notes=notes)


# -- GGUF denoisers (ComfyUI-GGUF: city96's convert tool) ---------------------------------------------
# general.architecture values that tool writes for image / video denoisers (an LLM's GGUF never has these)
GGUF_DIFFUSION_ARCHES = ("flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
                         "lumina2", "qwen_image", "chroma")
# those planned and run: architecture -> (single-file layout, pipeline class, denoiser class, component name)
GGUF_DENOISERS: dict[str, tuple[str, str, str, str]] = {
    "flux": ("flux", "FluxPipeline", "FluxTransformer2DModel", "transformer"),
    "sd1": ("sd15", "StableDiffusionPipeline", "UNet2DConditionModel", "unet"),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline", "UNet2DConditionModel", "unet"),
}
GGUF_PREFIX = "model.diffusion_model."     # the single-file prefix ComfyUI-GGUF files leave out
# tensor types diffusers loads as plain tensors cast to the compute dtype; every other type stays as stored
# (a GGUFParameter, dequantized by the layer that uses it)
GGUF_PLAIN_TYPES = ("F32", "F16")


def gguf_denoiser_arch(path: str | Path) -> str | None:
    """The general.architecture of a GGUF file when it is a diffusion denoiser's (``flux``, ``sdxl``,
    ...), else None (an LLM's GGUF, or a file that is not a readable GGUF: left to the model path)."""
    try:
        from .gguf_file import read_gguf

        fields, _ = read_gguf(path)
    except (BadInputError, OSError, ImportError):
        return None
    arch = str(fields.get("general.architecture") or "")
    return arch if arch in GGUF_DIFFUSION_ARCHES else None


def _config_dtype(comps: list[ComponentProfile]) -> str | None:
    dts = [c.dtype for c in comps if c.dtype in ("float32", "float16", "bfloat16")]
    return max(set(dts), key=dts.count) if dts else None


def _gguf_profile(path: Path, eager: bool, config: Path | None, dtype: str | None) -> PipelineProfile:
    """A GGUF denoiser (its blocks at the bytes they stay resident at: quantized tensors as stored,
    F32/F16 ones in the compute dtype), and, with ``config`` (a local diffusers folder of its pipeline),
    the other components from that folder's weights."""
    from .gguf_file import read_gguf

    fields, stored = read_gguf(path)
    arch = str(fields.get("general.architecture") or "")
    if arch not in GGUF_DENOISERS:
        raise UnknownModelError(f"{path.name}: a GGUF {arch!r} denoiser; the GGUF denoisers VRAMancer plans and runs "
                                f"are {', '.join(GGUF_DENOISERS)} (ComfyUI-GGUF's Flux transformers, SD1.5 and SDXL "
                                "UNets); SD3 and others run as single-file .safetensors or diffusers folders")
    key, pipeline_class, den_class, den_name = GGUF_DENOISERS[arch]
    names = [GGUF_PREFIX + t.name.removeprefix(GGUF_PREFIX) for t in stored]
    lay = single_file_layout(names)
    marker = {"flux": "double_blocks.0.*", "sd15": "input_blocks.1.*", "sdxl": "label_emb.*"}
    if lay is None or lay.key != key:
        raise MalformedCheckpointError(f"{path.name}: general.architecture says {arch!r} but its tensors are not a "
                                       f"{arch} denoiser's (no {key} block names such as {marker[key]})")
    comps: list[ComponentProfile] = []
    den_cfg: dict = {}
    vae_scale, latent_channels = 8, 16
    if config is not None:
        folder = Path(config)
        if not (folder / "model_index.json").is_file():
            raise BadInputError(f"--pipeline-config {folder}: not a diffusers pipeline folder (no model_index.json)")
        index = read_config(folder / "model_index.json")
        cls_name = str(index.get("_class_name") or "")
        if cls_name != pipeline_class:
            raise BadInputError(f"--pipeline-config {folder} is a {cls_name or 'pipeline without _class_name'}; "
                                f"{path.name} is a {arch} denoiser, run in a {pipeline_class}")
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None \
                    or not isinstance(spec[1], str) or name == den_name:
                continue
            if any(k in spec[1] for k in ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor")):
                continue
            comps.append(_read_component(folder, name, spec[1], pipeline_class)[0])
        if (folder / den_name / "config.json").is_file():
            den_cfg = read_config(folder / den_name / "config.json")
        vae = next((c for c in comps if c.role == "vae"), None)
        if vae is not None:
            vae_scale = 2 ** (len(vae.config.get("block_out_channels") or [0, 0, 0, 0]) - 1)
            latent_channels = int(vae.config.get("latent_channels") or latent_channels)
    if dtype is not None and resolve_dtype(dtype).name not in ("float32", "float16", "bfloat16"):
        raise BadInputError(f"--dtype {dtype}: a GGUF denoiser stays as stored; its compute dtype is float32, "
                            "float16 or bfloat16")
    compute = resolve_dtype(dtype).name if dtype else _config_dtype(comps) or "bfloat16"
    cb = resolve_dtype(compute).compute_bytes
    resident: list[HeaderTensor] = []
    dequant = 0
    kinds: dict[str, int] = {}
    for name, t in zip(names, stored, strict=True):
        plain = t.dtype in GGUF_PLAIN_TYPES
        resident.append(HeaderTensor(name, t.shape, t.dtype, t.numel * cb if plain else t.nbytes, t.file))
        if not plain:
            kinds[t.dtype] = kinds.get(t.dtype, 0) + t.nbytes
            # dequantized in float16 by diffusers' GGUF layers, then cast to the compute dtype
            dequant = max(dequant, t.numel * (2 if compute == "float16" else 2 + cb))
    quant = max(kinds, key=kinds.get) if kinds else "F16"
    den = ComponentProfile(name=den_name, class_name=den_class if den_cfg else f"gguf:{arch}", role="denoiser",
                           weights_bytes=sum(t.nbytes for t in resident), params=sum(t.numel for t in resident),
                           dtype=compute, files=(str(path),), config=den_cfg, stored=f"GGUF {quant}")
    if den_cfg:
        den.hidden = _denoiser_hidden(den_cfg)
    else:
        den.hidden = next((t.shape[0] for t in resident if t.name == GGUF_PREFIX + "img_in.weight"), 0) or \
            max((t.shape[0] for t in resident if len(t.shape) == 1), default=0)
    den_prof = _denoiser_profile(path.stem, den, resident, lay.text_tokens, eager, prefix=GGUF_PREFIX,
                                 arch=den_class if den_cfg else f"gguf:{arch}", layout=key)
    notes = [f"GGUF {arch} denoiser kept quantized ({quant}): blocks resident as stored, F32/F16 tensors in "
             f"{compute}; its largest layer is dequantized while it runs"]
    if config is None:
        notes.append(f"text encoders and VAE not planned: --pipeline-config DIR (a local {pipeline_class} folder) "
                     "plans them from its weights and is needed to run")
    elif not any(c.role == "vae" for c in comps):
        raise BadInputError(f"--pipeline-config {config}: no VAE (vae/) with weights to decode the latents")
    return PipelineProfile(name=path.stem, path=str(path), pipeline_class=pipeline_class, source="single-file",
                           components=[den, *comps], denoiser=den_prof, vae_scale=vae_scale,
                           latent_channels=latent_channels, text_tokens=lay.text_tokens, layout=f"gguf:{key}",
                           eager_attention=eager, notes=notes, dequant_bytes=dequant,
                           config_folder=None if config is None else str(config))


def pipeline_profile(path: str | Path, eager_attention: bool = False, config: str | Path | None = None,
                     dtype: str | None = None) -> PipelineProfile:
    """The profile of a diffusers pipeline folder, a single-file checkpoint or a GGUF denoiser
    (``config``: the local diffusers folder whose other components run with it; ``dtype``: its
    compute dtype, else that folder's) (BadInputError: not a pipeline, a component missing, an
    unknown single-file layout or GGUF architecture)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_profile(p, eager_attention, None if config is None else Path(config), dtype)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise BadInputError(f"{p} is neither a transformers model (config.json) nor a diffusers pipeline "
                                "(model_index.json)")
        return _folder_profile(p, eager_attention)
    if p.is_file() and p.suffix == ".safetensors":
        return _single_file_profile(p, eager_attention)
    raise BadInputError(f"{p}: expected a diffusers pipeline folder, a single-file .safetensors checkpoint or a "
                        "GGUF denoiser")



# -- catalog pipelines (benchmarks, `vramancer plan` of a published pipeline without its files) -----
@dataclass(frozen=True)
class _CatalogComponent:
    name: str
    role: Role
    params: int
    hidden: int
    heads: int = 1
    tokens: int = 0


# published parameter counts of the components around the catalog denoisers
_CLIP_L = _CatalogComponent("text_encoder", "text_encoder", 123_060_480, 768, 12, SDXL_TEXT_TOKENS)
_CATALOG_COMPONENTS: dict[str, tuple[str, tuple[_CatalogComponent, ...]]] = {
    "sdxl-unet": ("StableDiffusionXLPipeline", (
        _CLIP_L, _CatalogComponent("text_encoder_2", "text_encoder", 694_659_840, 1280, 20, SDXL_TEXT_TOKENS),
        _CatalogComponent("vae", "vae", 83_653_863, 256))),
    "flux.1-dev": ("FluxPipeline", (
        _CLIP_L, _CatalogComponent("text_encoder_2", "text_encoder", 4_762_310_656, 4096, 64, FLUX_TEXT_TOKENS),
        _CatalogComponent("vae", "vae", 83_819_683, 256))),
}
CATALOG_PIPELINES = tuple(_CATALOG_COMPONENTS)


def catalog_pipeline(key: str, dtype: str | None = None, eager_attention: bool = False) -> PipelineProfile:
    """A whole pipeline around a catalog denoiser (SDXL, FLUX.1-dev): the denoiser's block profile from
    the catalog, its text encoders and VAE from their published parameter counts, all in ``dtype``
    (the denoiser's default when None)."""
    from .catalog import find_model
    from .diffusion import diffusion_profile

    entry = find_model(key)
    if entry is None or entry.key not in _CATALOG_COMPONENTS:
        raise UnknownModelError(f"no catalog pipeline {key!r} (known: {', '.join(CATALOG_PIPELINES)})")
    den = diffusion_profile(entry, dtype)
    if eager_attention:
        den.config = dict(den.config or {}, attn_implementation="eager")
    dt = resolve_dtype(den.dtype)
    pipeline_class, parts = _CATALOG_COMPONENTS[entry.key]
    comps = [ComponentProfile(name="transformer" if "Flux" in pipeline_class else "unet",
                              class_name=entry.arch, role="denoiser", weights_bytes=den.weights_bytes,
                              params=den.params, dtype=den.dtype, hidden=den.hidden_size)]
    for c in parts:
        comps.append(ComponentProfile(name=c.name, class_name=c.name, role=c.role,
                                      weights_bytes=c.params * dt.compute_bytes, params=c.params,
                                      dtype=dt.compute, hidden=c.hidden, heads=c.heads, tokens=c.tokens))
    text_tokens = FLUX_TEXT_TOKENS if "Flux" in pipeline_class else 0
    return PipelineProfile(name=entry.key, path=None, pipeline_class=pipeline_class, source="catalog",
                           components=comps, denoiser=den, vae_scale=8, latent_channels=16 if text_tokens else 4,
                           text_tokens=text_tokens, eager_attention=eager_attention,
                           notes=["text encoders and VAE sized from their published parameter counts"])
