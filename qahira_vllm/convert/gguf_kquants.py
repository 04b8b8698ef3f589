"""GGUF K-quant super-blocks (llama.cpp's ggml-common.h, 256 weights each along the input dim,
little endian) decoded into the form the GGUF reader (convert/gguf.py) turns into the format.

Each decoder returns (q uint8 [rows, in] unsigned, d float32 [rows, in/sub], m float32
[rows, in/sub]) per sub-block of `sub` weights, with the type's value

    affine  (Q2_K, Q4_K, Q5_K)  w = d q + m     d = d_super * sc, m = -(dmin * mn)
    signed  (Q3_K, Q6_K)        w = d (q - z)   d = d_super * sc (sc signed)

d_super, dmin: fp16; sc, mn: the per-sub-block integer scale and min. Both products are
computed in float32 exactly as gguf-py computes them (fp16 times an integer below 2**7:
at most 18 significant bits, exact), so d and m are gguf's own sub-block scale and min.

    type  bytes  layout (offsets in bytes)                                    sub  q      z
    Q2_K   84    sc|mn nibbles 0:16, q 2-bit 16:80, d 80:82, dmin 82:84        16   0..3
    Q3_K  110    high bit 0:32, q low 2 bits 32:96, sc 6-bit 96:108, d 108:110 16   0..7   4
    Q4_K  144    d 0:2, dmin 2:4, sc|mn 6-bit 4:16, q 4-bit 16:144              32   0..15
    Q5_K  176    d, dmin, sc|mn as Q4_K, high bit 16:48, q low 4 bits 48:176    32   0..31
    Q6_K  210    q low 4 bits 0:128, q high 2 bits 128:192, sc int8 192:208,    16   0..63  32
                 d 208:210

Bit positions (element e of the super-block):
- 2-bit fields (Q2_K q, Q3_K low bits): byte 32 h + j, bits 2k..2k+1 -> e = 128 h + 32 k + j.
- Q3_K high bit: byte j, bit k -> e = 32 k + j; gguf's value is low - 4 when the bit is 0,
  i.e. q = low + 4 bit in 0..7 with z = 4. Its 16 scales: low 4 bits in the nibbles of bytes
  0..7 (low nibble of byte i -> scale i, high -> i + 8), high 2 bits in bytes 8..11 (bits
  2k..2k+1 of byte 8 + i -> scale 4 k + i), minus 32.
- Q4_K / Q5_K 4-bit fields: byte 32 c + j, low nibble -> e = 64 c + j, high -> 64 c + 32 + j;
  Q5_K's fifth bit of e = 32 i + j is bit i of high-bit byte j. The 12 scale bytes hold eight
  6-bit sc and mn: for i < 4, sc_i = b[i] & 63, mn_i = b[i+4] & 63; sc_{i+4} = (b[i+8] & 15)
  | (b[i] >> 6) << 4, mn_{i+4} = (b[i+8] >> 4) | (b[i+4] >> 6) << 4.
- Q6_K: low nibbles: byte 64 h + j, low -> e = 128 h + j, high -> 128 h + 64 + j (j < 64);
  high 2 bits: byte 32 h + j, bits 2k..2k+1 -> e = 128 h + 32 k + j.

Q8_K is not decoded: llama.cpp uses it only for activations (no model file stores weights in
it), and its fp32 d times an int8 is rounded in gguf's float32 product, so no exact form.
"""

from __future__ import annotations

import numpy as np

QK = 256  # weights per super-block

# type -> (bytes per super-block, "affine" | "signed", weights per sub-block, qmax, z)
K_LAYOUTS = {"Q2_K": (84, "affine", 16, 3, None), "Q3_K": (110, "signed", 16, 7, 4),
             "Q4_K": (144, "affine", 32, 15, None), "Q5_K": (176, "affine", 32, 31, None),
             "Q6_K": (210, "signed", 16, 63, 32)}


