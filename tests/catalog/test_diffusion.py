"""Diffusion catalog entries: the stored per-block parameter counts equal what diffusers builds from
the stored configs (meta device), and the profile follows the documented formulas."""
from __future__ import annotations

import math

import pytest

from vramancer.errors import UnknownModelError, WorkloadError
from vramancer.models.catalog import find_model
from vramancer.models.diffusion import FLUX_TEXT_TOKENS, diffusion_profile
from vramancer.models.dtypes import resolve_dtype

FLUX = find_model("flux.1-dev")
SDXL = find_model("sdxl-unet")


def _build_on_meta(entry):
    diffusers = pytest.importorskip("diffusers")
    accelerate = pytest.importorskip("accelerate")
    cfg = {k: v for k, v in entry.config_copy().items() if not k.startswith("_")}
    cls = getattr(diffusers, entry.config["_class_name"])
    with accelerate.init_empty_weights():
        return cls(**cfg)


@pytest.fixture(scope="module")
def flux_model():
    return _build_on_meta(FLUX)


@pytest.fixture(scope="module")
def sdxl_model():
    return _build_on_meta(SDXL)


def _owner(param_name: str, blocks) -> list[str]:
    return [name for name, prefixes, _ in blocks
            if any(param_name == p or param_name.startswith(p + ".") for p in prefixes)]


@pytest.mark.parametrize("entry,fixture", [(FLUX, "flux_model"), (SDXL, "sdxl_model")], ids=["flux", "sdxl"])
def test_stored_block_params_match_diffusers(entry, fixture, request):
    model = request.getfixturevalue(fixture)
    counted = {name: 0 for name, _, _ in entry.blocks}
    for pname, p in model.named_parameters():
        owners = _owner(pname, entry.blocks)
        assert len(owners) == 1, (pname, owners)   # every parameter in exactly one block
        counted[owners[0]] += p.numel()
    assert counted == {name: params for name, _, params in entry.blocks}
    assert sum(counted.values()) == sum(p.numel() for p in model.parameters())
    # the top-level modules in placement order (block 0 first, then repeated blocks, then the head)
    tops = [n for n, _ in model.named_children()]
    for _, prefixes, _ in entry.blocks:
        for prefix in prefixes:
            assert prefix.split(".")[0] in tops


def test_flux_block_layout_and_published_size():
    names = [b[0] for b in FLUX.blocks]
    assert names[0] == "embed" and names[-1] == "out" and len(names) == 1 + 19 + 38 + 1
    assert names[1:20] == [f"transformer_blocks.{i}" for i in range(19)]
    assert names[20:58] == [f"single_transformer_blocks.{i}" for i in range(38)]
    total = sum(b[2] for b in FLUX.blocks)
    assert total == 11_901_408_320 and abs(total / FLUX.params_published - 1) < 0.01
    assert sum(b[2] for b in SDXL.blocks) == 2_567_463_684 == SDXL.params_published
    assert [b[0] for b in SDXL.blocks] == ["embed", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                                          "up_blocks.0", "up_blocks.1", "up_blocks.2", "out"]


def test_flux_per_token_flops_are_the_linear_weights_one_token_passes(flux_model):
    """flops_per_token of a Flux block = 2 x the linear weights (with biases) of one stream."""
    def n(module):
        return sum(p.numel() for p in module.parameters())

    prof = diffusion_profile(FLUX, "bfloat16")
    dbl = flux_model.transformer_blocks[0]
    image_path = n(dbl.attn.to_q) + n(dbl.attn.to_k) + n(dbl.attn.to_v) + n(dbl.attn.to_out) + n(dbl.ff)
    text_path = (n(dbl.attn.add_q_proj) + n(dbl.attn.add_k_proj) + n(dbl.attn.add_v_proj)
                 + n(dbl.attn.to_add_out) + n(dbl.ff_context))
    assert image_path == text_path
    assert prof.blocks[1].flops_per_token == 2 * image_path
    sgl = flux_model.single_transformer_blocks[0]
    single_path = n(sgl.attn.to_q) + n(sgl.attn.to_k) + n(sgl.attn.to_v) + n(sgl.proj_mlp) + n(sgl.proj_out)
    assert prof.blocks[20].flops_per_token == 2 * single_path


