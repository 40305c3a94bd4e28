"""runtime/experts.py's host path for MoE experts in host RAM (``host_experts_forward``): bit for bit the
output of the experts module's own forward (transformers' grouped_mm path) for Mixtral, Qwen2-MoE and
Qwen3-MoE modules, float32 and bfloat16, 1 to 31 routed tokens, repeated experts across tokens; weights
kept as GGUF blocks dequantized for the selected experts only (counted), same result; run by the hooks for
a decode forward on the host, not for a prefill, removed at detach."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramancer.runtime.experts import (  # noqa: E402
    ExpertsHooks,
    HostExperts,
    host_experts_forward,
    runs_host_path,
)

from .test_moe_experts import build_moe  # noqa: E402


def _experts(arch: str, seed: int = 0, dtype=torch.float32):
    model = build_moe(arch, seed).to(dtype)
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))


def _routing(mod, tokens: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = mod.down_proj.shape[1]
    k = mod.config.num_experts_per_tok
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(mod.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).to(dtype)
    return x, idx, w


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_host_path_equals_the_modules_forward(arch, dtype):
    mod = _experts(arch, dtype=dtype)
    assert runs_host_path(mod)
    with torch.no_grad():
        for tokens in (1, 2, 5, 31):
            x, idx, w = _routing(mod, tokens, seed=tokens, dtype=dtype)
            want = mod(x, idx, w)
            got = host_experts_forward(mod, x, idx, w)
            assert got.dtype == want.dtype and torch.equal(got, want), (arch, tokens)


def test_not_run_where_it_would_differ():
    mod = _experts("mixtral")
    mod.config._experts_implementation = "eager"     # another algorithm (index_add_ in expert order)
    assert not runs_host_path(mod)
    mod.config._experts_implementation = "grouped_mm"
    mod.has_bias = True
    assert not runs_host_path(mod)


def _as_gguf(mod, qtype: str):
    """``mod``'s weights quantized to ``qtype`` and kept as GGUF blocks (runtime/gguf's GGUFWeight)."""
    import numpy as np
    from gguf.quants import quantize

    from vramancer.runtime.gguf.modules import keep_gguf

    for name in ("gate_up_proj", "down_proj"):
        w = getattr(mod, name).detach().float().numpy()
        raw = quantize(w, getattr(__import__("gguf").GGMLQuantizationType, qtype))
        delattr(mod, name)
        setattr(mod, name, torch.nn.Parameter(torch.empty(w.shape, device="meta"), requires_grad=False))
        stored = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8),
                                    requires_grad=False)
        sname, _ = keep_gguf(mod, name, qtype, torch.float32, stored=stored)
        assert sname == f"parametrizations.{name}.original"
    return mod


def test_gguf_blocks_dequantized_for_the_selected_experts_only(monkeypatch):
    pytest.importorskip("gguf")
    import vramancer.runtime.gguf.dequant as dq
    import vramancer.runtime.gguf.modules as gm

    mod = _as_gguf(_experts("qwen3_moe", seed=3), "Q8_0")   # rows of whole 32-value blocks
    assert runs_host_path(mod)
    rows = []
    real = dq.dequantize

    def counting(raw, qtype, out=None):
        rows.append(raw.numel() // raw.shape[-1])
        return real(raw, qtype, out)

    monkeypatch.setattr(dq, "dequantize", counting)
    monkeypatch.setattr(gm, "dequantize", counting)
    x, idx, w = _routing(mod, 1, seed=9)
    with torch.no_grad():
        want = mod(x, idx, w)
        n_own = sum(rows)
        rows.clear()
        got = host_experts_forward(mod, x, idx, w)
    assert torch.equal(got, want)
    e, two_i, h = mod.parametrizations.gate_up_proj[0].shape
    assert n_own >= e * (two_i + h)                  # transformers: every expert's rows (at least once)
    assert sum(rows) == 2 * (two_i + h)              # here: the 2 selected experts' rows


def test_hooks_run_it_for_decode_on_the_host_only():
    mod = _experts("qwen3_moe", seed=5)
    cpu = torch.device("cpu")
    hooks = ExpertsHooks([HostExperts(1, "x", mod, cpu, cpu, "cpu", 0)], prefill_tokens=8).attach()
    assert "forward" in vars(mod)
    with torch.no_grad():
        for tokens, host in ((1, 1), (7, 2), (8, 2), (20, 2)):
            x, idx, w = _routing(mod, tokens, seed=tokens)
            ref = type(mod).forward(mod, x, idx, w)
            assert torch.equal(mod(x, idx, w), ref)
            assert hooks.stats.host_path_forwards == host
    assert hooks.stats.forwards == 4 and hooks.stats.copied_forwards == 2
    hooks.detach()
    assert "forward" not in vars(mod) and not mod._forward_pre_hooks
