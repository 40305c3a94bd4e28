"""K-quant encoders (Q4_K, Q5_K, Q6_K) in numpy, for the types gguf-py can read but not write.

A plain round-to-nearest encoder: each sub-block's scale (and, for Q4_K / Q5_K, minimum) from its
range, the super-block's float16 ``d`` / ``dmin`` from the largest of those, the 6-bit (or int8)
sub-block scales rounded against them, then every value rounded against its sub-block's effective
scale. It writes valid blocks in llama.cpp's layout (see dequant.py), decoded by any reader;
llama.cpp's own quantizer searches scales iteratively and is a little more accurate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["K_ENCODERS", "quantize_k"]

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return x.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def _scale_min_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """(d f16 [n,1], dmin f16 [n,1], sc [n,8], mn [n,8], q [n,8,32]) for Q4_K (levels 15) / Q5_K (31)."""
    import numpy as np

    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    hi = sub.max(axis=-1)
    scale = (hi - lo) / levels
    mins = -lo
    d = _f16(scale.max(axis=-1, keepdims=True) / 63)
    dmin = _f16(mins.max(axis=-1, keepdims=True) / 63)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d32)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(mins, dmin32)), 0, 63).astype(np.uint8)
    eff_scale = (d32 * sc.astype(np.float32))[..., None]
    eff_min = (dmin32 * mn.astype(np.float32))[..., None]
    q = np.clip(np.rint(_safe_div(sub + eff_min, eff_scale)), 0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (inverse of Q4_K.get_scale_min)."""
    import numpy as np

    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Low 4 bits of q [n, 8, 32] as 128 bytes: sub-blocks 2g and 2g+1 share bytes 32g..32g+31."""
    import numpy as np

    n = q.shape[0]
    pairs = (q & 0x0F).reshape(n, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    import numpy as np

    d, dmin, sc, mn, q = _scale_min_k(x, 15)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales(sc, mn), _nibbles(q)], axis=-1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    import numpy as np

    d, dmin, sc, mn, q = _scale_min_k(x, 31)
    n = q.shape[0]
    high = (q >> 4) & 1                                             # [n, 8 sub-blocks, 32]
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):                                              # bit j of byte i: sub-block j, value i
        qh |= (high[:, j, :] << j).astype(np.uint8)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales(sc, mn), qh, _nibbles(q)], axis=-1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    import numpy as np

    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1, keepdims=True) / 127)
    d32 = d.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d32)), -128, 127).astype(np.int8)
    eff = (d32 * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(_safe_div(sub, eff)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    lo, hi = q & 0x0F, q >> 4
    ql = (lo[:, :, :64] | (lo[:, :, 64:] << 4)).reshape(n, 128)
    qh = (hi[:, :, 0:32] | (hi[:, :, 32:64] << 2) | (hi[:, :, 64:96] << 4) | (hi[:, :, 96:128] << 6)).reshape(n, 64)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), d.view(np.uint8)], axis=-1)


K_ENCODERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_k(values: np.ndarray, type_name: str) -> np.ndarray:
    """float32 ``[..., cols]`` (cols a multiple of 256) -> uint8 GGUF blocks ``[..., bytes_per_row]``."""
    import numpy as np

    enc = K_ENCODERS.get(type_name)
    if enc is None:
        raise BadInputError(f"no encoder for {type_name} (we write {', '.join(K_ENCODERS)} and gguf-py's types)")
    if values.shape[-1] % QK_K:
        raise BadInputError(f"rows of {values.shape[-1]} values are not whole {type_name} blocks of {QK_K}")
    x = np.ascontiguousarray(values, dtype=np.float32)
    blocks = enc(x.reshape(-1, QK_K))
    return blocks.reshape(*x.shape[:-1], -1)