def _fp16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian fp16 -> float32 [...]."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _crumbs(b: np.ndarray) -> np.ndarray:
    """2-bit fields of uint8 [..., 64] -> [..., 256]: bits 2k of byte 32 h + j is element
    128 h + 32 k + j."""
    lead = b.shape[:-1]
    parts = b.reshape(*lead, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (parts & 3).reshape(*lead, QK)


def _nibbles(b: np.ndarray, run: int) -> np.ndarray:
    """4-bit fields of uint8 [..., n]: bytes in runs of `run`; within run r the low nibbles are
    elements 2 r run + j, the high ones 2 r run + run + j -> [..., 2 n]."""
    lead, n = b.shape[:-1], b.shape[-1]
    runs = b.reshape(*lead, n // run, 1, run) >> np.array([0, 4], dtype=np.uint8)[:, None]
    return (runs & 15).reshape(*lead, 2 * n)


def unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 scale bytes uint8 [..., 12] -> (sc, mn) uint8 [..., 8], 0..63 each."""
    lo_sc, lo_mn, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_mn & 63, (hi >> 4) | ((lo_mn >> 6) << 4)], axis=-1)
    return sc, mn


def unpack_scales_q3_k(b: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes uint8 [..., 12] -> int16 [..., 16], -32..31."""
    lead = b.shape[:-1]
    low = (b[..., 0:8].reshape(*lead, 1, 8) >> np.array([0, 4], dtype=np.uint8)[:, None]) & 15
    high = (b[..., 8:12].reshape(*lead, 1, 4)
            >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    return (low.reshape(*lead, 16) | (high.reshape(*lead, 16) << 4)).astype(np.int16) - 32


def _per_sub(d: np.ndarray, ints: np.ndarray) -> np.ndarray:
    """fp32 d [rows, nb] times integer [rows, nb, k] -> float32 [rows, nb * k] (exact: an fp16
    value times an integer below 2**7 fits float32's 24 bits)."""
    return (d[..., None] * ints.astype(np.float32)).reshape(d.shape[0], -1)


def decode_k_blocks(data: np.ndarray, type_name: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw GGUF rows uint8 [rows, n_super * bytes] of a K_LAYOUTS type -> (q uint8 [rows,
    n_super * 256], d float32 [rows, n_super * 256 / sub], m float32 of the same shape for the
    affine types, None for the signed ones): the module docstring's w = d q + m or
    w = d (q - z). ValueError for another type or a row width that is not whole super-blocks."""
    if type_name not in K_LAYOUTS:
        raise ValueError(f"{type_name} is not a decoded K-quant type ({', '.join(K_LAYOUTS)})")
    size = K_LAYOUTS[type_name][0]
    rows = data.shape[0]
    if data.ndim != 2 or data.shape[1] % size:
        raise ValueError(f"{type_name} rows of {list(data.shape)} bytes: expected [rows, a "
                         f"multiple of {size}]")
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1, size)
    if type_name == "Q2_K":
        sc, q = b[..., 0:16], _crumbs(b[..., 16:80])
        d, dmin = _fp16(b[..., 80:82]), _fp16(b[..., 82:84])
        return q.reshape(rows, -1), _per_sub(d, sc & 15), -_per_sub(dmin, sc >> 4)
    if type_name == "Q3_K":
        high = (b[..., 0:32].reshape(rows, -1, 1, 32)
                >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [rows, nb, k, j]
        q = _crumbs(b[..., 32:96]) | (high.reshape(rows, -1, QK) << 2)
        d = _fp16(b[..., 108:110])
        return q.reshape(rows, -1), _per_sub(d, unpack_scales_q3_k(b[..., 96:108])), None
    if type_name == "Q6_K":
        q = _nibbles(b[..., 0:128], 64) | (_crumbs(b[..., 128:192]) << 4)
        sc = b[..., 192:208].view(np.int8)
        return q.reshape(rows, -1), _per_sub(_fp16(b[..., 208:210]), sc), None
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    sc, mn = unpack_scale_min_k4(b[..., 4:16])
    if type_name == "Q4_K":
        q = _nibbles(b[..., 16:144], 32)
    else:  # Q5_K
        high = (b[..., 16:48].reshape(rows, -1, 1, 32)
                >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [rows, nb, sub-block, j]
        q = _nibbles(b[..., 48:176], 32) | (high.reshape(rows, -1, QK) << 4)
    return q.reshape(rows, -1), _per_sub(d, sc), -_per_sub(dmin, mn)
