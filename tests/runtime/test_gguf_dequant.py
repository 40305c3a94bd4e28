"""Our dequantization (numba kernels on the CPU, torch ops elsewhere or without numba) equals gguf-py's
numpy reference bit for bit, for every supported type."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from vramancer.errors import BadInputError  # noqa: E402
from vramancer.runtime.gguf.dequant import GGUF_TYPES, dequantize, gguf_type, row_bytes  # noqa: E402

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# byte offsets of the float16 scales inside one block, per type
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _bits_equal(ours: torch.Tensor, ref: np.ndarray, nans: bool = False) -> None:
    """Bit for bit equal; the reference has no NaN unless ``nans`` (then their bits are compared too)."""
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == tuple(ref_t.shape)
    assert nans or not torch.isnan(ref_t).any()
    same = ours.contiguous().view(torch.int32) == ref_t.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} values differ"


def _random_blocks(name: str, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose float16 scales are finite random values (all else random bits)."""
    t = GGUF_TYPES[name]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, t.block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        scale = (rng.standard_normal((rows, blocks_per_row)) * rng.choice([1e-4, 1e-2, 1.0, 30.0])).astype(np.float16)
        raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * t.block_bytes)


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_by_gguf_equals_reference(name, seed):
    rng = np.random.default_rng(seed)
    qt = QT[name]
    data = (rng.standard_normal((7, 512)) * rng.choice([0.02, 1.0, 50.0])).astype(np.float32)
    data[0, :32] = 0.0                                             # an all-zero block: scale 0
    data[1, 32:64] = np.linspace(-3, 3, 32, dtype=np.float32)     # exact values on the grid edges
    raw = np.ascontiguousarray(ref_quantize(data, qt)).view(np.uint8)
    assert raw.shape == (7, row_bytes(name, 512))
    ours = dequantize(torch.from_numpy(raw.copy()), name)
    _bits_equal(ours, ref_dequantize(raw, qt))


@pytest.fixture(params=["numba", "torch"])
def cpu_path(request, monkeypatch):
    """Both CPU paths: the numba kernels (cpu_kernels.py) and the torch ops they replace (no numba)."""
    from vramancer.runtime.gguf import dequant

    if request.param == "numba":
        pytest.importorskip("numba")
        assert dequant._cpu_kernels() is not None
    else:
        monkeypatch.setattr(dequant, "_KERNELS", dequant._NO_KERNELS)
        assert dequant._cpu_kernels() is None
    return request.param


