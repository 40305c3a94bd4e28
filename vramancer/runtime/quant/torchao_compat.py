"""torchao, imported quietly: its wheel tries to load CUDA-only extensions (``_C_mxfp8``,
``_C_cutlass_90a``) at import and logs a failure for each on a CPU-only torch; those kernels are
not the ones used here (weight-only int8: plain torch matmuls on the dequantized rows)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["int8_weight"]


def _import_torchao() -> None:
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        import torchao  # noqa: F401
    finally:
        log.setLevel(level)


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (float, 2-D) as torchao's ``Int8Tensor``: int8 weights and one fp32 scale per row
    (symmetric), on ``w``'s device. ``from_hp`` also keeps an all-zero int8 zero point per row;
    symmetric quantization needs none (torchao's own convention: None), so it is not kept."""
    _import_torchao()
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    t = Int8Tensor.from_hp(w, granularity=PerRow())
    return Int8Tensor(t.qdata, t.scale, t.block_size, t.dtype)
