"""Adapter math in plain torch: the one definition of pooling, repeating and adapter deltas.

Notation (docs/FORMAT.md section 2), for a layer with weight [out, in] and scaling s:

    P_p(x)   mean of each group of p adjacent inputs            [..., in] -> [..., in/p]
    R_q(y)   each output repeated q times (repeat_interleave)   [..., out/q] -> [..., out]
    Q-BaRA   delta(x) = s * R_q(B A P_p(x))    A [R, in/p], B [out/q, R]
    QA-HiRA  delta(x) = s * R_qo(M P_pi(x))    M [out/qo, in/pi]
             dW[o, i] = s * M[o // qo, i // pi] / pi
    LoRA     Q-BaRA with p = q = 1

Used by the trainer (training/adapters.py), merge, export and the serving ops (lora/ops.py).
Pure functions on tensors: no I/O, no training code, no vLLM.
"""

from __future__ import annotations

import torch


def pool_inputs(x: torch.Tensor, pool: int) -> torch.Tensor:
    """P_p: x [..., in] -> [..., in/pool], the mean of each group of `pool` adjacent features.

    Same dtype as x; in must be a multiple of pool (RuntimeError from unflatten otherwise)."""
    if pool == 1:
        return x
    return x.unflatten(-1, (x.shape[-1] // pool, pool)).mean(dim=-1)


def pool_sum(x: torch.Tensor, pool: int) -> torch.Tensor:
    """pool * P_p(x): x [..., in] -> [..., in/pool], the sum of each group of `pool` adjacent
    features (the serving path folds the 1/p into the scale of the rank-r intermediate, which
    is far smaller). Strided adds: on CPU ~4x faster than a reduction over a size-p last dim
    (measured, 32 x 576 fp32). Returns x itself for pool == 1."""
    if pool == 1:
        return x
    groups = x.unflatten(-1, (x.shape[-1] // pool, pool))
    out = groups[..., 0] + groups[..., 1]
    for j in range(2, pool):
        out += groups[..., j]
    return out


def repeat_outputs(y: torch.Tensor, repeat: int) -> torch.Tensor:
    """R_q: y [..., out/q] -> [..., out], each feature of the last dim repeated `repeat` times
    in place (repeat_interleave)."""
    return y if repeat == 1 else y.repeat_interleave(repeat, dim=-1)


def qbara_to_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, pool: int,
                  repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-R LoRA equal to a Q-BaRA: A [R, in/p], B [out/q, R] ->
    A' = repeat_interleave(A, p, 1) / p [R, in], B' = repeat_interleave(B, q, 0) [out, R],
    in the inputs' dtypes; the scaling is unchanged."""
    return (lora_A.repeat_interleave(pool, dim=1) / pool,
            lora_B.repeat_interleave(repeat, dim=0))


def qbara_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, pool: int, repeat: int,
                       scaling: float) -> torch.Tensor:
    """Dense dW = s * B' A' [out, in] of a Q-BaRA (or LoRA with p = q = 1), constant on each
    repeat x pool tile; dtype of A and B."""
    a, b = qbara_to_lora(lora_A, lora_B, pool, repeat)
    return scaling * (b @ a)


def qahira_delta_weight(m: torch.Tensor, pool: int, repeat: int, scaling: float) -> torch.Tensor:
    """Dense dW[o, i] = s * M[o // qo, i // pi] / pi [out, in] of a QA-HiRA M [out/qo, in/pi];
    dtype of M."""
    return scaling * m.repeat_interleave(repeat, dim=0).repeat_interleave(pool, dim=1) / pool


def qahira_delta_blocks(m: torch.Tensor, scaling: float, pool: int, repeat: int,
                        block_size: tuple[int, int]) -> torch.Tensor:
    """fp32 [out/bo, in/bi]: the constant dW = s * M[tile] / pi on each quantization block
    [bo, bi], for M [out/qo, in/pi] whose qo x pi tiles contain whole blocks (what an exact
    merge adds to the offsets). Raises AdapterError when qo % bo or pi % bi."""
    bo, bi = block_size
    if repeat % bo or pool % bi:
        from .adapter_format import AdapterError  # lazily: adapter_format sits above this module

        raise AdapterError(f"qahira_delta_blocks: tile {repeat} x {pool} is not a multiple of "
                           f"block {bo} x {bi}")
    m32 = m.to(torch.float32)
    per_block = m32.repeat_interleave(repeat // bo, 0).repeat_interleave(pool // bi, 1)
    return per_block * scaling / pool
