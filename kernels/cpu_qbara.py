"""`CpuQbaraLayer`: every Q-BaRA adapter of one LoRA layer applied in one compiled call (CPU).

    kernel = CpuQbaraLayer.create(a_stacked, bt_stacked, geo, coef)  # None: no library
    kernel.apply(y, x, rows, slots)   # y[rows] += each token's adapter delta, in place

The arithmetic is in `cpu_qbara.c` (its header has the math); `qahira_kernels.cpu_lib` builds it.
The layer owns the buffers and keeps them current as adapters come and go (the kernel holds
their addresses, so they are updated in place, never reallocated):

    a_stacked[c]   fp32 [slots, R, in]      compact A of slot s in its [:rank, :in/p] corner
    bt_stacked[c]  fp32 [slots, R, out_c]   compact B^T of slot s in its [:rank, :out_c/q] corner
    geo[c]         int32 [slots, 3]         pool, repeat, rank; rank 0 = slot unused on slice c
    coef[c]        fp32 [slots]             scaling / pool

Slices c (1 to 3) are the column blocks of a merged layer's output, in order.
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
                ("y_col", ctypes.c_long * MAX_SLICES), ("out_size", ctypes.c_int * MAX_SLICES)]


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape \
            or not t.is_contiguous():
        raise ValueError(f"CpuQbaraLayer: {name} must be a contiguous CPU {dtype} tensor of "
                         f"shape {list(shape)}, got {t.dtype} {list(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


class CpuQbaraLayer:
    def __init__(self, lib, a_stacked: Sequence[torch.Tensor], bt_stacked: Sequence[torch.Tensor],
                 geo: Sequence[torch.Tensor], coef: Sequence[torch.Tensor]):
        n = len(a_stacked)
        if not 1 <= n <= MAX_SLICES or not n == len(bt_stacked) == len(geo) == len(coef):
            raise ValueError(f"CpuQbaraLayer: 1 to {MAX_SLICES} slices, each with a_stacked, "
                             f"bt_stacked, geo and coef; got {len(a_stacked)}, "
                             f"{len(bt_stacked)}, {len(geo)}, {len(coef)}")
        slots, r_max, in_features = a_stacked[0].shape
        if r_max > MAX_RANK:
            raise ValueError(f"CpuQbaraLayer: rank {r_max} above the kernel's limit {MAX_RANK}")
        s = QbaraLayer(n_slices=n, in_features=in_features, r_max=r_max, n_slots=slots)
        col = 0
        for c in range(n):
            out_c = bt_stacked[c].shape[-1]
            _check(a_stacked[c], f"a_stacked[{c}]", torch.float32, (slots, r_max, in_features))
            _check(bt_stacked[c], f"bt_stacked[{c}]", torch.float32, (slots, r_max, out_c))
            _check(geo[c], f"geo[{c}]", torch.int32, (slots, 3))
            _check(coef[c], f"coef[{c}]", torch.float32, (slots,))
            s.a[c], s.bt[c] = a_stacked[c].data_ptr(), bt_stacked[c].data_ptr()
            s.geo[c], s.coef[c] = geo[c].data_ptr(), coef[c].data_ptr()
            s.y_col[c], s.out_size[c] = col, out_c
            col += out_c
        self._lib, self._struct, self.out_features = lib, s, col
        self.in_features = in_features
        self._buffers = (tuple(a_stacked), tuple(bt_stacked), tuple(geo), tuple(coef))  # alive

    @classmethod
    def create(cls, *args) -> "CpuQbaraLayer | None":
        """The kernel over these buffers, or None when the compiled library is unavailable
        (cpu_lib.library_error() says why)."""
        lib = cpu_lib.load_library()
        return None if lib is None else cls(lib, *args)

    def apply(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
        """y[rows[i]] += delta of slot slots[i] for x[rows[i]], in place; returns y.

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
        rc = self._lib.qahira_qbara_layer(
            ctypes.byref(self._struct), x.data_ptr(), codes[x.dtype], x.stride(0), x.shape[0],
            rows.numel(), rows.data_ptr(), slots.data_ptr(), y.data_ptr(), codes[y.dtype], y.stride(0))
        if rc == -1:
            raise ValueError("qahira_qbara_layer: a slot index or a slot's geometry (pool, "
                             "repeat, rank) does not fit this layer's buffers")
        if rc == -3:
            raise ValueError(f"qahira_qbara_layer: a row index is outside [0, {x.shape[0]})")
        if rc:
            raise MemoryError("qahira_qbara_layer: out of memory for the per-thread buffers")
        return y
