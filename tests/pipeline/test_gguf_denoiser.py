"""GGUF image denoisers (ComfyUI-GGUF Flux transformers): planned from the GGUF header at the bytes
they stay resident at (quantized blocks as stored), loaded kept quantized by diffusers' GGUF support,
split over simulated GPUs by the PipelineRuntime; the latents equal diffusers' own unsplit GGUF
pipeline's. Nothing is downloaded: the tiny pipeline and its GGUF files are written here."""
from __future__ import annotations

import json
import warnings

import pytest

from vramancer.cli import main
from vramancer.devices.spec import parse_devices
from vramancer.models.pipeline import ImageWorkload, pipeline_profile
from vramancer.plan.pipeline import plan_pipeline

from .gguf_flux import bfl_state_dict, build_flux_folder, gguf_type, write_diffusers_gguf, write_flux_gguf
from .tiny import HEIGHT, WIDTH

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("gguf")

STEPS = 2
KW = dict(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, guidance_scale=3.5)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = build_flux_folder(root / "flux")
        sizes = write_flux_gguf(folder, root / "flux-Q8_0.gguf")
        write_diffusers_gguf(folder, root / "flux-diffusers-Q8_0.gguf")
    return {"folder": folder, "gguf": root / "flux-Q8_0.gguf", "ref_gguf": root / "flux-diffusers-Q8_0.gguf",
            "sizes": sizes}


def _transformer(folder):
    return diffusers.FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True)


