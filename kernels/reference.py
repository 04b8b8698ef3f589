"""fp32 torch references for the Q-BaRA and QA-HiRA kernels of this package (tests and
benchmark checks).

Written for clarity, not speed: they follow the paper's formula literally (pool, project,
expand, repeat). The block-wise GEMM's reference is the format's one dequantization
(docs/FORMAT.md), which lives with the format, not in this library.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------- Q-BaRA
# Stacked buffers (the kernels' interface):
#   A [slots, R_max, in_max_pooled], B [slots, out_max_rep, R_max], zero-padded;
#   pool, repeat, rank: int [slots]; scaling: float [slots]; slot_idx: int [T], -1 = no adapter.


def qbara_shrink_ref(x: torch.Tensor, A: torch.Tensor, pool: torch.Tensor, rank: torch.Tensor,
                     slot_idx: torch.Tensor) -> torch.Tensor:
    """h [T, R_max] fp32: h[t, :rank] = P_p(x[t]) @ A[slot, :rank, :in/p]^T, zero elsewhere."""
    t_count, in_f = x.shape
    h = torch.zeros(t_count, A.shape[1], dtype=torch.float32, device=x.device)
    slots = slot_idx.tolist()
    for s in sorted(set(slots) - {-1}):
        p, r = int(pool[s]), int(rank[s])
        tok = torch.tensor([t for t, v in enumerate(slots) if v == s], device=x.device)
        pooled = x[tok].to(torch.float32).reshape(len(tok), in_f // p, p).mean(dim=-1)
        h[tok, :r] = pooled @ A[s, :r, :in_f // p].to(torch.float32).t()
    return h


def qbara_expand_ref(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, repeat: torch.Tensor,
                     rank: torch.Tensor, scaling: torch.Tensor,
                     slot_idx: torch.Tensor) -> torch.Tensor:
    """fp32 y + scaling * R_q(h @ B^T) per token (returns a new tensor)."""
    out = y.to(torch.float32).clone()
    out_f = y.shape[1]
    slots = slot_idx.tolist()
    for s in sorted(set(slots) - {-1}):
        q, r, sc = int(repeat[s]), int(rank[s]), float(scaling[s])
        tok = torch.tensor([t for t, v in enumerate(slots) if v == s], device=y.device)
        delta = h[tok, :r].to(torch.float32) @ B[s, :out_f // q, :r].to(torch.float32).t()
        out[tok] += sc * delta.repeat_interleave(q, dim=1)
    return out


def qbara_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              pool: torch.Tensor, repeat: torch.Tensor, rank: torch.Tensor,
              scaling: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
    """fp32 y + s * R_q(B A P_p(x)) per token's adapter (returns a new tensor)."""
    h = qbara_shrink_ref(x, A, pool, rank, slot_idx)
    return qbara_expand_ref(y, h, B, repeat, rank, scaling, slot_idx)


def expand_to_lora(A: torch.Tensor, B: torch.Tensor, pool: torch.Tensor, repeat: torch.Tensor,
                   rank: torch.Tensor, in_features: int,
                   out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivalent standard LoRA of every slot (paper: exact equivalence).

    A' = repeat_interleave(A, p, dim=1) / p  -> [slots, R_max, in]
    B' = repeat_interleave(B, q, dim=0)      -> [slots, out, R_max]   (fp32, zero-padded rank)
    """
    slots, r_max = A.shape[0], A.shape[1]
    A_exp = torch.zeros(slots, r_max, in_features, dtype=torch.float32, device=A.device)
    B_exp = torch.zeros(slots, out_features, r_max, dtype=torch.float32, device=B.device)
    for s in range(slots):
        p, q, r = int(pool[s]), int(repeat[s]), int(rank[s])
        A_exp[s, :r] = A[s, :r, :in_features // p].to(torch.float32).repeat_interleave(p, 1) / p
        B_exp[s, :, :r] = B[s, :out_features // q, :r].to(torch.float32).repeat_interleave(q, 0)
    return A_exp, B_exp


def lora_bgmv_ref(y: torch.Tensor, x: torch.Tensor, A_exp: torch.Tensor, B_exp: torch.Tensor,
                  scaling: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
    """Per-token gathered LoRA: y + scaling[s] * B'[s] @ A'[s] @ x, s = slot_idx[t] (fp32, new)."""
    active = slot_idx >= 0
    s = slot_idx.clamp(min=0).long()
    h = torch.einsum("ti,tri->tr", x.to(torch.float32), A_exp[s].to(torch.float32))
    delta = torch.einsum("tr,tor->to", h, B_exp[s].to(torch.float32))
    delta = delta * scaling.to(torch.float32)[s][:, None] * active[:, None]
    return y.to(torch.float32) + delta


# ----------------------------------------------------------------------------- QA-HiRA
# Flat buffers (the kernels' interface): m_flat fp32 [n], every slot's M [out/qo, in/pi]
# row-major from m_offset[s]; pool (pi), repeat (qo), on: int [slots]; scaling (s) [slots].


def qahira_apply_ref(y: torch.Tensor, x: torch.Tensor, m_flat: torch.Tensor,
                     m_offset: torch.Tensor, pool: torch.Tensor, repeat: torch.Tensor,
                     on: torch.Tensor, scaling: torch.Tensor,
                     slot_idx: torch.Tensor) -> torch.Tensor:
    """fp32 y + s * R_qo(M P_pi(x)) per token whose slot has on = 1 (returns a new tensor)."""
    out = y.to(torch.float32).clone()
    t_count, in_f = x.shape
    out_f = y.shape[1]
    slots = slot_idx.tolist()
    for s in sorted(set(slots) - {-1}):
        if not int(on[s]):
            continue
        pi, qo, off = int(pool[s]), int(repeat[s]), int(m_offset[s])
        m = m_flat[off:off + (out_f // qo) * (in_f // pi)].to(torch.float32)
        m = m.reshape(out_f // qo, in_f // pi)
        tok = torch.tensor([t for t, v in enumerate(slots) if v == s], device=x.device)
        pooled = x[tok].to(torch.float32).reshape(len(tok), in_f // pi, pi).mean(dim=-1)
        out[tok] += float(scaling[s]) * (pooled @ m.t()).repeat_interleave(qo, dim=1)
    return out
