"""Dense float64 reference of multi-adapter Q-BaRA serving, for tests only.

Each slot's compact adapter is expanded to its full-width LoRA (A' = repeat_interleave(A, p, 1)
/ p, B' = repeat_interleave(B, q, 0)) and applied token by token, written without
qahira_vllm.lora.ops or qahira_vllm.adapter_math (the code it checks).
"""

from __future__ import annotations

import torch


def dense_reference(x: torch.Tensor, slot_idx: torch.Tensor, a_list, b_list, geometry,
                    out_features: int) -> torch.Tensor:
    """Delta float64 [T, out] for x [T, in]: token t gets s * B'[slot] A'[slot] x[t] (zeros for
    slot -1 or a slot whose geometry is None). a_list[s] [r, in/p], b_list[s] [out/q, r];
    geometry[s] has .pool, .repeat, .scaling (qahira_vllm.lora.ops.SlotGeometry)."""
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float64)
    for t, s in enumerate(slot_idx.tolist()):
        if s < 0 or geometry[s] is None:
            continue
        g = geometry[s]
        a_full = a_list[s].double().repeat_interleave(g.pool, dim=1) / g.pool
        b_full = b_list[s].double().repeat_interleave(g.repeat, dim=0)
        y[t] = g.scaling * (b_full @ (a_full @ x[t].double()))
    return y
