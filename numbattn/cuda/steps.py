"""Tensor-core product steps: one warp-wide ``D = A B + C`` on a 16 x 8 x 8 tile.

Every tensor-core kernel of the CUDA backend multiplies through one contract,
the fragment layout of PTX's ``mma.sync.aligned.m16n8k8`` (the same for
``.tf32`` and ``.f64``). With ``g = lane // 4`` and ``t = lane % 4``, a lane holds

=========  ==========================================================
A (16x8)   ``a0 = A[g][t]``, ``a1 = A[g+8][t]``, ``a2 = A[g][t+4]``, ``a3 = A[g+8][t+4]``
B (8x8)    ``b0 = B[t][g]``, ``b1 = B[t+4][g]``
C, D       ``c0 = C[g][2t]``, ``c1 = C[g][2t+1]``, ``c2 = C[g+8][2t]``, ``c3 = C[g+8][2t+1]``
=========  ==========================================================

A step kind says how the hardware computes it:

``"f64"``
    float64, one ``mma.sync.aligned.m16n8k8.row.col.f64`` (sm_90 and up).
``"f64x4"``
    float64, four ``mma.sync.aligned.m8n8k4.row.col.f64`` (sm_80 and up): rows
    ``g`` and ``g + 8``, head dimensions ``t`` and ``t + 4``, with the same
    fragments.
``"tf32x3"``
    float32 at float32 accuracy: each operand splits into a TF32 ``big`` (its
    bits with the low 13 cleared) and a TF32 ``small`` (``x - big`` rounded
    by ``cvt.rna.tf32.f32``); three ``mma.sync.aligned.m16n8k8.row.col.f32.tf32``
    accumulate ``small*big``, ``big*small``, then ``big*big`` into C, the order
    of CUTLASS's ``OpMultiplyAddFastF32`` (the small terms first, so they are
    not lost against the large one).
``"tf32"``
    float32 operands rounded once to TF32 (``cvt.rna``), one ``mma.sync``:
    about 1e-3 relative error, the opt-in ``CUDA_FLOAT32_PRECISION = "tf32"``.

A kernel prepares an operand once with ``split(x)`` (A fragments are reused
across n-tiles) and multiplies prepared operands with ``mma``. On the
simulator, which runs no inline PTX, the same two functions emulate the
hardware: the lanes put their prepared A and B elements in the warp's
scratch of shared memory (:func:`numbattn.cuda.geometry.scratch_elements` per warp), a barrier,
each lane computes its four D elements with the layout above, a barrier.
Every thread of the block must then call ``mma`` the same number of times.
The emulation splits float32 with Veltkamp's method (round to nearest at 11
significant bits) instead of bit masks, which the simulator cannot express:
the same accuracy class, not the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64
from numba import uint32 as U

from .kernels import _device, _on_simulator

# --------------------------------------------------------------------------
# Inline PTX (built only off the simulator)

_INTRINSICS: dict = {}


def _asm_call(builder, ret, template, constraints, args):
    from llvmlite import ir

    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(ir.InlineAsm(fnty, template, constraints, side_effect=False), args)


def _intrinsics():
    """The inline PTX of the steps as numba-cuda intrinsics (llvmlite
    ``InlineAsm``, as numba-cuda emits its own): ``tf32_split``,
    ``tf32_round``, ``mma_tf32`` and ``mma_f64`` (m16n8k8), ``mma_f64_884``."""
    if not _INTRINSICS:
        from llvmlite import ir
        from numba.core import types as nbt
        from numba.core.types.containers import UniTuple
        from numba.cuda.extending import intrinsic

        i32, f32, f64 = ir.IntType(32), ir.FloatType(), ir.DoubleType()

        def cvt_rna(builder, x):
            return _asm_call(builder, i32, "cvt.rna.tf32.f32 $0, $1;", "=r,f", [x])

        @intrinsic
        def tf32_split(typingctx, x):
            sig = UniTuple(nbt.uint32, 2)(nbt.float32)

            def codegen(context, builder, sig, args):
                (x,) = args
                big = builder.and_(builder.bitcast(x, i32), ir.Constant(i32, 0xFFFFE000))
                small = builder.fsub(x, builder.bitcast(big, f32))
                tup = [big, cvt_rna(builder, small)]
                return context.make_tuple(builder, sig.return_type, tup)

            return sig, codegen

        @intrinsic
        def tf32_round(typingctx, x):
            sig = nbt.uint32(nbt.float32)

            def codegen(context, builder, sig, args):
                return cvt_rna(builder, args[0])

            return sig, codegen

        def mma_codegen(shape, ty, reg_in, reg_acc, ir_in, ir_acc):
            template = (
                f"mma.sync.aligned.{shape}.row.col.{ty} "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
            )
            constraints = ",".join([f"={reg_acc}"] * 4 + [reg_in] * 6 + [reg_acc] * 4)

            def codegen(context, builder, sig, args):
                ret = ir.LiteralStructType([ir_acc] * 4)
                res = _asm_call(builder, ret, template, constraints, list(args))
                outs = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, outs)

            return codegen

        @intrinsic
        def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            u, f = nbt.uint32, nbt.float32
            sig = UniTuple(f, 4)(u, u, u, u, u, u, f, f, f, f)
            return sig, mma_codegen("m16n8k8", "f32.tf32.tf32.f32", "r", "f", i32, f32)

        @intrinsic
        def mma_f64(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            d = nbt.float64
            sig = UniTuple(d, 4)(*([d] * 10))
            return sig, mma_codegen("m16n8k8", "f64.f64.f64.f64", "d", "d", f64, f64)

        @intrinsic
        def mma_f64_884(typingctx, a, b, c0, c1):
            """m8n8k4: a = A[g][t], b = B[t][g], (c0, c1) = C[g][2t], C[g][2t + 1]."""
            d = nbt.float64
            sig = UniTuple(d, 2)(d, d, d, d)
            template = (
                "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {$0, $1}, {$2}, {$3}, {$4, $5};"
            )

            def codegen(context, builder, sig, args):
                ret = ir.LiteralStructType([f64, f64])
                res = _asm_call(builder, ret, template, "=d,=d,d,d,d,d", list(args))
                outs = [builder.extract_value(res, i) for i in range(2)]
                return context.make_tuple(builder, sig.return_type, outs)

            return sig, codegen

        _INTRINSICS.update(
            tf32_split=tf32_split,
            tf32_round=tf32_round,
            mma_tf32=mma_tf32,
            mma_f64=mma_f64,
            mma_f64_884=mma_f64_884,
        )
    return _INTRINSICS


# --------------------------------------------------------------------------
# The steps


def _hardware_step(kind: str):
    if kind in ("f64", "f64x4"):

        def split(x):
            return x

        if kind == "f64":
            mma_f64 = _intrinsics()["mma_f64"]

            def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
                return mma_f64(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

        else:
            dmma = _intrinsics()["mma_f64_884"]

            def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
                d0, d1 = dmma(a0, b0, c0, c1)  # rows g, dimensions t
                d0, d1 = dmma(a2, b1, d0, d1)  # rows g, dimensions t + 4
                d2, d3 = dmma(a1, b0, c2, c3)  # rows g + 8
                d2, d3 = dmma(a3, b1, d2, d3)
                return d0, d1, d2, d3

    elif kind == "tf32x3":
        ins = _intrinsics()
        tf32_split, mma_tf32 = ins["tf32_split"], ins["mma_tf32"]

        def split(x):
            return tf32_split(x)

        def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            d0, d1, d2, d3 = mma_tf32(
                a0[1], a1[1], a2[1], a3[1], b0[0], b1[0], c0, c1, c2, c3
            )  # small * big
            d0, d1, d2, d3 = mma_tf32(
                a0[0], a1[0], a2[0], a3[0], b0[1], b1[1], d0, d1, d2, d3
            )  # big * small
            return mma_tf32(a0[0], a1[0], a2[0], a3[0], b0[0], b1[0], d0, d1, d2, d3)

    elif kind == "tf32":
        ins = _intrinsics()
        tf32_round, mma_tf32 = ins["tf32_round"], ins["mma_tf32"]

        def split(x):
            return tf32_round(x)

        def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            return mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    else:
        raise ValueError(f"unknown tensor-core step kind {kind!r}")
    return split, mma


def _emulated_step(kind: str):
    """The simulator's ``(split, mma)``: the hardware's fragment layout through
    shared memory (see the module docstring)."""
    if kind in ("f64", "f64x4"):
        nt, f = float64, np.float64

        def split(x):
            return x

    elif kind in ("tf32x3", "tf32"):
        nt, f = float32, np.float32
        SPLITTER = f(8193.0)  # 2**13 + 1: keeps 24 - 13 = 11 significant bits

        def round11(x):
            c = x * SPLITTER
            return c - (c - x)

        round11 = _device(round11)
        if kind == "tf32x3":

            def split(x):
                big = round11(x)
                return big, round11(x - big)

        else:

            def split(x):
                return round11(x)

    else:
        raise ValueError(f"unknown tensor-core step kind {kind!r}")
    ZERO = f(0.0)

    if kind == "tf32x3":

        def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            g = U(lane >> U(2))
            t = U(lane & U(3))
            for h in range(2):  # h = 0: big, 1: small
                base = U(xw + U(h * 192))
                sh[base + g * U(8) + t] = a0[h]
                sh[base + U(g + U(8)) * U(8) + t] = a1[h]
                sh[base + g * U(8) + t + U(4)] = a2[h]
                sh[base + U(g + U(8)) * U(8) + t + U(4)] = a3[h]
                sh[base + U(128) + t * U(8) + g] = b0[h]
                sh[base + U(128) + U(t + U(4)) * U(8) + g] = b1[h]
            cuda.syncthreads()
            out = cuda.local.array(4, nt)
            out[0], out[1], out[2], out[3] = c0, c1, c2, c3
            for i in range(4):
                row = U(g + U(8 * (i // 2)))
                col = U(U(2) * t + U(i % 2))
                # the three products in the hardware's order (A half, B half),
                # each a full sum
                for p in range(3):
                    ha = U(192) if p == 0 else U(0)
                    hb = U(192) if p == 1 else U(0)
                    part = ZERO
                    for kk in range(8):
                        av = sh[xw + ha + row * U(8) + U(kk)]
                        part += av * sh[xw + hb + U(128) + U(kk * 8) + col]
                    out[i] += part
            cuda.syncthreads()
            return out[0], out[1], out[2], out[3]

    else:

        def mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            g = U(lane >> U(2))
            t = U(lane & U(3))
            sh[xw + g * U(8) + t] = a0
            sh[xw + U(g + U(8)) * U(8) + t] = a1
            sh[xw + g * U(8) + t + U(4)] = a2
            sh[xw + U(g + U(8)) * U(8) + t + U(4)] = a3
            sh[xw + U(128) + t * U(8) + g] = b0
            sh[xw + U(128) + U(t + U(4)) * U(8) + g] = b1
            cuda.syncthreads()
            out = cuda.local.array(4, nt)
            out[0], out[1], out[2], out[3] = c0, c1, c2, c3
            for i in range(4):
                row = U(g + U(8 * (i // 2)))
                col = U(U(2) * t + U(i % 2))
                acc = ZERO
                for kk in range(8):
                    acc += sh[xw + row * U(8) + U(kk)] * sh[xw + U(128) + U(kk * 8) + col]
                out[i] += acc
            cuda.syncthreads()
            return out[0], out[1], out[2], out[3]

    return split, mma


_STEPS: dict = {}


def product_step(kind: str, hw: bool):
    """``(split, mma)`` device functions of step ``kind`` (see the module
    docstring): ``split(x)`` prepares one operand element, and
    ``mma(sh, xw, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)``
    multiplies prepared fragments. ``hw`` (off the simulator): inline PTX,
    with ``sh`` and ``xw`` unused; otherwise the emulation, whose scratch is
    ``sh[xw : xw + geometry.scratch_elements(kind)]``. Both inlined."""
    key = (kind, bool(hw) and not _on_simulator())
    if key not in _STEPS:
        split, mma = (_hardware_step if key[1] else _emulated_step)(kind)
        _STEPS[key] = (_device(split), _device(mma))
    return _STEPS[key]
