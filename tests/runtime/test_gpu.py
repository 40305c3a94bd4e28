"""The split runtime on CUDA: a real GPU split against the CPU, simulated GPUs backed by cuda:0, and
streamed offload with pinned double buffers and a side stream. Skipped without CUDA."""
from __future__ import annotations

import pytest

from .conftest import VOCAB, build_model, make_plan, offload_plan

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW = 20


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False)


def _prompt(batch=1):
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (batch, 6), generator=g)


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "mixtral"])
def test_real_gpu_split_matches_cpu(saved_models, arch):
    """Stages on real devices: every GPU there is, or cuda:0 then the CPU."""
    from vramancer.runtime.loader import load

    folder = saved_models[arch]
    ids = _prompt()
    want = _greedy(build_model(arch), ids)
    if torch.cuda.device_count() >= 2:
        plan = make_plan(folder, 2, devices="cuda:0,cuda:1")
    else:
        from dataclasses import replace

        from vramancer.devices.spec import parse_devices

        plan = make_plan(folder, 2, devices="rtx3090,rtx3060", backing="cuda:0")
        cpu = parse_devices("cpu")[0]
        plan.stages[1] = replace(plan.stages[1], device=cpu.id, kind="cpu", torch_device="cpu", mode="execute")
        plan.devices = [plan.devices[0], cpu]
    model = load(folder, plan=plan)
    rt = model.vramancer
    assert rt.stages[0].compute_device.type == "cuda"
    assert rt.stages[1].compute_device != rt.stages[0].compute_device
    got = _greedy(model, ids.to(model.device))
    assert got.cpu().tolist() == want.tolist()
    with torch.no_grad():
        full = got
        logits = model(full).logits
        ref = build_model(arch)(full.cpu()).logits
    assert logits.device == rt.stages[0].compute_device
    torch.testing.assert_close(logits.cpu(), ref, rtol=1e-4, atol=1e-4)
    rep = rt.memory_report()
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in plan.stages]
    assert all(r.misplaced == [] for r in rep.stages)
    assert rep.stages[0].allocator_peak_bytes > 0
    # each stage's KV cache lives where that stage runs; activations crossed devices on entry
    assert [r.kv_devices for r in rep.stages] == [[str(s.compute_device)] for s in rt.stages]
    assert rt.stages[1].stats.copied_bytes > 0
    rt.free()


def test_simulated_gpus_backed_by_cuda(saved_models):
    from vramancer.runtime.loader import load

    folder = saved_models["qwen2"]
    ids = _prompt(batch=2)
    want = _greedy(build_model("qwen2"), ids)
    plan = make_plan(folder, 3, backing="cuda:0", batch=2, context=6 + NEW - 1)
    model = load(folder, plan=plan)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert _greedy(model, ids.cuda()).cpu().tolist() == want.tolist()
    rep = model.vramancer.memory_report()
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in plan.stages]
    assert [r.kv_cache_bytes for r in rep.stages] == [s.kv_cache_bytes for s in plan.stages]
    model.vramancer.free()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_streamed_offload_on_cuda(saved_models, arch):
    from vramancer.runtime.loader import load

    folder = saved_models[arch]
    ids = _prompt(batch=2)
    want = _greedy(build_model(arch), ids)
    plan = offload_plan(folder, backing="cuda:0", batch=2)
    model = load(folder, plan=plan)
    rt = model.vramancer
    (engine,) = rt.engines
    assert engine.cuda and engine.side_stream is not None
    for unit in rt.stages[1].stream_units:
        assert all(p.home.is_pinned() for p in unit.params)
    assert _greedy(model, ids.cuda()).cpu().tolist() == want.tolist()
    assert engine.prefetch_hits > 0
    rep = rt.memory_report()
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in plan.stages]
    assert all(r.kv_devices == ["cuda:0"] for r in rep.stages if r.kv_cache_bytes)
    for unit in rt.stages[2].stream_units:
        assert all(p.owner._parameters[p.attr].device.type == "meta" for p in unit.params)
    rt.free()
