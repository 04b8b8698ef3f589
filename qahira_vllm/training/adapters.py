"""Adapter modules (pure torch) and their weight-space math.

Each adapter maps the layer input x [..., in] to a delta [..., out] that is added to the frozen
base output. Notation (docs/FORMAT.md section 2): P_p averages p adjacent inputs (in -> in/p),
R_q repeats each output q times (out/q -> out, repeat_interleave), s is the scaling.

    QBaRA   s * R_q(B A P_p(x))       A [R, in/p] kaiming-uniform, B [out/q, R] zeros
    QAHiRA  s * R_qo(M P_pi(x))       M [out/qo, in/pi], zeros (or kaiming)
    LoRA    s * B A x                 A [r, in] kaiming-uniform, B [out, r] zeros (PEFT's init)

The math itself (P_p, R_q, the dense dW [out, in] with y = x (W + dW)^T) is
qahira_vllm.adapter_math; each module's delta_weight() is that dW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapter_format import LORA_A, LORA_B, QAHIRA_M
from ..adapter_math import (pool_inputs, qahira_delta_weight, qbara_delta_weight,
                            repeat_outputs)


def kaiming_uniform_like_peft(t: torch.Tensor) -> None:
    # nn.Linear's default init (and PEFT's lora_A init): kaiming-uniform with a = sqrt(5).
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _Adapter(nn.Module):
    kind = "abstract"

    def __init__(self, in_features: int, out_features: int, pool: int, repeat: int,
                 scaling: float, dropout: float):
        super().__init__()
        if in_features % pool or out_features % repeat:
            raise ValueError(f"{self.kind}: pool={pool} must divide in={in_features} and "
                             f"repeat={repeat} must divide out={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.pool, self.repeat, self.scaling = pool, repeat, float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Compact tensors under their adapter_format names."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for kind, param in self.tensors().items():
                param.copy_(tensors[kind].to(param.dtype))

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError


class QBaRA(_Adapter):
    kind = "qbara"

    def __init__(self, in_features: int, out_features: int, rank: int, pool: int = 2,
                 repeat: int = 2, scaling: float = 1.0, dropout: float = 0.0):
        super().__init__(in_features, out_features, pool, repeat, scaling, dropout)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features // pool))
        self.lora_B = nn.Parameter(torch.zeros(out_features // repeat, rank))
        kaiming_uniform_like_peft(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = pool_inputs(self.dropout(x), self.pool).to(self.lora_A.dtype)
        y = (h @ self.lora_A.t()) @ self.lora_B.t()
        return repeat_outputs(y, self.repeat) * self.scaling

    def tensors(self):
        return {LORA_A: self.lora_A, LORA_B: self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        return qbara_delta_weight(self.lora_A, self.lora_B, self.pool, self.repeat, self.scaling)


class QAHiRA(_Adapter):
    kind = "qahira"

    def __init__(self, in_features: int, out_features: int, pool: int = 4, repeat: int = 8,
                 scaling: float = 1.0, dropout: float = 0.0, init: str = "zeros"):
        super().__init__(in_features, out_features, pool, repeat, scaling, dropout)
        self.qahira_M = nn.Parameter(torch.zeros(out_features // repeat, in_features // pool))
        if init == "kaiming":  # the authors' code: dW != 0 at step 0
            kaiming_uniform_like_peft(self.qahira_M)
        elif init != "zeros":
            raise ValueError(f"QA-HiRA init={init!r}: expected 'zeros' or 'kaiming'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = pool_inputs(self.dropout(x), self.pool).to(self.qahira_M.dtype)
        return repeat_outputs(h @ self.qahira_M.t(), self.repeat) * self.scaling

    def tensors(self):
        return {QAHIRA_M: self.qahira_M}

    def delta_weight(self) -> torch.Tensor:
        return qahira_delta_weight(self.qahira_M, self.pool, self.repeat, self.scaling)


class LoRA(_Adapter):
    kind = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(in_features, out_features, 1, 1, scaling, dropout)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        kaiming_uniform_like_peft(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)
        return (h @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def tensors(self):
        return {LORA_A: self.lora_A, LORA_B: self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        return qbara_delta_weight(self.lora_A, self.lora_B, 1, 1, self.scaling)


class AdaptedLinear(nn.Module):
    """base(x) + adapter(x); the base stays frozen."""

    def __init__(self, base: nn.Module, adapter: _Adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter(x).to(y.dtype)
