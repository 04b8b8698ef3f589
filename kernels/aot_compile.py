"""Compile the kernels for a CUDA architecture ahead of time, on a machine without a GPU.

    python -m qahira_kernels.aot_compile --arch 90          # every config the dispatch picks
    python -m qahira_kernels.aot_compile --arch 90 --quick  # one per code path (CI)

The interpreter tests check what the kernels compute; this checks that Triton can compile
them to a cubin for real hardware (unsupported ops, layouts, shared memory over the limit),
with the tile configs that choose_config() actually returns. Needs triton's bundled ptxas,
and must run WITHOUT TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from . import blockwise_gemm as bg
from . import qbara as qb

# Max dynamic shared memory per block.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclass
class Compiled:
    name: str
    shared: int
    seconds: float


def _compile(kernel, pointers: dict[str, str], constexprs: dict, arch: int, num_warps: int,
             num_stages: int, name: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = pointers.get(p.name, "i32")   # every other scalar is an int
    t = time.monotonic()
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return Compiled(name, compiled.metadata.shared, time.monotonic() - t)


def gemm_cases(quick: bool):
    """(bits, block, act dtype, offsets dtype, M) -> the config choose_config picks for 4096^2."""
    blocks = [(4, (1, 64)), (4, (8, 4)), (8, (1, 64))] if quick else \
        [(4, (1, 32)), (4, (1, 64)), (4, (1, 128)), (4, (4, 32)), (4, (8, 4)), (4, (2, 16)),
         (8, (1, 64)), (8, (8, 4))]
    ms = [1, 16, 256, 1024] if quick else [1, 16, 32, 64, 128, 256, 1024]
    for bits, block in blocks:
        for m in ms:
            if quick and block != (1, 64) and m not in (1, 256):
                continue
            yield bits, block, torch.bfloat16, torch.float16, m
    yield 4, (1, 64), torch.float16, torch.float32, 16


def compile_all(arch: int, quick: bool) -> list[Compiled]:
    done, out = set(), []
    for bits, block, act, off, m in gemm_cases(quick):
        cfg = bg.choose_config(m, 4096, 4096, block)
        split = cfg.split_k > 1
        consts = dict(BITS=bits, BO=block[0], BI=block[1], BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      SCALE_PER_TILE=bg.uses_scale_per_tile(cfg.block_k, block[1]),
                      WRITE_PARTIAL=split, HAS_BIAS=not split, UPCAST_DOT=False)
        key = (tuple(sorted(consts.items())), act, off, cfg.num_warps, cfg.num_stages)
        if key in done:
            continue
        done.add(key)
        ptrs = {"x_ptr": PTR[act], "qw_ptr": "*i32" if bits == 4 else "*u8", "s_ptr": "*fp16",
                "z_ptr": PTR[off], "bias_ptr": PTR[act],
                "out_ptr": "*fp32" if split else PTR[act]}
        out.append(_compile(bg._fused_gemm_kernel, ptrs, consts, arch, cfg.num_warps,
                            cfg.num_stages, f"fused_gemm {bits}b {block} {str(act)[6:]} M={m} "
                            f"{cfg}"))
    for bits in (4, 8):
        out.append(_compile(
            bg._dequant_kernel, {"qw_ptr": "*i32" if bits == 4 else "*u8", "s_ptr": "*fp16",
                                 "z_ptr": "*fp16", "w_ptr": "*bf16"},
            dict(BITS=bits, BO=8, BI=4, BLOCK_N=64, BLOCK_K=128), arch, 4, 3,
            f"dequant {bits}b"))
    out.append(_compile(bg._splitk_reduce_kernel, {"part_ptr": "*fp32", "bias_ptr": "*bf16",
                                                   "out_ptr": "*bf16"},
                        dict(HAS_BIAS=True, BLOCK=1024), arch, 4, 3, "splitk_reduce"))
    idx = {"order_ptr": "*i32", "start_ptr": "*i32", "count_ptr": "*i32"}
    for act in (torch.bfloat16, torch.float16):
        for t in (1, 64, 4096):
            cfg = qb.choose_config(t, 4096, 128, 8)
            atomic = cfg.split_k > 1
            out.append(_compile(
                qb._qbara_shrink_kernel,
                {"x_ptr": PTR[act], "a_ptr": PTR[act], "h_ptr": "*fp32", "pool_ptr": "*i32",
                 "rank_ptr": "*i32", **idx},
                dict(BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
                     ATOMIC=atomic, UPCAST_DOT=False), arch, cfg.num_warps, 3,
                f"qbara_shrink {str(act)[6:]} T={t} {cfg}"))
            out.append(_compile(
                qb._qbara_expand_kernel,
                {"y_ptr": PTR[act], "h_ptr": "*fp32", "b_ptr": PTR[act], "repeat_ptr": "*i32",
                 "rank_ptr": "*i32", "scaling_ptr": "*fp32", **idx},
                dict(BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
                     UPCAST_DOT=False), arch, cfg.num_warps, 3,
                f"qbara_expand {str(act)[6:]} T={t} {cfg}"))
            if quick:
                break
    for act in (torch.bfloat16, torch.float16, torch.float32):
        for t in (1, 4096):
            cfg = qb.qahira_config(t, 4096, 8, act)
            out.append(_compile(
                qb._qahira_kernel,
                {"y_ptr": PTR[act], "x_ptr": PTR[act], "m_ptr": "*fp32", "m_offset_ptr": "*i64",
                 "pool_ptr": "*i32", "repeat_ptr": "*i32", "on_ptr": "*i32",
                 "scaling_ptr": "*fp32", **idx},
                dict(BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     X_FP32=act == torch.float32, UPCAST_DOT=False), arch, cfg.num_warps, 3,
                f"qahira_apply {str(act)[6:]} T={t} {cfg}"))
            if quick:
                break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="one config per code path")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    limit = SHARED_LIMIT.get(args.arch)
    failures = 0
    for c in compile_all(args.arch, args.quick):
        over = limit is not None and c.shared > limit
        failures += over
        print(f"sm_{args.arch} {c.seconds:5.1f}s shared {c.shared:6d} B"
              f"{'  OVER LIMIT ' + str(limit) if over else ''}  {c.name}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
