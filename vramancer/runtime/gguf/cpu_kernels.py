"""GGUF blocks to float32 on the CPU in one pass per block: numba kernels (optional dependency).

Each kernel reads a block's bytes once and writes its float32 values straight into the output (a
numpy view of the output tensor). The float32 operations are gguf-py's (numpy reference) in its
order, one rounding each (fastmath off, so no fused multiply-add): for example Q4_K is
``(d * sc) * q - (dmin * m)`` and Q8_0 ``q * d``. float16 scales become float32 through a 65536-entry
table made by numpy's own conversion, so every bit pattern converts as the reference converts it.

Importing this module imports numba (``ImportError`` when it is absent: dequant.py then uses its
torch path). Kernels compile on first use per type (``compile_all`` does it ahead), cached on disk
next to this file, or in numba's user cache, or not at all where neither is writable.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numba
import numpy as np
from numba.extending import intrinsic

__all__ = ["KERNELS", "dequantize_into", "compile_all", "set_threads"]

_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _jit(parallel: bool) -> Callable:
    """numba.njit with a disk cache where one can be written (silently none where not)."""
    def deco(fn: Callable) -> Callable:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return numba.njit(cache=True, nogil=True, parallel=parallel)(fn)
        except RuntimeError:        # "no locator available": a read-only install and no user cache dir
            return numba.njit(cache=False, nogil=True, parallel=parallel)(fn)
    return deco


@intrinsic
def _f32_bits(typingctx, x):     # the bits of a float32, as a uint32 (LLVM bitcast: vectorizes)
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(numba.types.uint32))
    return numba.types.uint32(numba.types.float32), codegen


# Large F16 / BF16 outputs are written with non-temporal stores: straight to memory, without first
# reading each output cache line in (a plain store's read for ownership), a third less memory traffic.
# Measured on this project's CPU (2048 x 4096 F16, one thread): 2.4 ms instead of 4.4; with the matrix
# product that then reads the weight, 4.9 ms instead of 6.8. Small outputs stay in cache (plain stores).
_NT_BYTES = 4 << 20           # outputs from this size on
_NT_LANES = 16                # values per store: one 64-byte line
_NT_CHUNK = 16384             # values per chunk (a thread's unit of work; a fence ends each)


def _store_line(kind: str, nt: bool = True) -> Callable:
    """An intrinsic ``store(src, dst, i)``: the 16 float32 of 16-bit values src[i:i+16] (uint16, IEEE
    half for "F16", bfloat16 for "BF16") into dst[i:i+16] (uint32), one non-temporal store (``nt``:
    dst[i] 64-byte aligned) or a plain one. The F16 arithmetic is the scalar kernel's (f16 below), on
    a 16-lane vector (the scalar loop, vectorized by LLVM, ran half as fast)."""
    from llvmlite import ir

    @intrinsic
    def store(typingctx, src, dst, i):
        def codegen(context, builder, signature, args):
            sa = context.make_array(signature.args[0])(context, builder, args[0])
            da = context.make_array(signature.args[1])(context, builder, args[1])
            i16, i32 = ir.IntType(16), ir.IntType(32)
            v16, v32, vf = (ir.VectorType(t, _NT_LANES) for t in (i16, i32, ir.FloatType()))

            def c(v):
                return ir.Constant(v32, [v] * _NT_LANES)

            src_p = builder.bitcast(builder.gep(sa.data, [args[2]]), v16.as_pointer())
            x = builder.zext(builder.load(src_p, align=2), v32)
            if kind == "BF16":
                r = builder.shl(x, c(16))
            else:
                m = builder.shl(builder.and_(x, c(0x7FFF)), c(13))
                e = builder.and_(x, c(0x7C00))
                r = builder.add(m, c(112 << 23))
                r = builder.select(builder.icmp_unsigned("==", e, c(0x7C00)), builder.or_(m, c(0x7F800000)), r)
                sub = builder.fmul(builder.sitofp(builder.and_(x, c(0x3FF)), vf),
                                   ir.Constant(vf, [2.0 ** -24] * _NT_LANES))
                r = builder.select(builder.icmp_unsigned("==", e, c(0)), builder.bitcast(sub, v32), r)
                r = builder.or_(r, builder.shl(builder.and_(x, c(0x8000)), c(16)))
            dst_p = builder.bitcast(builder.gep(da.data, [args[2]]), v32.as_pointer())
            st = builder.store(r, dst_p, align=64 if nt else 4)
            if nt:
                st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
            return context.get_dummy_value()
        return numba.types.void(src, dst, i), codegen
    return store


def _block32(block_bytes: int) -> Callable:
    """An intrinsic ``store(b, o, i, d)``: block ``i`` of Q8_0 (34 bytes) or Q4_0 (18 bytes) blocks
    ``b`` (uint8 [n, block_bytes]) into o[i] (float32 [n, 32], 64-byte aligned rows): its 32 small
    integers as float32 times ``d`` (the kernels' q * d; Q4_0's q = nibble - 8, low nibbles first),
    as two non-temporal 64-byte lines."""
    @intrinsic
    def store(typingctx, b, o, i, d):
        def codegen(context, builder, signature, args):
            return _block32_ir(block_bytes, context, builder, signature, args)
        return numba.types.void(b, o, numba.types.int64, numba.types.float32), codegen
    return store


def _block32_ir(block_bytes, context, builder, signature, args):
    from llvmlite import ir

    ba = context.make_array(signature.args[0])(context, builder, args[0])
    oa = context.make_array(signature.args[1])(context, builder, args[1])
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    v8, vf = ir.VectorType(i8, 32), ir.VectorType(f32, 32)
    at = builder.add(builder.mul(args[2], ir.Constant(i64, block_bytes)), ir.Constant(i64, 2))
    if block_bytes == 34:
        q = builder.load(builder.bitcast(builder.gep(ba.data, [at]), v8.as_pointer()), align=1)
    else:                    # 16 bytes of nibbles: low nibbles are values 0..15, high ones 16..31
        v16 = ir.VectorType(i8, 16)
        x = builder.load(builder.bitcast(builder.gep(ba.data, [at]), v16.as_pointer()), align=1)
        lo = builder.and_(x, ir.Constant(v16, [15] * 16))
        hi = builder.lshr(x, ir.Constant(v16, [4] * 16))
        q = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 32), list(range(32))))
        q = builder.sub(q, ir.Constant(v8, [8] * 32))
    dv = builder.insert_element(ir.Constant(vf, ir.Undefined), args[3], ir.Constant(i32, 0))
    dv = builder.shuffle_vector(dv, ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(i32, 32), [0] * 32))
    r = builder.fmul(builder.sitofp(q, vf), dv)
    dst = builder.gep(oa.data, [builder.mul(args[2], ir.Constant(i64, 32))])
    st = builder.store(r, builder.bitcast(dst, vf.as_pointer()), align=64)
    st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
    return context.get_dummy_value()


_Q8_0_BLOCK = _block32(34)
_Q4_0_BLOCK = _block32(18)
_F16_LINE = _store_line("F16")
_BF16_LINE = _store_line("BF16")
_F16_VEC = _store_line("F16", nt=False)


@intrinsic
def _fence(typingctx):          # orders the non-temporal stores before whatever follows (an mfence)
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return numba.types.void(), codegen


def _kernels(parallel: bool) -> dict[str, Callable]:
    """One kernel per type: ``k(b, o, lut)`` with ``b`` uint8 [n, block_bytes] (int8 for Q8_0's values:
    the same bytes), ``o`` float32 [n, block_values], ``lut`` float16 bits -> float32."""
    jit = _jit(parallel)
    prange = numba.prange

    @jit
    def bf16(h, o, lut):                 # h: uint16 [n] -> the float32 whose high half it is
        ov = o.view(np.uint32)
        for i in prange(h.shape[0]):     # each op cast to uint32: 32-bit vector lanes, not 64
            ov[i] = np.uint32(np.uint32(h[i]) << np.uint32(16))

    @jit
    def f16(h, o, lut):                  # h: uint16 [n] (IEEE half) -> float32, numpy's conversion bit for bit
        ov = o.view(np.uint32)
        for i in prange(h.shape[0]):     # branch-free selects on 32-bit lanes: LLVM vectorizes the loop
            x = np.uint32(h[i])
            m = np.uint32((x & np.uint32(0x7FFF)) << np.uint32(13))
            e = np.uint32(x & np.uint32(0x7C00))
            r = np.uint32(m + np.uint32(112 << 23))                     # normal: exponent bias 15 -> 127
            r = np.uint32(m | np.uint32(0x7F800000)) if e == np.uint32(0x7C00) else r   # inf, NaN (payload kept)
            # zero and subnormals: mantissa x 2**-24, exact (an integer times a power of two, a normal
            # float32: no denormal operand, so a thread flushing denormals converts them right too)
            r = _f32_bits(np.float32(np.int32(x & np.uint32(0x3FF))) * np.float32(2.0 ** -24)) if e == 0 else r
            ov[i] = np.uint32(r | np.uint32((x & np.uint32(0x8000)) << np.uint32(16)))

    @jit
    def q8_0(b, o, lut):
        bs = b.view(np.int8)
        w = o.shape[1]
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            for j in range(w):
                o[i, j] = np.float32(bs[i, 2 + j]) * d

    @jit
    def q4_0(b, o, lut):
        h = o.shape[1] // 2              # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            for j in range(h):
                o[i, j] = d * np.float32((np.int64(b[i, 2 + j]) & 15) - 8)
            for j in range(h):
                o[i, h + j] = d * np.float32((np.int64(b[i, 2 + j]) >> 4) - 8)

    @jit
    def q4_1(b, o, lut):
        h = o.shape[1] // 2              # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            m = lut[np.int64(b[i, 2]) | (np.int64(b[i, 3]) << 8)]
            for j in range(h):
                o[i, j] = d * np.float32(np.int64(b[i, 4 + j]) & 15) + m
            for j in range(h):
                o[i, h + j] = d * np.float32(np.int64(b[i, 4 + j]) >> 4) + m

    @jit
    def q5_0(b, o, lut):
        h = o.shape[1] // 2              # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            qh = (np.int64(b[i, 2]) | (np.int64(b[i, 3]) << 8) | (np.int64(b[i, 4]) << 16)
                  | (np.int64(b[i, 5]) << 24))
            for j in range(h):          # one loop for both halves: vectorizes best here
                x = np.int64(b[i, 6 + j])
                o[i, j] = d * np.float32(((x & 15) | (((qh >> j) & 1) << 4)) - 16)
                o[i, h + j] = d * np.float32(((x >> 4) | (((qh >> (h + j)) & 1) << 4)) - 16)

    @jit
    def q5_1(b, o, lut):
        h = o.shape[1] // 2              # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            m = lut[np.int64(b[i, 2]) | (np.int64(b[i, 3]) << 8)]
            qh = (np.int64(b[i, 4]) | (np.int64(b[i, 5]) << 8) | (np.int64(b[i, 6]) << 16)
                  | (np.int64(b[i, 7]) << 24))
            for j in range(h):          # one loop for both halves: vectorizes best here
                x = np.int64(b[i, 8 + j])
                o[i, j] = d * np.float32((x & 15) | (((qh >> j) & 1) << 4)) + m
                o[i, h + j] = d * np.float32((x >> 4) | (((qh >> (h + j)) & 1) << 4)) + m

    @jit
    def q2_k(b, o, lut):
        w = o.shape[1] // 16             # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 80]) | (np.int64(b[i, 81]) << 8)]
            dmin = lut[np.int64(b[i, 82]) | (np.int64(b[i, 83]) << 8)]
            for c in range(2):               # value c*128 + s*32 + j: (qs[c*32 + j] >> 2s) & 3
                for s in range(4):
                    for h in range(2):       # two groups of 16 values (scales 16-value groups)
                        g = c * 8 + s * 2 + h
                        sc = np.int64(b[i, g])
                        dl = d * np.float32(sc & 15)
                        ml = dmin * np.float32(sc >> 4)
                        base = c * 128 + s * 32 + h * 16
                        for j in range(w):
                            q = (np.int64(b[i, 16 + c * 32 + h * 16 + j]) >> (2 * s)) & 3
                            o[i, base + j] = dl * np.float32(q) - ml

    @jit
    def q3_k(b, o, lut):
        w = o.shape[1] // 16             # 16, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 108]) | (np.int64(b[i, 109]) << 8)]
            for c in range(2):               # value c*128 + s*32 + j; hmask bit k = 4c + s of byte j
                for s in range(4):
                    for h in range(2):
                        g = c * 8 + s * 2 + h
                        lo = np.int64(b[i, 96 + g]) & 15 if g < 8 else np.int64(b[i, 96 + g - 8]) >> 4
                        hi = (np.int64(b[i, 104 + (g & 3)]) >> (2 * (g >> 2))) & 3
                        dl = d * np.float32((lo | (hi << 4)) - 32)
                        base = c * 128 + s * 32 + h * 16
                        for j in range(w):
                            jj = h * 16 + j
                            ql = (np.int64(b[i, 32 + c * 32 + jj]) >> (2 * s)) & 3
                            qh = (np.int64(b[i, jj]) >> (4 * c + s)) & 1
                            o[i, base + j] = dl * np.float32(ql - 4 + 4 * qh)

    @numba.njit(inline="always")
    def k_scale_min(b, i, g):            # Q4_K / Q5_K: the 6-bit scale and min of group g of block i
        if g < 4:
            return np.int64(b[i, 4 + g]) & 63, np.int64(b[i, 8 + g]) & 63
        sc = (np.int64(b[i, 12 + g - 4]) & 15) | ((np.int64(b[i, 4 + g - 4]) >> 2) & 48)
        mn = (np.int64(b[i, 12 + g - 4]) >> 4) | ((np.int64(b[i, 8 + g - 4]) >> 2) & 48)
        return sc, mn

    @jit
    def q4_k(b, o, lut):
        w = o.shape[1] // 8              # 32, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            dmin = lut[np.int64(b[i, 2]) | (np.int64(b[i, 3]) << 8)]
            for g in range(8):               # value 32 g + j: (qs[(g >> 1) * 32 + j] >> 4 (g & 1)) & 15
                sc, mn = k_scale_min(b, i, g)
                dl = d * np.float32(sc)
                ml = dmin * np.float32(mn)
                sh = 4 * (g & 1)
                at = 16 + (g >> 1) * 32
                for j in range(w):
                    q = (np.int64(b[i, at + j]) >> sh) & 15
                    o[i, 32 * g + j] = dl * np.float32(q) - ml

    @jit
    def q5_k(b, o, lut):
        w = o.shape[1] // 8              # 32, not a constant: LLVM vectorizes the loop
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)]
            dmin = lut[np.int64(b[i, 2]) | (np.int64(b[i, 3]) << 8)]
            for g in range(8):               # high bit of value 32 g + j: bit g of qh[j]
                sc, mn = k_scale_min(b, i, g)
                dl = d * np.float32(sc)
                ml = dmin * np.float32(mn)
                sh = 4 * (g & 1)
                at = 48 + (g >> 1) * 32
                for j in range(w):
                    q = ((np.int64(b[i, at + j]) >> sh) & 15) | (((np.int64(b[i, 16 + j]) >> g) & 1) << 4)
                    o[i, 32 * g + j] = dl * np.float32(q) - ml

    @jit
    def q6_k(b, o, lut):
        w = o.shape[1] // 16             # 16, not a constant: LLVM vectorizes the loop
        bs = b.view(np.int8)
        for i in prange(b.shape[0]):
            d = lut[np.int64(b[i, 208]) | (np.int64(b[i, 209]) << 8)]
            for c in range(2):               # value c*128 + s*32 + j: ql[c*64 + (s&1)*32 + j] >> 4 (s>>1),
                for s in range(4):           # qh[c*32 + j] >> 2 s
                    for h in range(2):
                        g = c * 8 + s * 2 + h
                        dl = d * np.float32(bs[i, 192 + g])
                        base = c * 128 + s * 32 + h * 16
                        for j in range(w):
                            jj = h * 16 + j
                            lo = (np.int64(b[i, c * 64 + (s & 1) * 32 + jj]) >> (4 * (s >> 1))) & 15
                            hi = (np.int64(b[i, 128 + c * 32 + jj]) >> (2 * s)) & 3
                            o[i, base + j] = dl * np.float32((lo | (hi << 4)) - 32)

    @jit
    def f16_nt(h, ov, lut):              # h: uint16 [k * _NT_CHUNK] -> ov: uint32, 64-byte aligned
        for c in prange(h.shape[0] // _NT_CHUNK):
            for i in range(c * _NT_CHUNK, (c + 1) * _NT_CHUNK, _NT_LANES):
                _F16_LINE(h, ov, i)
            _fence()

    @jit
    def f16_vec(h, ov, lut):             # h: uint16 [16 k] -> ov: uint32 (plain stores)
        n = h.shape[0]
        for c in prange((n + _NT_CHUNK - 1) // _NT_CHUNK):
            for i in range(c * _NT_CHUNK, min(n, (c + 1) * _NT_CHUNK), _NT_LANES):
                _F16_VEC(h, ov, i)

    @jit
    def bf16_nt(h, ov, lut):
        for c in prange(h.shape[0] // _NT_CHUNK):
            for i in range(c * _NT_CHUNK, (c + 1) * _NT_CHUNK, _NT_LANES):
                _BF16_LINE(h, ov, i)
            _fence()

    @jit
    def q8_0_nt(b, o, lut):              # o: float32 [n, 32], 64-byte aligned
        n = b.shape[0]
        for c in prange((n + 511) // 512):
            for i in range(c * 512, min(n, (c + 1) * 512)):
                _Q8_0_BLOCK(b, o, np.int64(i), lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)])
            _fence()

    @jit
    def q4_0_nt(b, o, lut):              # o: float32 [n, 32], 64-byte aligned
        n = b.shape[0]
        for c in prange((n + 511) // 512):
            for i in range(c * 512, min(n, (c + 1) * 512)):
                _Q4_0_BLOCK(b, o, np.int64(i), lut[np.int64(b[i, 0]) | (np.int64(b[i, 1]) << 8)])
            _fence()

    return {"F16": f16, "BF16": bf16, "F16_nt": f16_nt, "BF16_nt": bf16_nt, "F16_vec": f16_vec,
            "Q8_0_nt": q8_0_nt, "Q4_0_nt": q4_0_nt,
            "Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1,
            "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


KERNELS: dict[str, Callable] = _kernels(parallel=False)
# (values, bytes) of one block (dequant.GGUF_TYPES has the same; not imported: dequant imports this module)
_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
           "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_PARALLEL: dict[str, Callable] | None = None
_THREADS = 1
_PARALLEL_MIN_BLOCKS = 4096      # below this a thread pool's start costs more than it gains


def set_threads(threads: int) -> None:
    """Threads for large tensors (1: one thread, no pool; the default)."""
    global _THREADS
    _THREADS = max(1, int(threads))


def dequantize_into(name: str, blocks: np.ndarray, out: np.ndarray, reused: bool = True) -> None:
    """``out`` (float32, C-contiguous) = the values of ``blocks`` (uint8, C-contiguous): for a
    quantized type [n, block_bytes] -> [n, block_values]; for F16 / BF16 [n * 2] bytes -> [n]. (F16 is
    converted with integer ops, not the CPU's F16C instruction torch uses: that one sets the quiet
    bit of a signalling NaN, numpy keeps it; this kernel is as fast where memory is the bound.)
    ``reused``: ``out``'s pages are already in memory (a reused output): large outputs then take the
    non-temporal stores; a fresh output's pages, zeroed by Linux as they are first written, stay in
    cache, where plain stores are faster."""
    global _PARALLEL
    if name in ("F16", "BF16"):
        blocks = blocks.view(np.uint16)
    kernels = KERNELS
    if _THREADS > 1 and blocks.shape[0] >= _PARALLEL_MIN_BLOCKS * (1 if blocks.ndim == 2 else 32):
        if _PARALLEL is None:
            _PARALLEL = _kernels(parallel=True)
        numba.set_num_threads(min(_THREADS, numba.config.NUMBA_NUM_THREADS))
        kernels = _PARALLEL
    if name in ("F16", "BF16") and reused and out.nbytes >= _NT_BYTES:
        skip = min(out.shape[0], (-out.ctypes.data % 64) // 4)      # values before a 64-byte boundary
        end = skip + (out.shape[0] - skip) // _NT_CHUNK * _NT_CHUNK
        kernels[name](blocks[:skip], out[:skip], _F16_TO_F32)
        kernels[name + "_nt"](blocks[skip:end], out[skip:end].view(np.uint32), _F16_TO_F32)
        kernels[name](blocks[end:], out[end:], _F16_TO_F32)
        return
    if name in ("Q8_0", "Q4_0") and reused and out.nbytes >= _NT_BYTES and out.ctypes.data % 64 == 0:
        kernels[name + "_nt"](blocks, out, _F16_TO_F32)
        return
    if name == "F16":                    # 16 values at a time, the rest one by one
        body = out.shape[0] // _NT_LANES * _NT_LANES
        kernels["F16_vec"](blocks[:body], out[:body].view(np.uint32), _F16_TO_F32)
        blocks, out = blocks[body:], out[body:]
    kernels[name](blocks, out, _F16_TO_F32)


def compile_all(types: list[str] | None = None) -> None:
    """Compile (or load from the disk cache) the kernels of ``types`` (all by default) now."""
    for name in types or [k for k in KERNELS if not k.endswith("_nt")]:
        if name in ("F16", "BF16"):
            dequantize_into(name, np.zeros(128, dtype=np.uint8), np.empty(64, dtype=np.float32))
            KERNELS[name + "_nt"](np.zeros(0, dtype=np.uint16), np.empty(0, dtype=np.uint32), _F16_TO_F32)
            if name == "F16":
                KERNELS["F16_vec"](np.zeros(0, dtype=np.uint16), np.empty(0, dtype=np.uint32), _F16_TO_F32)
        elif name in ("Q8_0", "Q4_0"):
            KERNELS[name + "_nt"](np.zeros((0, _BLOCKS[name][1]), dtype=np.uint8), np.empty((0, 32), dtype=np.float32),
                                  _F16_TO_F32)
        else:
            values, nbytes = _BLOCKS[name]
            dequantize_into(name, np.zeros((2, nbytes), dtype=np.uint8), np.empty((2, values), dtype=np.float32))
