"""Our K-quant encoders write valid blocks: gguf-py's reference decodes them close to the input
(errors bounded by the type's bits), and our torch decoder agrees with it bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402

from vramancer.errors import BadInputError  # noqa: E402
from vramancer.runtime.gguf.dequant import dequantize, row_bytes  # noqa: E402
from vramancer.runtime.gguf.quantize import quantize_k  # noqa: E402

# relative RMS error each type must stay under on Gaussian data (4, 5, 6 bits per value)
RMS_BOUND = {"Q4_K": 0.10, "Q5_K": 0.05, "Q6_K": 0.025}


@pytest.mark.parametrize("name", list(RMS_BOUND))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0])
def test_encoded_blocks_decode_close(name, scale):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 1024)) * scale).astype(np.float32)
    x[0, :256] = 0.0                                     # an all-zero super-block
    x[1, :256] = np.abs(x[1, :256])                      # one with no negative value
    blocks = quantize_k(x, name)
    assert blocks.dtype == np.uint8 and blocks.shape == (6, row_bytes(name, 1024))
    y = ref_dequantize(blocks, QT[name])
    assert np.all(y[0, :256] == 0.0)
    rms = np.sqrt(np.mean((y - x) ** 2)) / np.std(x)
    assert rms < RMS_BOUND[name]
    # per value: never more than one quantization step of its sub-block's range away
    assert np.max(np.abs(y - x)) < np.max(np.abs(x)) * (0.2 if name == "Q4_K" else 0.1)
    ours = dequantize(torch.from_numpy(blocks.copy()), name)
    assert torch.equal(ours.view(torch.int32), torch.from_numpy(y).view(torch.int32))


def test_more_bits_less_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2048)).astype(np.float32)
    errs = [np.mean((ref_dequantize(quantize_k(x, n), QT[n]) - x) ** 2) for n in ("Q4_K", "Q5_K", "Q6_K")]
    assert errs[0] > errs[1] > errs[2]


def test_refuses_partial_blocks_and_unknown_types():
    with pytest.raises(BadInputError, match="256"):
        quantize_k(np.zeros((2, 100), dtype=np.float32), "Q4_K")
    with pytest.raises(BadInputError, match="Q2_K"):
        quantize_k(np.zeros((2, 256), dtype=np.float32), "Q2_K")
