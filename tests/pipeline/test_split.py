"""Split pipelines make the unsplit pipeline's latents: SD1.5, SDXL, SD3 and Flux, over 2 and 3
simulated GPUs (backed by the CPU) and with one streamed denoiser stage."""
from __future__ import annotations

import warnings

import pytest

from vramancer.devices.spec import parse_devices
from vramancer.models.pipeline import ImageWorkload, pipeline_profile
from vramancer.plan.pipeline import plan_pipeline

from .tiny import HEIGHT, KINDS, WIDTH

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 2


def _latents(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe("the cat", num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.fixture(scope="module")
def reference(pipelines):
    refs = {}
    for k, folder in pipelines.items():
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        refs[k] = _latents(pipe)
    return refs


def _forced_plan(folder, n_gpus: int, stream: bool = False):
    """A plan whose denoiser blocks are dealt over ``n_gpus`` simulated GPUs (and, with ``stream``, the
    middle range kept in host RAM and streamed to the first GPU)."""
    prof = pipeline_profile(folder)
    spec = ",".join(["rtx3060:64MiB"] * n_gpus) + (",cpu:1GiB" if stream else "")
    devs = parse_devices(spec)
    n = prof.denoiser.num_blocks
    ids = []
    for b in range(n):
        ids.append(devs[min(b * n_gpus // n, n_gpus - 1)].id)
    if stream:
        mid = n // 2
        ids[mid] = devs[-1].id
    w = ImageWorkload(height=HEIGHT, width=WIDTH, batch=1, steps=STEPS, guidance=5.0,
                      cfg_doubles="Flux" not in prof.pipeline_class)
    return plan_pipeline(prof, devs, w, reserve_bytes=0, block_devices=ids,
                         offload_mode="stream" if stream else None)


def _load(folder, plan):
    import vramancer

    pipe = vramancer.load_pipeline(folder, plan=plan)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_gpus", [2, 3])
def test_split_latents_equal_unsplit(pipelines, reference, kind, n_gpus):
    plan = _forced_plan(pipelines[kind], n_gpus)
    assert len({s.device for s in plan.stages}) == n_gpus
    pipe = _load(pipelines[kind], plan)
    lat = _latents(pipe)
    assert torch.allclose(lat, reference[kind], atol=1e-5, rtol=0)
    rt = pipe.vramancer
    # every later stage was entered once per denoising forward (CFG in one batch)
    assert rt.denoiser_calls == STEPS
    assert all(s["crossings"] == STEPS for s in rt.boundary_stats()[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_stage_latents_equal_unsplit(pipelines, reference, kind):
    plan = _forced_plan(pipelines[kind], 2, stream=True)
    streamed = [s for s in plan.stages if s.mode == "stream"]
    assert len(streamed) == 1 and streamed[0].kind == "cpu" and plan.stream_buffers
    pipe = _load(pipelines[kind], plan)
    lat = _latents(pipe)
    assert torch.allclose(lat, reference[kind], atol=1e-5, rtol=0)
    eng = pipe.vramancer.engines
    # one streamed unit: loaded into a slot once, found there (a prefetch hit) at every later step
    assert len(eng) == 1 and eng[0].loads + eng[0].prefetch_hits == STEPS * len(eng[0].units)
    blk = plan.blocks[streamed[0].blocks[0]]
    assert eng[0].copied_bytes == eng[0].loads * blk.weights_bytes


def test_planner_splits_sd15_over_three_small_gpus(pipelines, reference):
    """The planner itself, not a forced placement: three 400 KiB cards cannot hold the tiny UNet's
    weights and workspace on fewer than three."""
    import vramancer

    pipe = vramancer.load_pipeline(pipelines["sd15"], devices="rtx3060:400KiB,rtx3060:400KiB,rtx3060:400KiB",
                                   height=HEIGHT, width=WIDTH, steps=STEPS, guidance=1.0, reserve_bytes=0)
    pipe.set_progress_bar_config(disable=True)
    plan = pipe.vramancer.plan
    assert len(plan.stages) == 3 and plan.fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pipe("the cat", num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent",
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
        ref = diffusers.DiffusionPipeline.from_pretrained(pipelines["sd15"], local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        b = ref("the cat", num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent",
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_moved_components_and_evicted_stages(pipelines):
    """Text encoder and VAE moved in for their phase, each sending the denoiser's stage on their GPU to
    host RAM meanwhile: the image is the unsplit pipeline's, and the stages are back for every step."""
    from dataclasses import replace

    plan = _forced_plan(pipelines["sd15"], 2)
    last = len(plan.stages) - 1
    comps = []
    for c in plan.components:
        if c.role == "text_encoder":
            c = replace(c, mode="moved", device=plan.stages[0].device, evicts=(0,))
        elif c.role == "vae":
            c = replace(c, mode="moved", device=plan.stages[last].device, evicts=(last,))
        comps.append(c)
    plan.components = comps
    plan.validate()
    pipe = _load(pipelines["sd15"], plan)
    kw = dict(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pipe("the cat", generator=torch.Generator().manual_seed(0), **kw).images
        ref = diffusers.DiffusionPipeline.from_pretrained(pipelines["sd15"], local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        b = ref("the cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    rt = pipe.vramancer
    assert rt.evictions == 2 and rt.moved["text_encoder"].moves == 1 and rt.moved["vae"].moves == 1
    bad = replace(plan.components[-1], evicts=(0,)) if plan.stages[0].device != plan.components[-1].device \
        else replace(plan.components[-1], evicts=(99,))
    plan.components = plan.components[:-1] + [bad]
    from vramancer.errors import BadInputError

    with pytest.raises(BadInputError, match="evicts"):
        plan.validate()


def test_host_only_plan_runs_components_on_the_cpu(pipelines, reference):
    """No GPU at all: the denoiser executes in host RAM and every other component runs on the CPU."""
    import vramancer

    pipe = vramancer.load_pipeline(pipelines["sdxl"], devices="cpu:4GiB", height=HEIGHT, width=WIDTH, steps=STEPS,
                                   guidance=5.0)
    pipe.set_progress_bar_config(disable=True)
    plan = pipe.vramancer.plan
    assert {c.mode for c in plan.components if c.role != "denoiser"} == {"cpu"}
    assert all(s.kind == "cpu" for s in plan.stages)
    assert torch.allclose(_latents(pipe), reference["sdxl"], atol=1e-5, rtol=0)
