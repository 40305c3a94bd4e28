"""Pipeline profiles: exact bytes from the saved safetensors, the denoiser's blocks in run order,
activations that follow the image size, CFG and eager attention; single-file layouts from keys."""
from __future__ import annotations

import json
import struct

import pytest

from vramancer.errors import BadInputError, UnknownModelError, WorkloadError
from vramancer.models.pipeline import ImageWorkload, pipeline_profile, single_file_layout

torch = pytest.importorskip("torch")


def _stored_bytes(folder):
    from safetensors import safe_open

    total = {}
    for f in folder.glob("*/*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total[f.parent.name] = total.get(f.parent.name, 0) + sum(
                st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())  # noqa: SIM118 - safe_open is no dict
    return total


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_component_bytes_equal_saved_tensors(pipelines, kind):
    prof = pipeline_profile(pipelines[kind])
    stored = _stored_bytes(pipelines[kind])
    assert {c.name: c.weights_bytes for c in prof.components} == stored
    # the denoiser's blocks partition its weights exactly, and name real modules in run order
    den = prof.denoiser_component
    assert sum(b.weights_bytes for b in prof.denoiser.blocks) == den.weights_bytes == stored[den.name]
    import diffusers

    model = getattr(diffusers, den.class_name).from_pretrained(pipelines[kind] / den.name)
    named = dict(model.named_modules())
    for b in prof.denoiser.blocks:
        mods = [named[m] for m in b.modules]
        # what the module saves: parameters and persistent buffers (SD3's position table)
        assert sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values()) == b.weights_bytes
    names = [b.name for b in prof.denoiser.blocks]
    assert names[0] == "embed" and names[-1] == "final"
    if kind in ("sd15", "sdxl"):
        assert names[1:-1] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    elif kind == "flux":
        assert names[1:-1] == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                               "single_transformer_blocks.1"]


def test_activations_follow_size_batch_guidance_and_eager(pipelines):
    from vramancer.plan.memory import BlockTable
    from vramancer.plan.pipeline import denoiser_workload

    prof = pipeline_profile(pipelines["sdxl"])
    small = ImageWorkload(height=32, width=32, guidance=1.0)
    big = ImageWorkload(height=64, width=64, guidance=1.0)
    cfg = ImageWorkload(height=32, width=32, guidance=5.0)
    assert prof.image_tokens(big) == 4 * prof.image_tokens(small)
    assert cfg.denoise_batch == 2 and small.denoise_batch == 1

    def act(p, w):
        wl = denoiser_workload(p, w)
        return BlockTable(p.denoiser, wl.context, wl.batch, wl.prefill_chunk).act

    assert [4 * a for a in act(prof, small)] == act(prof, big)
    assert [2 * a for a in act(prof, small)] == act(prof, cfg)
    eager = pipeline_profile(pipelines["sdxl"], eager_attention=True)
    # scores only where the blocks attend, and only with eager attention
    diff = [e - a for e, a in zip(act(eager, small), act(prof, small))]
    assert diff[0] == 0 and diff[-1] == 0 and any(d > 0 for d in diff)
    vae = prof.component("vae")
    assert prof.activation_bytes(vae, big) == 4 * prof.activation_bytes(vae, small)


def test_size_the_vae_cannot_take(pipelines):
    prof = pipeline_profile(pipelines["sd15"])
    with pytest.raises(WorkloadError, match="not a multiple of 4"):
        prof.check_size(ImageWorkload(height=30, width=32))


def test_missing_component_and_not_a_pipeline(pipelines, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipelines["sd15"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(BadInputError, match="'vae'.*no folder vae/"):
        pipeline_profile(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="neither a transformers model"):
        pipeline_profile(empty)


def _write_safetensors(path, names_shapes):
    header, off = {}, 0
    for name, shape in names_shapes:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * off)
    return off


def test_single_file_layouts(tmp_path):
    sd15 = tmp_path / "sd15.safetensors"
    total = _write_safetensors(sd15, [
        ("model.diffusion_model.input_blocks.0.0.weight", (8, 4, 3, 3)),
        ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", (8,)),
        ("model.diffusion_model.middle_block.0.in_layers.0.weight", (8,)),
        ("model.diffusion_model.output_blocks.0.0.in_layers.0.weight", (16,)),
        ("model.diffusion_model.out.0.weight", (8,)),
        ("model.diffusion_model.time_embed.0.weight", (32, 8)),
        ("first_stage_model.decoder.conv_in.weight", (16, 4, 3, 3)),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (10, 8)),
    ])
    prof = pipeline_profile(sd15)
    assert prof.layout == "sd15" and prof.pipeline_class == "StableDiffusionPipeline"
    assert prof.weights_bytes == total
    assert {c.name for c in prof.components} == {"unet", "vae", "text_encoder"}
    # under the names of the diffusers UNet the file converts to (what the runtime splits)
    assert [b.name for b in prof.denoiser.blocks] == ["embed", "down_blocks.0", "mid_block", "up_blocks.0", "final"]
    assert prof.denoiser.blocks[0].modules == ["conv_in", "time_embedding"]
    assert prof.denoiser.blocks[0].weights_bytes == 2 * (8 * 4 * 9 + 32 * 8)
    assert sum(b.weights_bytes for b in prof.denoiser.blocks) == prof.denoiser_component.weights_bytes
    assert single_file_layout(["double_blocks.0.img_attn.qkv.weight"]).key == "flux"
    assert single_file_layout(["conditioner.embedders.1.model.ln_final.weight"]).key == "sdxl"
    assert single_file_layout(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]).key == "sd3"
    odd = tmp_path / "odd.safetensors"
    _write_safetensors(odd, [("model.diffusion_model.some_new_net.weight", (4, 4))])
    with pytest.raises(UnknownModelError, match="not a single-file layout"):
        pipeline_profile(odd)
