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
from ..adapter_math import (pool_inputs, pool_sum, qahira_delta_weight, qbara_delta_weight,
                            repeat_outputs)
from .qlinear import QuantLinear, _MergedQAHiRALinear, _QBaRALinear, qahira_merges_into_offsets


class _PairMean(torch.autograd.Function):
    """P_2: the mean of each adjacent pair of the last dim by one strided add (torch's mean over
    a size-2 last dim is a slow reduction on CPU: ~10% of a Q-BaRA training step). Bit-identical
    to pool_inputs(x, 2) and its gradient: (a + b) rounds once, / 2 is exact, and backward
    gives g / 2 to both inputs, as mean's backward does."""

    @staticmethod
    def forward(ctx, x):
        return pool_sum(x, 2).div_(2)

    @staticmethod
    def backward(ctx, g):
        return repeat_outputs(g / 2, 2)


class _PairRepeatScaled(torch.autograd.Function):
    """R_2(y) * s without a separate full-width multiply, and a backward that sums each output
    pair by one strided add instead of repeat_interleave's reduction. Bit-identical to
    repeat_outputs(y, 2) * s and its gradient ((g_0 * s) + (g_1 * s), as autograd computes it:
    the mul's backward first, then the sum over the pair)."""

    @staticmethod
    def forward(ctx, y, scaling: float):
        ctx.scaling = scaling
        return repeat_outputs(y * scaling, 2)

    @staticmethod
    def backward(ctx, g):
        return pool_sum(g * ctx.scaling, 2), None


def _pool(x: torch.Tensor, pool: int) -> torch.Tensor:
    """pool_inputs(x, pool), through _PairMean for pool 2 (the same bits, faster)."""
    return _PairMean.apply(x) if pool == 2 else pool_inputs(x, pool)


def _repeat_scaled(y: torch.Tensor, repeat: int, scaling: float) -> torch.Tensor:
    """repeat_outputs(y, repeat) * scaling, through _PairRepeatScaled for repeat 2."""
    if repeat == 2:
        return _PairRepeatScaled.apply(y, scaling)
    return repeat_outputs(y, repeat) * scaling


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
        self.dropout_p = float(dropout)
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

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + self(x) in y's dtype: the base output y [..., out] plus this adapter's delta."""
        return y + self(x).to(y.dtype)


class QBaRA(_Adapter):
    kind = "qbara"

    def __init__(self, in_features: int, out_features: int, rank: int, pool: int = 2,
                 repeat: int = 2, scaling: float = 1.0, dropout: float = 0.0):
        super().__init__(in_features, out_features, pool, repeat, scaling, dropout)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features // pool))
        self.lora_B = nn.Parameter(torch.zeros(out_features // repeat, rank))
        kaiming_uniform_like_peft(self.lora_A)

    # R_q and s go into B' = R_q(B) * s [out, R] (built per step: small), so no [T, out/q]
    # intermediate is repeated to [T, out] (a full-width copy, and a strided reduction in
    # backward), and add_delta folds the add into the GEMM (addmm). P_p stays on x: the expanded
    # A' = R_p(A^T)^T / p [R, in] (a GEMM on full-width x) measured slower. Forward + backward +
    # the add, 1 thread, T = 512, R = 38, p = q = 2, the shapes of benchmarks/train_throughput.py,
    # median CPU ms, old form (P_p, R_q) | expanded A' and B' | P_p, B' and addmm (this form):
    #   in -> out       fp32                  bf16 autocast
    #   1024 -> 2816    17.4 | 11.0 | 8.9     11.8 | 8.1 | 5.7
    #   2816 -> 1024     8.7 |  7.7 | 6.1      9.4 | 7.0 | 5.9
    #   1024 -> 1024     7.2 |  5.1 | 4.2      5.7 | 4.0 | 3.2
    # torch.profiler (1024 -> 2816, self CPU per step): fp32 13.2 -> 6.2 ms, bf16 7.5 -> 3.8 ms;
    # the old form spent it in copy_ (repeat), add and mul over [T, out]. The rounding differs
    # from s * R_q((h A^T) B^T) (s scales B before the GEMM, not its result): bounded in
    # tests/training/test_adapters.py.
    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(self.dropout(x), self.pool).to(self.lora_A.dtype) @ self.lora_A.t()

    def _expanded_b(self) -> torch.Tensor:
        return self.lora_B.repeat_interleave(self.repeat, dim=0) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hidden(x) @ self._expanded_b().t()

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden(x).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self._expanded_b().t().to(y.dtype))
        return out.view(y.shape)

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
        h = _pool(self.dropout(x), self.pool).to(self.qahira_M.dtype)
        return _repeat_scaled(h @ self.qahira_M.t(), self.repeat, self.scaling)

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
    """base(x) + adapter(x); the base stays frozen.

    A QA-HiRA on a QuantLinear whose tiles hold whole quantization blocks, without active
    dropout (merges_into_offsets), runs as its merged layer: one GEMM with the offsets shifted
    by the adapter's per-block delta (qlinear._MergedQAHiRALinear, the model `qahira merge`
    writes). Everything else: base(x) then adapter.add_delta."""

    def __init__(self, base: nn.Module, adapter: _Adapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    @property
    def merges_into_offsets(self) -> bool:
        a, b = self.adapter, self.base
        return (isinstance(a, QAHiRA) and isinstance(b, QuantLinear)
                and qahira_merges_into_offsets(b.cfg, a.pool, a.repeat,
                                               a.dropout_p if a.training else 0.0))

    @property
    def fuses_qbara(self) -> bool:
        """A Q-BaRA on a QuantLinear without active dropout runs as one autograd node
        (qlinear._QBaRALinear): the same GEMMs, fewer intermediate tensors."""
        a = self.adapter
        return (isinstance(a, QBaRA) and isinstance(self.base, QuantLinear)
                and not (a.training and a.dropout_p > 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merges_into_offsets:
            a, b = self.adapter, self.base
            return _MergedQAHiRALinear.apply(x, a.qahira_M, b.qweight, b.scales, b.offsets,
                                             b.bias, b.cfg, a.pool, a.repeat, a.scaling)
        if self.fuses_qbara:
            a, b = self.adapter, self.base
            return _QBaRALinear.apply(x, a.lora_A, a.lora_B, b.qweight, b.scales, b.offsets,
                                      b.bias, b.cfg, a.pool, a.repeat, a.scaling)
        return self.adapter.add_delta(self.base(x), x)
