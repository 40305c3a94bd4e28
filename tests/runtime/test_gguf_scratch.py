"""GGUF weights dequantized into a model's reused scratch (runtime/gguf/modules.DequantScratch): the
same bits as gguf-py's reference for every type, memory reused from forward to forward, and never
shared by two weights alive at once (two weights held together, stacked MoE experts, a tied
weight, tensors autograd saved, other threads)."""
from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from torch import nn  # noqa: E402

from vramancer.runtime.gguf.dequant import GGUF_TYPES  # noqa: E402
from vramancer.runtime.gguf.modules import DequantScratch, keep_gguf  # noqa: E402

from .test_gguf_dequant import _random_blocks  # noqa: E402

FLOATS = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (None, torch.bfloat16)}


def _stored(name: str, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(the tensor a model keeps for a [rows, cols] weight of type ``name``, the reference float32)."""
    rng = np.random.default_rng(seed)
    t = GGUF_TYPES[name]
    if t.quantized:
        raw = _random_blocks(name, rows=rows, blocks_per_row=cols // t.block_values, rng=rng)
        return torch.from_numpy(raw.copy()), ref_dequantize(raw, QT[name])
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if name == "BF16":
        bits = (x.view(np.uint32) >> 16).astype(np.uint16)
        raw = bits.view(np.uint8)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16), ref_dequantize(raw, QT[name])
    held = x.astype(FLOATS[name][0])
    return torch.from_numpy(held.copy()), ref_dequantize(held.view(np.uint8), QT[name])


def _keep(model: nn.Module, name: str, qtype: str, stored: torch.Tensor, dtype=torch.float32,
          scratch: DequantScratch | None = None, tie: nn.Parameter | None = None) -> nn.Parameter:
    p = tie if tie is not None else nn.Parameter(stored, requires_grad=False)
    keep_gguf(model, name, qtype, dtype, stored=p, scratch=scratch)
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("name", list(GGUF_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_type_through_the_scratch_equals_reference(name, dtype):
    """A Linear's weight read through its parametrization with a scratch: the reference's float32
    (cast to ``dtype`` as torch casts it), bit for bit, twice (the second time into the same memory)."""
    cols = 512
    stored, want = _stored(name, 48, cols, seed=1)
    want_t = torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32)).to(dtype)
    scratch = DequantScratch()
    lin = nn.Linear(cols, 48, bias=False)
    _keep(lin, "weight", name, stored, dtype, scratch)
    with torch.no_grad():
        first = lin.weight
        assert first.dtype == dtype and torch.equal(_bits(first), _bits(want_t))
        ptr = first.data_ptr()
        del first
        second = lin.weight
        assert torch.equal(_bits(second), _bits(want_t))
    if stored.dtype == dtype:                 # a weight stored in the compute dtype is used as it is
        assert second.data_ptr() == stored.data_ptr() and scratch.nbytes == 0
    else:
        assert second.data_ptr() == ptr       # reused, not a fresh tensor
        assert scratch.nbytes >= 48 * cols * dtype.itemsize


class _Two(nn.Module):
    def __init__(self, rows_a: int, rows_b: int, cols: int):
        super().__init__()
        self.a = nn.Linear(cols, rows_a, bias=False)
        self.b = nn.Linear(cols, rows_b, bias=False)

    def forward(self, x):
        wa, wb = self.a.weight, self.b.weight     # both alive at once
        return x @ wa.t(), x @ wb.t(), wa, wb


def test_two_weights_alive_at_once_do_not_share_memory():
    scratch = DequantScratch()
    m = _Two(64, 32, 256)
    sa, want_a = _stored("Q4_K", 64, 256, seed=2)
    sb, want_b = _stored("Q8_0", 32, 256, seed=3)
    _keep(m.a, "weight", "Q4_K", sa, scratch=scratch)
    _keep(m.b, "weight", "Q8_0", sb, scratch=scratch)
    x = torch.randn(3, 256)
    with torch.no_grad():
        ya, yb, wa, wb = m(x)
    assert wa.data_ptr() != wb.data_ptr()
    assert torch.equal(wa, torch.from_numpy(want_a)) and torch.equal(wb, torch.from_numpy(want_b))
    assert torch.equal(ya, x @ torch.from_numpy(want_a).t()) and torch.equal(yb, x @ torch.from_numpy(want_b).t())
    del wa, wb
    with torch.no_grad():            # one at a time: the second reuses the first's memory
        p1 = m.a.weight.data_ptr()
        w = m.b.weight
        assert w.data_ptr() == p1 and torch.equal(w, torch.from_numpy(want_b))


def test_a_view_of_a_weight_keeps_its_memory():
    """One expert of a stacked [experts, rows, cols] weight, still used while another weight is read."""
    scratch = DequantScratch()
    m = nn.Module()
    m.register_parameter("gate", nn.Parameter(torch.empty(4, 32, 256)))
    m.register_parameter("down", nn.Parameter(torch.empty(4, 32, 256)))
    sg, want_g = _stored("Q4_0", 4 * 32, 256, seed=4)
    sd, want_d = _stored("Q6_K", 4 * 32, 256, seed=5)
    _keep(m, "gate", "Q4_0", sg.view(4, 32, -1), scratch=scratch)
    _keep(m, "down", "Q6_K", sd.view(4, 32, -1), scratch=scratch)
    with torch.no_grad():
        g2 = m.gate[2]                          # the stacked tensor itself is gone, its view is not
        d2 = m.down[2]
        assert torch.equal(g2, torch.from_numpy(want_g).view(4, 32, 256)[2])
        assert torch.equal(d2, torch.from_numpy(want_d).view(4, 32, 256)[2])


def test_transformers_moe_experts_forward_equal_without_scratch():
    """A transformers MoE experts module (stacked gate_up / down) with GGUF weights: its own forward,
    the same bits with the scratch as without."""
    pytest.importorskip("transformers")
    from gguf.quants import quantize

    from .test_moe_host_path import _experts, _routing

    outs = []
    for scratch in (None, DequantScratch()):
        mod = _experts("qwen3_moe", seed=3)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(mod, name).detach().float().numpy()
            raw = np.ascontiguousarray(quantize(w, QT.Q8_0))
            delattr(mod, name)
            setattr(mod, name, nn.Parameter(torch.empty(w.shape, device="meta"), requires_grad=False))
            _keep(mod, name, "Q8_0", torch.from_numpy(raw).view(torch.uint8), scratch=scratch)
        x, idx, w = _routing(mod, 5, seed=9)
        with torch.no_grad():
            outs.append(mod(x, idx, w))
        if scratch is not None:
            assert scratch.nbytes > 0
    assert torch.equal(outs[0], outs[1])


def test_tied_weight_read_twice():
    """Two modules sharing one stored tensor (a tied embedding and LM head): both reads held at once
    are right; each alone reuses the scratch."""
    scratch = DequantScratch()
    m = _Two(64, 64, 256)
    s, want = _stored("Q5_K", 64, 256, seed=6)
    p = _keep(m.a, "weight", "Q5_K", s, scratch=scratch)
    _keep(m.b, "weight", "Q5_K", s, scratch=scratch, tie=p)
    assert m.a.parametrizations.weight.original is m.b.parametrizations.weight.original
    with torch.no_grad():
        _, _, wa, wb = m(torch.randn(2, 256))
    assert wa.data_ptr() != wb.data_ptr()
    assert torch.equal(wa, torch.from_numpy(want)) and torch.equal(wb, torch.from_numpy(want))


def test_autograd_saved_weights_are_not_overwritten():
    """With grad on, a weight F.linear saved for backward keeps its memory: gradients equal those of
    plain float weights."""
    def grads(scratch):
        torch.manual_seed(0)
        m = _Two(256, 256, 256)
        for mod, q, seed in ((m.a, "Q4_K", 7), (m.b, "Q8_0", 8)):
            s, want = _stored(q, 256, 256, seed=seed)
            if scratch is False:
                mod.weight = nn.Parameter(torch.from_numpy(want.copy()), requires_grad=False)
            else:
                _keep(mod, "weight", q, s, scratch=scratch)
        x = torch.randn(4, 256, requires_grad=True)
        y = nn.functional.linear(nn.functional.linear(x, m.a.weight).tanh(), m.b.weight)
        y.square().sum().backward()
        return x.grad

    assert torch.equal(grads(DequantScratch()), grads(False))
    assert torch.equal(grads(None), grads(False))


def test_inference_mode_then_no_grad():
    scratch = DequantScratch()
    lin = nn.Linear(256, 32, bias=False)
    s, want = _stored("F16", 32, 256, seed=9)
    _keep(lin, "weight", "F16", s, scratch=scratch)
    x = torch.randn(2, 256)
    with torch.inference_mode():
        a = lin(x)
    with torch.no_grad():
        b = lin(x)
    c = lin(x)
    w = torch.from_numpy(want)
    assert torch.equal(a, x @ w.t()) and torch.equal(b, a) and torch.equal(c, a)


def test_threads_each_get_their_own_memory():
    scratch = DequantScratch()
    m = _Two(128, 96, 256)
    sa, want_a = _stored("Q4_1", 128, 256, seed=10)
    sb, want_b = _stored("Q5_0", 96, 256, seed=11)
    _keep(m.a, "weight", "Q4_1", sa, scratch=scratch)
    _keep(m.b, "weight", "Q5_0", sb, scratch=scratch)
    wrong = []
    start = threading.Barrier(2)

    def run(mod, want):
        want_t = torch.from_numpy(want)
        start.wait()
        with torch.no_grad():
            for _ in range(200):
                w = mod.weight
                if not torch.equal(w, want_t):
                    wrong.append(1)
                del w

    ts = [threading.Thread(target=run, args=a) for a in ((m.a, want_a), (m.b, want_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not wrong


def test_a_copied_model_has_its_own_scratch():
    scratch = DequantScratch()
    lin = nn.Linear(256, 32, bias=False)
    s, want = _stored("Q8_0", 32, 256, seed=12)
    _keep(lin, "weight", "Q8_0", s, scratch=scratch)
    with torch.no_grad():
        lin.weight                                              # noqa: B018 - fills the scratch
    other = copy.deepcopy(lin)
    theirs = other.parametrizations.weight[0].scratch
    assert theirs is not scratch and theirs.nbytes == 0
    with torch.no_grad():
        assert torch.equal(other.weight, torch.from_numpy(want))
    assert pickle.loads(pickle.dumps(scratch)).nbytes == 0     # torch pickles parametrized modules never
    scratch.clear()
    assert scratch.nbytes == 0
