"""`CpuQbaraLayer`: every Q-BaRA adapter of one LoRA layer applied in one compiled call (CPU).

    kernel = CpuQbaraLayer.create(a_stacked, bt_stacked, geo, coef)  # None: no library
    kernel.apply(y, x, rows, slots)   # y[rows] += each token's adapter delta, in place

The arithmetic is in `cpu_qbara.c` (its header has the math); `qahira_kernels.cpu_lib` builds it.
The layer owns the buffers and keeps them current as adapters come and go (the kernel holds
their addresses, so they are updated in place, never reallocated):

    a_stacked[c]   fp32 [slots, R, in]      compact A of slot s in its [:rank, :in/p] corner
    bt_stacked[c]  fp32 [slots, R, out_c]   compact B^T of slot s in its [:rank, :out_c/q] corner
                   (a_stacked and bt_stacked may both be bf16 instead: each token reads its own
                   slot's, so with many distinct adapters per batch bf16 halves the layer's
                   memory traffic; the arithmetic stays fp32 on the exactly widened values)
    geo[c]         int32 [slots, 3]         pool, repeat, rank; rank 0 = slot unused on slice c
    coef[c]        fp32 [slots]             scaling / pool

Slices c (1 to 3) are the column blocks of a merged layer's output, in order.

A slot may hold a QA-HiRA instead (delta = s * R_qo(M P_pi(x)), M [out_c/qo, in/pi]): the
layer rebuilds (reallocates) these whenever a QA-HiRA slot is set or reset and then calls
`kernel.set_qahira(c, m_flat, m_offset, m_geo, m_coef)` so the kernel reads the new ones:

    m_flat[c]    fp32 [n]            every QA-HiRA slot's M on slice c, row-major, concatenated
                                     (layouts.pack_qahira_slots builds it)
    m_offset[c]  int64 [slots]       where slot s's M starts in m_flat[c]
    m_geo[c]     int32 [slots, 3]    pi, qo, on (1 = slot s is a QA-HiRA on slice c, else 0)
    m_coef[c]    fp32 [slots]        s / pi

On a slice a slot is either (geo rank > 0) or (on = 1), never both: apply refuses that.

Builds: cpu_qbara.c is compiled twice (AVX2, AVX-512; bit-identical results); the kernel calls
the one `variant` names, default `cpu_lib.qbara_variant()` (the widest this CPU runs, or
`$QAHIRA_CPU_ISA`) resolved when the kernel is made.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from . import cpu_lib

MAX_SLICES = 3
MAX_RANK = 1024  # cpu_qbara.c: the rank-r intermediate lives on the stack


class QbaraLayer(ctypes.Structure):
    """Mirror of cpu_qbara.c's qbara_layer_t."""

    _fields_ = [("n_slices", ctypes.c_int), ("in_features", ctypes.c_int),
                ("r_max", ctypes.c_int), ("n_slots", ctypes.c_int),
                ("a", ctypes.c_void_p * MAX_SLICES), ("bt", ctypes.c_void_p * MAX_SLICES),
                ("geo", ctypes.c_void_p * MAX_SLICES), ("coef", ctypes.c_void_p * MAX_SLICES),
                ("y_col", ctypes.c_long * MAX_SLICES), ("out_size", ctypes.c_int * MAX_SLICES),
                ("m", ctypes.c_void_p * MAX_SLICES), ("m_offset", ctypes.c_void_p * MAX_SLICES),
                ("m_geo", ctypes.c_void_p * MAX_SLICES), ("m_coef", ctypes.c_void_p * MAX_SLICES),
                ("m_numel", ctypes.c_long * MAX_SLICES), ("w_bf16", ctypes.c_int)]


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape \
            or not t.is_contiguous():
        raise ValueError(f"CpuQbaraLayer: {name} must be a contiguous CPU {dtype} tensor of "
                         f"shape {list(shape)}, got {t.dtype} {list(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


class CpuQbaraLayer:
    def __init__(self, lib, a_stacked: Sequence[torch.Tensor], bt_stacked: Sequence[torch.Tensor],
                 geo: Sequence[torch.Tensor], coef: Sequence[torch.Tensor],
                 variant: str | None = None):
        n = len(a_stacked)
        if not 1 <= n <= MAX_SLICES or not n == len(bt_stacked) == len(geo) == len(coef):
            raise ValueError(f"CpuQbaraLayer: 1 to {MAX_SLICES} slices, each with a_stacked, "
                             f"bt_stacked, geo and coef; got {len(a_stacked)}, "
                             f"{len(bt_stacked)}, {len(geo)}, {len(coef)}")
        slots, r_max, in_features = a_stacked[0].shape
        if r_max > MAX_RANK:
            raise ValueError(f"CpuQbaraLayer: rank {r_max} above the kernel's limit {MAX_RANK}")
        w_dtype = a_stacked[0].dtype
        if w_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"CpuQbaraLayer: a_stacked and bt_stacked must be float32 or "
                             f"bfloat16, got {w_dtype}")
        s = QbaraLayer(n_slices=n, in_features=in_features, r_max=r_max, n_slots=slots,
                       w_bf16=int(w_dtype == torch.bfloat16))
        col = 0
        for c in range(n):
            out_c = bt_stacked[c].shape[-1]
            _check(a_stacked[c], f"a_stacked[{c}]", w_dtype, (slots, r_max, in_features))
            _check(bt_stacked[c], f"bt_stacked[{c}]", w_dtype, (slots, r_max, out_c))
            _check(geo[c], f"geo[{c}]", torch.int32, (slots, 3))
            _check(coef[c], f"coef[{c}]", torch.float32, (slots,))
            s.a[c], s.bt[c] = a_stacked[c].data_ptr(), bt_stacked[c].data_ptr()
            s.geo[c], s.coef[c] = geo[c].data_ptr(), coef[c].data_ptr()
            s.y_col[c], s.out_size[c] = col, out_c
            col += out_c
        if variant is None:
            variant = cpu_lib.qbara_variant()
        elif variant not in cpu_lib.qbara_variants():
            raise ValueError(f"CpuQbaraLayer: variant {variant!r} is not one this machine runs "
                             f"({', '.join(cpu_lib.qbara_variants())})")
        self.variant = variant  # "avx2" / "avx512": the build apply() calls
        self._fn = getattr(lib, f"qahira_qbara_layer_{variant}")
        self._lib, self._struct, self.out_features = lib, s, col
        self.in_features = in_features
        self._buffers = (tuple(a_stacked), tuple(bt_stacked), tuple(geo), tuple(coef))  # alive
        self._qahira: list[tuple | None] = [None] * n  # the QA-HiRA buffers, kept alive

    def set_qahira(self, c: int, m_flat: torch.Tensor | None, m_offset: torch.Tensor | None = None,
                   m_geo: torch.Tensor | None = None, m_coef: torch.Tensor | None = None) -> None:
        """Point slice c at its (rebuilt) QA-HiRA buffers; `set_qahira(c, None)`: none on c.

        m_flat fp32 [n] (1-D), m_offset int64 [slots], m_geo int32 [slots, 3] (pi, qo, on),
        m_coef fp32 [slots] (s / pi); all contiguous on the CPU. Raises ValueError naming the
        tensor (or the slot) when a buffer has the wrong dtype/shape or a slot with on = 1 has
        a pi / qo that does not divide the slice or an M that runs past m_flat. The kernel keeps
        a reference to the tensors; in-place updates are seen, a reallocation needs this call.
        """
        n_slices = self._struct.n_slices
        if not 0 <= c < n_slices:
            raise ValueError(f"CpuQbaraLayer.set_qahira: slice {c} outside [0, {n_slices})")
        st = self._struct
        if m_flat is None:
            st.m[c] = st.m_offset[c] = st.m_geo[c] = st.m_coef[c] = None
            st.m_numel[c], self._qahira[c] = 0, None
            return
        slots, in_f, out_c = st.n_slots, self.in_features, st.out_size[c]
        if m_flat.dim() != 1:
            raise ValueError(f"CpuQbaraLayer: m_flat[{c}] must be 1-D, got {list(m_flat.shape)}")
        _check(m_flat, f"m_flat[{c}]", torch.float32, (m_flat.numel(),))
        _check(m_offset, f"m_offset[{c}]", torch.int64, (slots,))
        _check(m_geo, f"m_geo[{c}]", torch.int32, (slots, 3))
        _check(m_coef, f"m_coef[{c}]", torch.float32, (slots,))
        for s in m_geo[:, 2].nonzero().flatten().tolist():
            pi, qo, on = m_geo[s].tolist()
            off = int(m_offset[s])
            if on != 1 or pi < 1 or qo < 1 or in_f % pi or out_c % qo or off < 0 \
                    or off + (in_f // pi) * (out_c // qo) > m_flat.numel():
                raise ValueError(
                    f"CpuQbaraLayer: slice {c} slot {s}: m_geo (pi, qo, on) = {(pi, qo, on)} "
                    f"with offset {off} does not fit in={in_f}, out={out_c} and m_flat of "
                    f"{m_flat.numel()} values (on must be 0 or 1; pi, qo >= 1 dividing in, out)")
        st.m[c], st.m_offset[c] = m_flat.data_ptr(), m_offset.data_ptr()
        st.m_geo[c], st.m_coef[c] = m_geo.data_ptr(), m_coef.data_ptr()
        st.m_numel[c] = m_flat.numel()
        self._qahira[c] = (m_flat, m_offset, m_geo, m_coef)

    @classmethod
    def create(cls, *args, variant: str | None = None) -> "CpuQbaraLayer | None":
        """The kernel over these buffers (`variant`: "avx2" / "avx512", default
        cpu_lib.qbara_variant()), or None when the compiled library is unavailable
        (cpu_lib.library_error() says why). ValueError for a variant this machine cannot run."""
        lib = cpu_lib.load_library()
        return None if lib is None else cls(lib, *args, variant=variant)

    def apply(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
        """y[rows[i]] += delta of slot slots[i] (Q-BaRA, LoRA or QA-HiRA) for x[rows[i]], in
        place; returns y.

        y [T, out_features] and x [T, in_features], CPU, fp32/bf16/fp16, unit column stride;
        rows, slots: int64 [n] on CPU, rows distinct (threads split the rows; tokens without an
        adapter are simply not listed).
        """
        if x.dim() != 2 or x.shape[1] != self.in_features or y.dim() != 2 \
                or y.shape[1] != self.out_features or x.shape[0] != y.shape[0]:
            raise ValueError(f"CpuQbaraLayer: x {list(x.shape)} / y {list(y.shape)} do not "
                             f"match [T, {self.in_features}] / [T, {self.out_features}]")
        if rows.dtype != torch.int64 or slots.dtype != torch.int64 or rows.shape != slots.shape \
                or not (rows.is_contiguous() and slots.is_contiguous()) \
                or rows.device.type != "cpu" or slots.device.type != "cpu":
            raise ValueError("CpuQbaraLayer: rows and slots must be contiguous CPU int64 tensors of "
                             f"the same length, got {rows.dtype} {list(rows.shape)} and "
                             f"{slots.dtype} {list(slots.shape)}")
        codes = cpu_lib.DTYPE_CODES
        for name, t in (("x", x), ("y", y)):
            if t.device.type != "cpu" or t.dtype not in codes:
                raise ValueError(f"CpuQbaraLayer: {name} must be a CPU fp32/bf16/fp16 tensor, "
                                 f"got {t.dtype} on {t.device}")
        if y.stride(-1) != 1:
            raise ValueError("CpuQbaraLayer: y needs unit column stride")
        if x.stride(-1) != 1:
            x = x.contiguous()
        rc = self._fn(
            ctypes.byref(self._struct), x.data_ptr(), codes[x.dtype], x.stride(0), x.shape[0],
            rows.numel(), rows.data_ptr(), slots.data_ptr(), y.data_ptr(), codes[y.dtype], y.stride(0))
        if rc == -1:
            raise ValueError("qahira_qbara_layer: a slot index or a slot's geometry (pool, "
                             "repeat, rank) does not fit this layer's buffers")
        if rc == -3:
            raise ValueError(f"qahira_qbara_layer: a row index is outside [0, {x.shape[0]})")
        if rc == -4:
            raise ValueError("qahira_qbara_layer: a slot holds both a Q-BaRA/LoRA (geo rank > 0) "
                             "and a QA-HiRA (m_geo on = 1) on one slice; reset one of them")
        if rc == -5:
            raise ValueError("qahira_qbara_layer: a QA-HiRA slot's m_geo (pi, qo, on) or its M's "
                             "extent from m_offset does not fit this layer or m_flat")
        if rc:
            raise MemoryError("qahira_qbara_layer: out of memory for the per-thread buffers")
        return y
