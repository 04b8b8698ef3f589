"""Weight layouts the raw ops read, made from plain tensors (the Triton GEMM's repacking is
`blockwise_gemm.pack_blockwise_weight`, next to its kernel)."""

from __future__ import annotations

import torch

CPU_INTDOT_CHUNK = 32  # activation quantization chunk (columns) of cpu_int4; bi % it == 0


def pack_cpu_int4(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] (values 0..15, K % 32 == 0) -> uint8 [N, K/2], the weight of
    ops.cpu_int4: per 32-column chunk, byte j = q[j] | q[16 + j] << 4."""
    n, k = q.shape
    c = CPU_INTDOT_CHUNK
    g = q.to(torch.uint8).view(n, k // c, 2, c // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def pack_cpu_int8(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] (values 0..255, K % 32 == 0) -> uint8 [N, K], the weight of ops.cpu_int8:
    each pair of 32-column chunks (c even, c + 1) stored as [c[0:16], c+1[0:16], c[16:32],
    c+1[16:32]] (the order cpu_intdot.c keeps its quantized activations in: one 512-bit load
    then holds the same half of two chunks); a last unpaired chunk stays as it is."""
    n, k = q.shape
    c = CPU_INTDOT_CHUNK
    q = q.to(torch.uint8)
    paired = (k // c) // 2 * 2 * c
    pairs = q[:, :paired].reshape(n, paired // (2 * c), 2, 2, c // 2).transpose(2, 3)
    return torch.cat([pairs.reshape(n, paired), q[:, paired:]], dim=1).contiguous()


CPU_DEQUANT_GEMM_GROUP = 16  # output rows per packed group of cpu_dequant_gemm; out % 16 == 0


def pack_cpu_dequant_gemm(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                          bits: int, bo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors ops.cpu_dequant_gemm reads, from unpacked q int [N, K] (0..15 or 0..255) and
    the stored scales / offsets [N/bo, K/bi] (fp16/fp32, dtypes kept); N % 16 == 0, K even.

    Returns (w uint8: 4-bit [N/16, K/2, 16], byte = q[n, k] | q[n, k+1] << 4 for the 16 rows
    of a group and the column pair (k, k+1); 8-bit [N/16, K/2, 16, 2]; scales and offsets
    [N/16, K/bi, 16], one per output row (2-D blocks repeated over their bo rows)).
    """
    n, k = q.shape
    g = CPU_DEQUANT_GEMM_GROUP
    pairs = q.to(torch.uint8).view(n // g, g, k // 2, 2).permute(0, 2, 1, 3)
    w = (pairs[..., 0] | (pairs[..., 1] << 4)) if bits == 4 else pairs
    rows = [t.repeat_interleave(bo, dim=0) if bo > 1 else t for t in (scales, offsets)]
    s, o = (t.view(n // g, g, t.shape[1]).transpose(1, 2).contiguous() for t in rows)
    return w.contiguous(), s, o


DEQUANT_GEMM_ROW_LAYOUT = ("amx",)  # cpu_dequant_gemm builds that read pack_cpu_dequant_gemm_rows
# cpu_dequant_gemm.c's AMX build: rows per panel (PANEL) and columns per chunk (KCA)
CPU_DEQUANT_GEMM_PANEL, CPU_DEQUANT_GEMM_AMX_CHUNK = 64, 1024


def pack_cpu_dequant_gemm_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight ops.cpu_dequant_gemm's AMX build reads, from unpacked q int [N, K], as uint8
    [N, K * bits / 8]: each row's bytes (4-bit, K % 64 == 0: per 64 columns, byte i = q[64c + i]
    | q[64c + 32 + i] << 4, so 32 bytes widened to 16-bit words hold 32 consecutive columns in
    their low nibbles and the next 32 in their high ones; 8-bit: q), reordered so that each
    panel of 64 rows (the last may be shorter) holds its rows chunk after chunk of 1024 columns
    (CPU_DEQUANT_GEMM_AMX_CHUNK):
    one contiguous block per (panel, chunk). The scales and offsets that build reads are the
    stored ones in fp32 (an exact widening)."""
    q = q.to(torch.uint8)
    n, k = q.shape
    if bits == 4:
        c = q.view(n, k // 64, 2, 32)
        q = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)
    width = CPU_DEQUANT_GEMM_AMX_CHUNK * bits // 8
    blocks = [chunk.reshape(-1) for panel in q.split(CPU_DEQUANT_GEMM_PANEL)
              for chunk in panel.split(width, dim=1)]
    return torch.cat(blocks).view(n, -1)


def pack_qahira_slots(ms: "list[torch.Tensor | None]") -> tuple[torch.Tensor, torch.Tensor]:
    """QA-HiRA slots of one slice -> (m_flat fp32 [n], m_offset int64 [slots]), what
    cpu_qbara.CpuQbaraLayer.set_qahira and qbara.qahira_apply read: ms[s] is slot s's M
    [out_c/qo, in/pi] (any float dtype, any device; None = not a QA-HiRA slot, offset 0), stored
    row-major one after another on the device of the first M (CPU if none)."""
    present = [m for m in ms if m is not None]
    device = present[0].device if present else torch.device("cpu")
    sizes = [0 if m is None else m.numel() for m in ms]
    offsets = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    m_flat = torch.cat([m.reshape(-1).to(device, torch.float32) for m in present]) if present \
        else torch.zeros(0, dtype=torch.float32, device=device)
    m_offset = torch.where(torch.tensor([m is not None for m in ms], dtype=torch.bool),
                           offsets[:-1], 0)
    return m_flat.contiguous(), m_offset.to(device)
