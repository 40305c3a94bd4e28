"""Advice comes from one place (plan/advice.py): the planner's ``Plan.suggestions`` and a
DoesNotFitError's message are ``advise``'s lines, each checked by planning with it and given with
its figures; without a GPU there is never GPU advice. Catalog models: no torch, no download."""
from __future__ import annotations

import pytest

from vramancer.devices.spec import parse_devices
from vramancer.errors import DoesNotFitError
from vramancer.models.resolve import profile as make_profile
from vramancer.plan.advice import advise
from vramancer.plan.plan import Workload
from vramancer.plan.planner import plan, plan_profile, planning


@pytest.fixture(scope="module")
def llama8b():
    return make_profile("llama-3.1-8b")


def test_an_offloaded_plans_suggestions_are_the_advice(llama8b):
    devs = parse_devices("rtx3060,cpu:64GiB")
    w = Workload(context=8192, dtype=llama8b.dtype)
    p = plan_profile(llama8b, devs, w)
    assert not p.fits and p.offloaded
    advice = advise(planning(), llama8b, devs, w, current=p)
    assert p.suggestions == [a.text for a in advice] and advice
    for a in advice:
        assert a.fits_on_gpus and "tokens/s decode" in a.text and a.decode_tokens_per_s > 0
    # each piece of advice, applied, fits on the GPUs alone, with the figures it gave
    for a in advice:
        if a.flag == "--devices":
            again = plan(llama8b, devices=a.value, context=8192)
        elif a.flag == "--context":
            again = plan(llama8b, devices="rtx3060,cpu:64GiB", context=int(a.value))
        else:
            again = plan("llama-3.1-8b", devices="rtx3060,cpu:64GiB", context=8192, dtype=a.value)
        assert again.fits, a.text
        assert again.predicted.decode_tokens_per_s == pytest.approx(a.decode_tokens_per_s, rel=1e-9)
    assert "GPU memory" not in " ".join(p.suggestions)


def test_a_model_that_fits_nowhere_raises_with_the_advice_in_its_message(llama8b):
    devs = parse_devices("rtx3060")
    w = Workload(context=4096, dtype=llama8b.dtype)
    with pytest.raises(DoesNotFitError) as e:
        plan_profile(llama8b, devs, w)
    got = e.value.suggestions
    want = [a.text for a in advise(planning(), llama8b, devs, w, fits_nowhere=True,
                                   shortfall_bytes=e.value.shortfall_bytes)]
    assert got == want and got
    assert str(e.value).endswith("; to fit: " + "; or ".join(got))
    flags = [s.split(":")[0].split()[0] for s in got]
    assert "--dtype" in flags and "--devices" in flags
    gpu = next(s for s in got if s.startswith("--devices rtx3060-12gb,") and "another GPU" in s)
    added = gpu.split(":")[0].split()[1]
    assert plan(llama8b, devices=added).fits          # the card named, added, holds the model on the GPUs


def test_without_a_gpu_there_is_no_gpu_advice(llama8b):
    p = plan(llama8b, devices="cpu:64GiB")
    assert p.suggestions == [] and not any("GPU memory" in n or "not fit" in n for n in p.notes)
    devs = parse_devices("cpu:8GiB")
    w = Workload(context=4096, dtype=llama8b.dtype)
    with pytest.raises(DoesNotFitError) as e:
        plan_profile(llama8b, devs, w)
    assert e.value.suggestions                           # a smaller dtype or the disk tier, with figures
    assert all("GPU" not in s for s in e.value.suggestions)
    assert all("tokens/s decode" in s for s in e.value.suggestions)