def test_flux_profile_bf16():
    p = diffusion_profile(FLUX, "bfloat16")
    assert (p.kind, p.arch, p.dtype, p.name, p.source) == ("diffusion", "FluxTransformer2DModel", "bfloat16",
                                                          "flux.1-dev", "catalog")
    assert p.num_blocks == 59 and p.params == 11_901_408_320
    assert p.weights_bytes == 2 * 11_901_408_320
    assert p.max_position_embeddings == 4096 + FLUX_TEXT_TOKENS
    assert p.kv_bytes_per_token == 0 and p.kv_bytes(100_000, 4) == 0
    d = 3072
    for b in p.blocks:
        assert b.read_bytes_per_token == b.weights_bytes == 2 * b.params
        assert b.modules and b.kv_window is None and not b.shared
    double, single = p.blocks[1], p.blocks[20]
    assert double.act_bytes_per_token == 11 * d * 2              # max(11, 2 + 2r) d b with r = 4
    assert single.act_bytes_per_token == 12 * d * 2              # max(8 + r, 2 + 2r) d b
    assert double.attn_score_bytes == single.attn_score_bytes == 24 * 2
    assert double.attn_flops_per_token_per_ctx == 4 * d
    assert p.blocks[0].attn_score_bytes == p.blocks[-1].attn_score_bytes == 0
    assert p.config == FLUX.config and p.config is not FLUX.config


def test_profile_in_other_dtypes_and_token_counts():
    q4 = resolve_dtype("q4_k_m")
    p = diffusion_profile(FLUX, "q4_k_m")
    assert [b.weights_bytes for b in p.blocks] == [q4.matrix_bytes(b.params) for b in p.blocks]
    assert p.quantization == "q4_k_m" and p.kv_dtype == "float16"
    assert p.blocks[1].act_bytes_per_token == 11 * 3072 * 2      # compute stays 16-bit
    f32 = diffusion_profile(SDXL, "fp32")
    assert f32.dtype == "float32" and f32.weights_bytes == 4 * 2_567_463_684
    assert diffusion_profile(SDXL).dtype == "bfloat16"           # the entry's default
    # a longer image sequence: same per-token workspace, longer sequence; the embedder's FLOPs per
    # token lean towards the (cheap) image-token x_embedder
    small, big = diffusion_profile(FLUX, "bf16", image_tokens=1024), diffusion_profile(FLUX, "bf16", image_tokens=16384)
    assert big.max_position_embeddings == 16384 + FLUX_TEXT_TOKENS
    assert big.blocks[1].act_bytes_per_token == small.blocks[1].act_bytes_per_token
    assert big.blocks[0].flops_per_token < small.blocks[0].flops_per_token


def test_sdxl_profile_follows_the_levels():
    p = diffusion_profile(SDXL, "float16")
    assert p.arch == "UNet2DConditionModel" and p.num_blocks == 9 and p.max_position_embeddings == 4096
    by = {b.name: b for b in p.blocks}
    # every weight applies once per latent position: 4 positions per token at full res, 1 at /2, 1/4 at /4
    assert by["down_blocks.0"].flops_per_token == 2 * by["down_blocks.0"].params * 4
    assert by["down_blocks.1"].flops_per_token == 2 * by["down_blocks.1"].params * 1
    assert by["mid_block"].flops_per_token == 2 * by["mid_block"].params / 4
    # self-attention scores per token pair: heads x 2 bytes x positions-per-token^2
    assert by["down_blocks.1"].attn_score_bytes == 10 * 2 * 1
    assert by["down_blocks.2"].attn_score_bytes == math.ceil(20 * 2 / 16)
    assert by["down_blocks.0"].attn_score_bytes == by["up_blocks.2"].attn_score_bytes == 0
    # down_blocks.1 (640 ch at /2, cross-attention): transformer peak 18 C + 2 skips at /2 + 1 at /4
    # + cross-attention scores over 77 text tokens
    assert by["down_blocks.1"].act_bytes_per_token == math.ceil((18 * 640 + 2 * 640 + 640 / 4 + 10 * 77) * 2)
    # SDXL: one step at 1024x1024 is a few TFLOPs
    step = sum(b.flops_per_token for b in p.blocks) * 4096
    assert 4e12 < step < 10e12


def test_bad_requests_raise_clear_errors():
    with pytest.raises(UnknownModelError):
        diffusion_profile(find_model("llama-3.1-8b"), "bfloat16")
    for bad in (0, -5, 3.5, True):
        with pytest.raises(WorkloadError):
            diffusion_profile(FLUX, "bfloat16", image_tokens=bad)
    with pytest.raises(WorkloadError):
        diffusion_profile(FLUX, "float8_e4m3")