def _reference(flux, output_type="latent"):
    """diffusers' own GGUF pipeline, unsplit: the same tensors quantized the same way under diffusers'
    names (no conversion), loaded by from_single_file with GGUFQuantizationConfig."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = diffusers.FluxTransformer2DModel.from_single_file(
            str(flux["ref_gguf"]), config=str(flux["folder"]), subfolder="transformer", torch_dtype=torch.float32,
            local_files_only=True, quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32))
        pipe = diffusers.FluxPipeline.from_pretrained(flux["folder"], transformer=tr, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe("the cat", generator=torch.Generator().manual_seed(0), output_type=output_type, **KW).images


def _block_of(bfl_name: str) -> str:
    top, _, rest = bfl_name.partition(".")
    if top == "double_blocks":
        return f"transformer_blocks.{rest.split('.')[0]}"
    if top == "single_blocks":
        return f"single_transformer_blocks.{rest.split('.')[0]}"
    return "final" if top == "final_layer" else "embed"


def test_bfl_names_convert_back_to_the_same_values(flux):
    """The fixture's BFL layout is the inverse of the conversion the loader runs (diffusers' converter,
    the single blocks' linear1 split at the file's width): every tensor comes back, equal."""
    from vramancer.runtime.pipeline import flux_to_diffusers

    sd = _transformer(flux["folder"]).state_dict()
    bfl = bfl_state_dict(sd)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    back = flux_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_plan_bytes_are_the_gguf_bytes(flux, dtype):
    """Per block: quantized tensors at their GGUF bytes, F32/F16 ones at the compute dtype's (diffusers
    casts those); the dequantized transient is the largest quantized layer in float16 and the compute dtype."""
    prof = pipeline_profile(flux["gguf"], dtype=dtype)
    cb = 2 if dtype == "bfloat16" else 4
    tr = _transformer(flux["folder"])
    bfl = bfl_state_dict(tr.state_dict())
    want: dict[str, int] = {}
    quantized = 0
    largest = 0
    for name, t in bfl.items():
        kind = gguf_type(tuple(t.shape))
        n = flux["sizes"][name] if kind == "Q8_0" else t.numel() * cb
        if kind == "Q8_0":
            assert n == t.numel() // 32 * 34     # Q8_0: 32 weights in 34 bytes
            quantized += n
            largest = max(largest, t.numel())
        want[_block_of(name)] = want.get(_block_of(name), 0) + n
    got = {b.name: b.weights_bytes for b in prof.denoiser.blocks}
    assert got == want
    assert [b.name for b in prof.denoiser.blocks] == ["embed", "transformer_blocks.0", "transformer_blocks.1",
                                                      "single_transformer_blocks.0", "single_transformer_blocks.1",
                                                      "final"]
    den = prof.denoiser_component
    assert den.weights_bytes == sum(want.values()) and den.stored == "GGUF Q8_0" and den.dtype == dtype
    assert quantized > sum(want.values()) // 2          # the linears are most of it, kept quantized
    assert prof.dequant_bytes == largest * (2 + cb)
    assert [c.name for c in prof.components] == ["transformer"] and "--pipeline-config" in " ".join(prof.notes)


def test_plan_with_config_plans_the_other_components_from_their_weights(flux):
    prof = pipeline_profile(flux["gguf"], config=flux["folder"])
    folder = pipeline_profile(flux["folder"])
    assert {c.name for c in prof.components} == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    for c in prof.components:
        if c.role != "denoiser":
            assert c.weights_bytes == folder.component(c.name).weights_bytes
    # the folder's transformer is float32 (its own safetensors); the GGUF one is mostly Q8_0
    assert prof.denoiser_component.weights_bytes < folder.denoiser_component.weights_bytes // 3
    assert prof.denoiser.dtype == "float32" and prof.vae_scale == folder.vae_scale
    plan = plan_pipeline(prof, parse_devices("rtx3060:64MiB,cpu:1GiB"),
                         ImageWorkload(height=HEIGHT, width=WIDTH, steps=STEPS, cfg_doubles=False), reserve_bytes=0)
    den = plan.components[0]
    assert den.weights_bytes == prof.denoiser_component.weights_bytes
    stage_act = max(s.activation_bytes for s in plan.stages)
    assert den.activation_bytes == stage_act + prof.dequant_bytes
    peak = next(p for p in plan.phase_peaks if p.phase == "denoise" and p.device == plan.stages[0].device)
    encode = next(p for p in plan.phase_peaks if p.phase == "encode" and p.device == plan.stages[0].device)
    assert peak.bytes >= sum(s.weights_bytes for s in plan.stages) + prof.dequant_bytes
    assert encode.bytes < peak.bytes


def _measured(stage) -> int:
    """Bytes of the tensors' storages a stage's modules hold (each storage once)."""
    seen: dict[int, int] = {}
    for _, m in stage.units:
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("how", ["planner", "forced"])
def test_split_over_two_gpus_kept_quantized_equals_unsplit_gguf(flux, how):
    """Blocks over two simulated GPUs (the planner's split of two 1 MiB cards, which cannot hold the
    transformer, its workspace and its dequantized layer on one; or dealt half and half): each stage
    holds exactly its planned bytes (quantized blocks as GGUFParameter), and the latents are diffusers'
    unsplit GGUF pipeline's, bit for bit (and not the float pipeline's: the quantized weights ran)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    import vramancer

    prof = pipeline_profile(flux["gguf"], config=flux["folder"])
    w = ImageWorkload(height=HEIGHT, width=WIDTH, steps=STEPS, cfg_doubles=False)
    if how == "planner":
        devs = parse_devices("rtx3060:1MiB,rtx3060:1MiB,cpu")
        plan = plan_pipeline(prof, devs, w, reserve_bytes=0)
        assert plan.fits and all(s.mode == "execute" and s.kind == "gpu" for s in plan.stages)
        # one GPU would need the whole transformer + its workspace + the dequantized layer: over 1 MiB
        one = max(s.activation_bytes for s in plan.stages) + prof.denoiser_component.weights_bytes
        assert one + prof.dequant_bytes > 1 << 20
    else:
        devs = parse_devices("rtx3060:64MiB,rtx3060:64MiB,cpu:1GiB")
        n = prof.denoiser.num_blocks
        ids = [devs[0].id if b < n // 2 else devs[1].id for b in range(n)]
        plan = plan_pipeline(prof, devs, w, reserve_bytes=0, block_devices=ids)
    assert len({s.device for s in plan.stages}) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = vramancer.load_pipeline(flux["gguf"], plan=plan, config=flux["folder"])
        pipe.set_progress_bar_config(disable=True)
        lat = pipe("the cat", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).images
    rt = pipe.vramancer
    for st, run in zip(plan.stages, rt.stages, strict=True):
        assert _measured(run) == st.weights_bytes
        quant = [p for _, m in run.units for p in m.parameters() if isinstance(p, GGUFParameter)]
        assert quant and all(p.dtype == torch.uint8 for p in quant)
    assert sum(_measured(r) for r in rt.stages) == prof.denoiser_component.weights_bytes
    assert rt.denoiser_calls == STEPS
    assert torch.equal(lat, _reference(flux))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fl = diffusers.FluxPipeline.from_pretrained(flux["folder"], local_files_only=True)
        fl.set_progress_bar_config(disable=True)
        flt = fl("the cat", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).images
    assert not torch.equal(lat, flt)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--height", HEIGHT, "--width", WIDTH, "--steps", STEPS, "--reserve", "0"]


def test_cli_plan_with_and_without_config(flux, capsys):
    code, out, err = _cli(capsys, "plan", flux["gguf"], "--pipeline-config", flux["folder"], "-d",
                          "rtx3060:64MiB,rtx3060:64MiB", *SMALL, "--json")
    assert code == 0, err
    d = json.loads(out)
    comps = {c["name"]: c for c in d["components"]}
    assert set(comps) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert comps["transformer"]["weights_bytes"] == pipeline_profile(flux["gguf"], config=flux["folder"]) \
        .denoiser_component.weights_bytes
    code, out, err = _cli(capsys, "plan", flux["gguf"], "-d", "rtx3060:64MiB", *SMALL)
    assert code == 0, err
    assert "transformer" in out and "GGUF flux denoiser kept quantized (Q8_0)" in out and "vae" not in out


def test_cli_run_writes_the_unsplit_gguf_pipelines_image(flux, capsys, tmp_path):
    import numpy as np
    from PIL import Image

    out_png = tmp_path / "out.png"
    code, out, err = _cli(capsys, "run", flux["gguf"], "--pipeline-config", flux["folder"], "-p", "the cat",
                          "-d", "rtx3060:64MiB,rtx3060:64MiB", *SMALL, "--guidance", "3.5", "-o", out_png)
    assert code == 0, err
    assert "wrote" in out
    ref = _reference(flux, output_type="pil")[0]
    assert np.array_equal(np.asarray(Image.open(out_png).convert("RGB")), np.asarray(ref))


def _write_gguf(path, arch: str, names: list[str]):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    for n in names:
        w.add_tensor(n, np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["sd3", "flux-names", "truncated", "no-config", "wrong-config"])
def test_bad_gguf_one_line_exit_2(flux, tmp_path, capsys, case, pipelines):
    path = tmp_path / f"{case}.gguf"
    cmd = "plan"
    extra: list = []
    if case == "sd3":
        _write_gguf(path, "sd3", ["joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"])
        want = "GGUF denoisers VRAMancer plans and runs are flux, sd1, sdxl"
    elif case == "flux-names":
        _write_gguf(path, "flux", ["blk.0.attn_q.weight", "token_embd.weight"])
        want = "not a flux denoiser's"
    elif case == "truncated":
        path.write_bytes(flux["gguf"].read_bytes()[:200])
        want = "GGUF"
    elif case == "no-config":
        path = flux["gguf"]
        cmd, extra, want = "run", ["-p", "a cat"], "--pipeline-config DIR"
    else:
        path = flux["gguf"]
        cmd, extra, want = "run", ["-p", "a cat", "--pipeline-config", pipelines["sd15"]], "StableDiffusionPipeline"
    code, out, err = _cli(capsys, cmd, path, "-d", "rtx3060:64MiB", *SMALL, *extra, "-o", tmp_path / "o.png")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and want in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_offloaded_blocks_run_in_host_ram_not_streamed(flux):
    """A block placed in host RAM runs there (executed, still quantized): the latents are the unsplit
    GGUF pipeline's. Streaming a GGUF denoiser's blocks is refused in one line (the stream engine copies
    plain tensors; diffusers' GGUF layers need their GGUFParameter)."""
    import vramancer
    from vramancer.errors import WorkloadError

    prof = pipeline_profile(flux["gguf"], config=flux["folder"])
    devs = parse_devices("rtx3060:64MiB,rtx3060:64MiB,cpu:1GiB")
    n = prof.denoiser.num_blocks
    ids = [devs[0].id if b < n // 2 else devs[1].id for b in range(n)]
    ids[n // 2] = devs[-1].id
    w = ImageWorkload(height=HEIGHT, width=WIDTH, steps=STEPS, cfg_doubles=False)
    with pytest.raises(WorkloadError, match="streaming them to a GPU is not supported"):
        plan_pipeline(prof, devs, w, reserve_bytes=0, block_devices=ids, offload_mode="stream")
    plan = plan_pipeline(prof, devs, w, reserve_bytes=0, block_devices=ids)
    host = [s for s in plan.stages if s.kind == "cpu"]
    assert len(host) == 1 and host[0].mode == "execute" and not plan.stream_buffers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = vramancer.load_pipeline(flux["gguf"], plan=plan, config=flux["folder"])
        pipe.set_progress_bar_config(disable=True)
        lat = pipe("the cat", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).images
    assert not pipe.vramancer.engines
    assert torch.equal(lat, _reference(flux))


def test_sdxl_unet_gguf_header_profiles_as_sdxl(tmp_path):
    """An SDXL UNet as ComfyUI-GGUF writes it (general.architecture "sdxl", LDM names without the
    model.diffusion_model. prefix, label_emb present): an SDXL pipeline's UNet, its LDM blocks grouped
    under diffusers' names (3 input / output blocks per level), bytes as stored. (Loading one runs
    through diffusers' LDM converter as the SD1.5 integration test checks; no SDXL fixture here.)"""
    names = ["time_embed.0.weight", "label_emb.0.0.weight", "input_blocks.0.0.weight"]
    names += [f"input_blocks.{i}.0.in_layers.0.weight" for i in range(1, 7)]
    names += ["middle_block.0.in_layers.0.weight"]
    names += [f"output_blocks.{i}.0.in_layers.0.weight" for i in range(6)]
    names += ["out.0.weight", "out.2.weight"]
    path = tmp_path / "sdxl-unet.gguf"
    _write_gguf(path, "sdxl", names)
    prof = pipeline_profile(path)
    assert prof.pipeline_class == "StableDiffusionXLPipeline" and prof.denoiser_component.name == "unet"
    assert [b.name for b in prof.denoiser.blocks] == ["embed", "down_blocks.0", "down_blocks.1", "mid_block",
                                                      "up_blocks.0", "up_blocks.1", "final"]
    # F32 (4, 32) tensors: diffusers casts them to the compute dtype (bfloat16 without a config folder)
    assert prof.denoiser.blocks[1].weights_bytes == 3 * 4 * 32 * 2
    assert prof.denoiser_component.weights_bytes == len(names) * 4 * 32 * 2