@pytest.mark.parametrize("name", [n for n in GGUF_TYPES if GGUF_TYPES[n].quantized] + ["BF16", "F16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_equal_reference(name, seed, cpu_path):
    rng = np.random.default_rng(seed)
    if name == "BF16":           # every 16-bit pattern but NaNs (the reference keeps a NaN's payload too)
        raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        raw = raw[~np.isnan((raw.astype(np.uint32) << 16).view(np.float32))].view(np.uint8).reshape(2, -1)
        _bits_equal(dequantize(torch.from_numpy(raw.copy()), name), ref_dequantize(raw, QT[name]))
        return
    if name == "F16":            # every 16-bit pattern: zeros, subnormals, infinities; NaNs with their
        raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)   # payload on the numba path (torch's
        if cpu_path == "torch":                                        # F16C conversion quiets a signalling NaN)
            raw = raw[~np.isnan(raw.view(np.float16))]
        raw = rng.permutation(raw).view(np.uint8).reshape(2, -1)
        want = ref_dequantize(raw, QT[name])
        assert np.isnan(want).any() == (cpu_path == "numba")
        _bits_equal(dequantize(torch.from_numpy(raw.copy()), name), want, nans=True)
        return
    t = GGUF_TYPES[name]
    raw = _random_blocks(name, rows=5, blocks_per_row=max(1, 512 // t.block_values), rng=rng)
    ours = dequantize(torch.from_numpy(raw.copy()), name)
    _bits_equal(ours, ref_dequantize(raw, QT[name]))


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "BF16"])
def test_leading_dims_and_types_by_number(name):
    """Experts tensors are [experts, rows, bytes]: any leading dims; the type may be given by number."""
    rng = np.random.default_rng(3)
    t = GGUF_TYPES[name]
    if t.quantized:
        raw = _random_blocks(name, rows=6, blocks_per_row=2 * 256 // t.block_values, rng=rng)
    else:
        raw = ref_quantize(rng.standard_normal((6, 512)).astype(np.float32), QT[name]).view(np.uint8)
    raw3 = raw.reshape(2, 3, -1)
    ours = dequantize(torch.from_numpy(raw3.copy()), QT[name].value)
    _bits_equal(ours, ref_dequantize(raw3, QT[name]))
    # a row slice dequantizes alone to the same rows (each row is whole blocks)
    _bits_equal(dequantize(torch.from_numpy(raw3[1, 1:].copy()), name), ref_dequantize(raw3, QT[name])[1, 1:])


@pytest.mark.parametrize("name", [n for n in GGUF_TYPES if GGUF_TYPES[n].quantized])
def test_one_block_at_any_offset_and_into_out(name, cpu_path):
    """One block (a gathered embedding row) at every byte offset of a larger buffer, and the
    ``out=`` path into a given tensor, equal the reference too."""
    rng = np.random.default_rng(4)
    t = GGUF_TYPES[name]
    raw = _random_blocks(name, rows=1, blocks_per_row=9, rng=rng)
    want = ref_dequantize(raw, QT[name])
    buf = torch.from_numpy(raw.copy()).reshape(-1)
    for i in range(9):
        at = i * t.block_bytes                        # offsets 0, 18, 34, ...: rarely 8-byte aligned
        _bits_equal(dequantize(buf[at:at + t.block_bytes].view(1, -1), name), want[:, i * t.block_values:
                                                                                    (i + 1) * t.block_values])
    out = torch.full((1, 9 * t.block_values), float("nan"))
    assert dequantize(buf.view(1, -1), name, out=out) is out
    _bits_equal(out, want)
    with pytest.raises(ValueError, match="out must be"):
        dequantize(buf.view(1, -1), name, out=torch.empty(1, 9 * t.block_values, dtype=torch.float16))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "F16"])
