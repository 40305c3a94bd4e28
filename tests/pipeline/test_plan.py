"""The phase-aware planner on catalog pipelines (no weights, no torch): placements, peaks per phase,
moved components that send the denoiser's stage to host RAM, the other tools' placements judged
with the same model."""
from __future__ import annotations

import pytest

from vramancer.devices.spec import parse_devices
from vramancer.errors import DoesNotFitError, WorkloadError
from vramancer.models.pipeline import ImageWorkload, catalog_pipeline
from vramancer.plan.pipeline import plan_pipeline
from vramancer.plan.plan import Plan

FLUX = ImageWorkload(height=1024, width=1024, steps=28, guidance=3.5, cfg_doubles=False)
SDXL = ImageWorkload(height=1024, width=1024, steps=28, guidance=5.0)


def _peaks_within(plan: Plan) -> bool:
    return all(p.bytes <= p.capacity_bytes for p in plan.phase_peaks)


def test_flux_on_12_8_6_moves_t5_in_place_of_a_denoiser_stage():
    devs = parse_devices("rtx3060,rtx3060:8GiB,rtx3060:6GiB")
    plan = plan_pipeline(catalog_pipeline("flux-dev"), devs, FLUX)
    assert plan.fits and _peaks_within(plan) and len(plan.stages) == 3
    t5 = next(c for c in plan.components if c.name == "text_encoder_2")
    assert t5.mode == "moved" and t5.evicts
    ev = plan.stages[t5.evicts[0]]
    assert ev.device == t5.device
    # in the encode phase that GPU holds T5 instead of its denoiser stage: with the stage it would not fit
    enc = next(p for p in plan.phase_peaks if p.phase == "encode" and p.device == t5.device)
    assert enc.bytes <= enc.capacity_bytes < enc.bytes + ev.weights_bytes
    assert t5.move_seconds > 0
    # diffusers' placements: balanced cannot hold T5 anywhere; model_cpu_offload needs the whole
    # transformer on the first GPU
    with pytest.raises(DoesNotFitError):
        plan_pipeline(catalog_pipeline("flux-dev"), devs, FLUX, policy="balanced", suggest=False)
    off = plan_pipeline(catalog_pipeline("flux-dev"), devs, FLUX, policy="model_cpu_offload", suggest=False)
    assert not _peaks_within(off)
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize("key,spec,w", [("sdxl", "rtx3060:8GiB,rtx3060:8GiB", SDXL),
                                        ("flux-dev", "rtx3090,rtx3060", FLUX)])
def test_never_slower_than_diffusers_placements_where_they_fit(key, spec, w):
    devs = parse_devices(spec)
    ours = plan_pipeline(catalog_pipeline(key), devs, w)
    assert ours.fits and _peaks_within(ours)
    for pol in ("balanced", "model_cpu_offload"):
        theirs = plan_pipeline(catalog_pipeline(key), devs, w, policy=pol, suggest=False)
        if _peaks_within(theirs):
            assert ours.image.seconds_per_image <= theirs.image.seconds_per_image
    off = plan_pipeline(catalog_pipeline(key), devs, w, policy="model_cpu_offload", suggest=False)
    assert all(c.mode == "moved" for c in off.components) and off.image.move_seconds > 0


def test_cfg_and_size_scale_the_denoiser_workspace():
    devs = parse_devices("rtx4090")
    prof = catalog_pipeline("sdxl")
    a = plan_pipeline(prof, devs, SDXL)
    b = plan_pipeline(prof, devs, ImageWorkload(height=1024, width=1024, steps=28, guidance=1.0))
    assert a.workload.batch == 2 and b.workload.batch == 1
    assert a.stages[0].activation_bytes == 2 * b.stages[0].activation_bytes
    assert a.image.step_seconds > b.image.step_seconds


def test_does_not_fit_suggests_with_figures():
    devs = parse_devices("rtx3060:6GiB")
    with pytest.raises(DoesNotFitError) as e:
        plan_pipeline(catalog_pipeline("flux-dev"), devs, FLUX)
    assert "Flux" in str(e.value) or "flux" in str(e.value)
    for s in e.value.suggestions:
        assert "s/image" in s


def test_bad_workload():
    prof = catalog_pipeline("sdxl")
    devs = parse_devices("rtx4090")
    for w in (ImageWorkload(height=1000, width=1024), ImageWorkload(batch=0), ImageWorkload(steps=0),
              ImageWorkload(guidance=float("nan"))):
        with pytest.raises(WorkloadError):
            plan_pipeline(prof, devs, w)
    with pytest.raises(WorkloadError, match="policy"):
        plan_pipeline(prof, devs, SDXL, policy="fastest")