def test_large_tensor_equals_reference(name, cpu_path):
    """A tensor past 4 MiB of output (allocated through numpy for huge pages on the CPU) equals the
    reference too, and is an ordinary writable float32 tensor."""
    rng = np.random.default_rng(5)
    t = GGUF_TYPES[name]
    if t.quantized:
        raw = _random_blocks(name, rows=256, blocks_per_row=4096 // t.block_values, rng=rng)
    else:
        raw = rng.standard_normal((256, 4096)).astype(np.float16).view(np.uint8)
    ours = dequantize(torch.from_numpy(raw.copy()), name)
    assert ours.numel() * 4 >= 4 << 20 and ours.is_contiguous()
    _bits_equal(ours, ref_dequantize(raw, QT[name]))
    ours.mul_(0.0)


def test_cpu_tensors_go_through_the_numba_kernels(monkeypatch):
    """On the CPU, quantized types, F16 and BF16 are dequantized by one numba kernel call writing into
    the output tensor's memory (F32 is copied); a non-contiguous input is copied first."""
    pytest.importorskip("numba")
    from vramancer.runtime.gguf import cpu_kernels

    calls = []
    real = cpu_kernels.dequantize_into
    monkeypatch.setattr(cpu_kernels, "dequantize_into", lambda n, b, o, **kw: (calls.append((n, b.shape, o.shape)),
                                                                               real(n, b, o, **kw)))
    rng = np.random.default_rng(6)
    raw = _random_blocks("Q4_K", rows=4, blocks_per_row=4, rng=rng)
    wide = torch.from_numpy(np.concatenate([raw, raw], axis=1))[:, :raw.shape[1]]      # not contiguous
    out = torch.empty(4, 1024)
    assert dequantize(wide, "Q4_K", out=out) is out
    assert calls == [("Q4_K", (16, 144), (16, 256))]
    _bits_equal(out, ref_dequantize(raw, QT.Q4_K))
    dequantize(torch.zeros(3, 8, dtype=torch.uint8), "F16")
    assert calls[1:] == [("F16", (24,), (12,))]
    dequantize(torch.zeros(3, 8, dtype=torch.uint8), "F32")
    assert len(calls) == 2


def test_parallel_kernels_equal_reference(monkeypatch):
    """With threads > 1 a large tensor goes through the parallel (prange) kernels: the same bits."""
    pytest.importorskip("numba")
    from vramancer.runtime.gguf import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_THREADS", 2)
    monkeypatch.setattr(cpu_kernels, "_PARALLEL_MIN_BLOCKS", 8)
    rng = np.random.default_rng(8)
    for name in ("Q6_K", "Q4_0"):
        raw = _random_blocks(name, rows=8, blocks_per_row=512 // GGUF_TYPES[name].block_values, rng=rng)
        _bits_equal(dequantize(torch.from_numpy(raw.copy()), name), ref_dequantize(raw, QT[name]))
    assert cpu_kernels._PARALLEL is not None


def test_kernels_without_a_writable_cache(monkeypatch):
    """Where numba finds no writable cache directory (a read-only install, no user cache), it raises
    RuntimeError("cannot cache function ... no locator available") as it decorates: kernels are then
    made without a disk cache, and still exact."""
    numba = pytest.importorskip("numba")
    from vramancer.runtime.gguf import cpu_kernels

    real = numba.njit

    def njit(*args, cache=False, **kw):
        if cache:
            raise RuntimeError("cannot cache function 'q8_0': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(numba, "njit", njit)
    kernels = cpu_kernels._kernels(parallel=False)
    rng = np.random.default_rng(9)
    raw = _random_blocks("Q8_0", rows=2, blocks_per_row=4, rng=rng)
    out = np.empty((8, 32), dtype=np.float32)
    kernels["Q8_0"](raw.reshape(8, 34), out, cpu_kernels._F16_TO_F32)
    _bits_equal(torch.from_numpy(out.reshape(2, 128)), ref_dequantize(raw, QT.Q8_0))


def test_unsupported_type_named():
    with pytest.raises(BadInputError, match="IQ2_XXS"):
        gguf_type(QT.IQ2_XXS)
    with pytest.raises(BadInputError, match="whole Q4_K blocks"):
        dequantize(torch.zeros(2, 100, dtype=torch.uint8), "Q4_K")
    with pytest.raises(BadInputError, match="uint8"):
        dequantize(torch.zeros(2, 34), "Q8_0")
    assert gguf_type(QT.Q6_K).block_bytes == 210 and gguf_type("q5_k").block_values == 256


def test_types_match_gguf_sizes():
    from gguf.constants import GGML_QUANT_SIZES

    for t in GGUF_TYPES.values():
        assert GGML_QUANT_SIZES[QT(t.ggml_id)] == (t.block_values, t.block_bytes)
        assert QT(t.ggml_id).name == t.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [n for n in GGUF_TYPES if GGUF_TYPES[n].quantized])
def test_cuda_equals_reference(name):
    rng = np.random.default_rng(7)
    t = GGUF_TYPES[name]
    raw = _random_blocks(name, rows=64, blocks_per_row=4096 // t.block_values, rng=rng)
    ours = dequantize(torch.from_numpy(raw.copy()).cuda(), name)
    assert ours.device.type == "cuda"
    _bits_equal(ours.cpu(), ref_dequantize(raw, QT[name]))


def test_env_var_turns_the_numba_kernels_off(monkeypatch):
    """VRAMANCER_GGUF_NUMBA (registered in vramancer/envs.py) = 0 / off: the torch path on the CPU."""
    pytest.importorskip("numba")
    from vramancer import envs
    from vramancer.runtime.gguf import dequant

    assert "VRAMANCER_GGUF_NUMBA" in envs.ENV
    for value, on in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("VRAMANCER_GGUF_NUMBA", value)
        monkeypatch.setattr(dequant, "_KERNELS", None)
        assert (dequant._cpu_kernels() is not None) is on, value


@pytest.mark.parametrize("name", ["F16", "BF16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_half_outputs_by_non_temporal_stores(name, threads, monkeypatch):
    """An F16 / BF16 output of 4 MiB or more (written by 64-byte non-temporal stores between a scalar
    head up to the first 64-byte boundary and a scalar tail): every 16-bit pattern, at any offset of
    the output, equals the reference, and nothing outside the output is written."""
    pytest.importorskip("numba")
    from vramancer.runtime.gguf import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_THREADS", threads)
    pat = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if name == "BF16":
        pat = pat[~np.isnan((pat.astype(np.uint32) << 16).view(np.float32))]
    raw = np.random.default_rng(7).permutation(np.tile(pat, 17)).view(np.uint8).reshape(2, -1)
    want = ref_dequantize(raw, QT[name])
    assert want.nbytes >= cpu_kernels._NT_BYTES
    for off in (0, 1, 7, 16):
        big = torch.full((want.size + off + 23,), 7.0)
        out = big[off:off + want.size].view(want.shape)
        assert dequantize(torch.from_numpy(raw.copy()), name, out=out) is out
        _bits_equal(out, want, nans=True)
        assert bool((big[:off] == 7.0).all()) and bool((big[off + want.size:] == 7.0).all())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_32_value_block_output_by_non_temporal_stores(name, threads, monkeypatch):
    """A Q8_0 / Q4_0 output of 4 MiB or more given on a 64-byte boundary is written by non-temporal stores;
    one that is not, and a fresh one (its pages still to be zeroed: plain stores, it stays in cache;
    it starts on a page), by the plain kernel: all equal the reference, nothing outside written."""
    pytest.importorskip("numba")
    from vramancer.runtime.gguf import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_THREADS", threads)
    calls = []
    kernels = cpu_kernels.KERNELS
    for k in (name, name + "_nt"):
        monkeypatch.setitem(kernels, k, lambda b, o, lut, k=k, f=kernels[k]: (calls.append(k), f(b, o, lut)))
    raw = _random_blocks(name, rows=64, blocks_per_row=544, rng=np.random.default_rng(8))
    want = ref_dequantize(raw, QT[name])
    assert want.nbytes >= cpu_kernels._NT_BYTES
    fresh = dequantize(torch.from_numpy(raw.copy()), name)
    assert fresh.data_ptr() % 4096 == 0
    _bits_equal(fresh, want)
    assert calls == ([name] if threads == 1 else [])
    for off in (0, 16, 3):
        big = torch.full((want.size + 64,), 7.0)
        start = off + (-big.data_ptr() // 4) % 16              # off values past a 64-byte boundary
        out = big[start:start + want.size].view(want.shape)
        assert dequantize(torch.from_numpy(raw.copy()), name, out=out) is out
        _bits_equal(out, want)
        assert bool((big[:start] == 7.0).all()) and bool((big[start + want.size:] == 7.0).all())
    assert calls == ([name, name + "_nt", name + "_nt", name] if threads == 1 else [])


@pytest.mark.parametrize("extra", [0, 1, 15, 17])
def test_f16_sixteen_at_a_time_and_the_rest(extra, cpu_path):
    """F16 rows whose count is not a multiple of 16 (the numba path converts 16 values per vector,
    the rest one by one): every pattern, plus ``extra`` more, equal the reference."""
    pat = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if cpu_path == "torch":
        pat = pat[~np.isnan(pat.view(np.float16))]
    raw = np.concatenate([np.random.default_rng(extra).permutation(pat), pat[1:1 + extra]]).view(np.uint8)
    want = ref_dequantize(raw.reshape(1, -1), QT.F16)
    _bits_equal(dequantize(torch.from_numpy(raw.copy()).view(1, -1), "F16"), want, nans=True)
