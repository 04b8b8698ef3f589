"""Tiny GPTQ and AWQ checkpoints written from the published layouts, and decoders that are not ours.

Writers (no qahira_vllm code): GPTQModel's pack semantics (nn_modules/qlinear pack_block:
qweight field j of word [r, o] = q[r * 32/bits + j, o]; qzeros packed the same way along the
output dim; checkpoint_format "gptq" stores the zeros word minus 0x11111111 / 0x01010101
mod 2**32, utils/model.py convert_gptq_v2_to_v1_format_module) and AutoAWQ's GEMM packing
(WQLinear_GEMM.from_linear: qweight [in, out/8], field j of word [i, c] = q[i, 8c + ORDER[j]],
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]). Groups are round-to-nearest per group of the input dim
(the layout is what matters here, not GPTQ's error feedback), with the conventions planted:
zero points 0 and 2**bits - 1, a zero-scale group, a negative-scale group.

Decoders: vLLM's own AWQ Triton dequantizer (awq_triton.py, run by the Triton interpreter:
vLLM's CPU build turns its Triton import off, so `vllm_awq_dequantize` loads that file with the
real triton module), vLLM's CPU WNA16 kernel (`vllm_cpu_wna16_weight`, AVX-512 machines only)
and `gptq_spec_dequant`, a plain reading of the GPTQModel layout.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch

from support import tiny

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_words(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int [R, C] -> int32, 32/bits values per word along `dim`: field j of word k holds
    element k * pf + order[j] (order None: j). Bit arithmetic on uint64, wrapped to int32."""
    pf = 32 // bits
    v = values.numpy().astype(np.uint64)
    if dim == 0:
        v = v.T
    v = v.reshape(v.shape[0], -1, pf)
    words = np.zeros(v.shape[:2], dtype=np.uint64)
    for j in range(pf):
        words |= v[:, :, order[j] if order else j] << np.uint64(j * bits)
    words = words.astype(np.uint32).view(np.int32)
    return torch.from_numpy((words.T if dim == 0 else words).copy())


def v1_constant(bits: int) -> int:
    return sum(1 << (j * bits) for j in range(32 // bits))


def gptq_qzeros(z: torch.Tensor, bits: int, fmt: str) -> torch.Tensor:
    """Zero points int [G, out] -> qzeros int32 [G, out*bits/32] in checkpoint format `fmt`
    ("gptq": every word minus v1_constant mod 2**32, as GPTQModel writes v1; "gptq_v2")."""
    words = pack_words(z, bits, 1)
    if fmt == "gptq_v2":
        return words
    u = (words.numpy().view(np.uint32).astype(np.int64) - v1_constant(bits)) % (1 << 32)
    return torch.from_numpy(u.astype(np.uint32).view(np.int32))


def rtn_groups(w: torch.Tensor, group: int, bits: int, sym: bool, plant: bool = True):
    """w fp32 [out, in] -> (q int64 [in, out], scales fp16 [in/g, out], zeros int64 [in/g, out])
    with w ~ s (q - z) per group of `group` inputs; plant: group 0 of columns 0..3 gets the
    edge cases (zero point 0 and 2**bits - 1 when asym, a zero scale, a negative scale)."""
    qmax = (1 << bits) - 1
    out, n_in = w.shape
    g = w.t().reshape(n_in // group, group, out)                       # [G, g, out]
    if sym:
        s = (g.abs().amax(dim=1) * 2 / qmax).clamp_min(1e-4)
        z = torch.full_like(s, (qmax + 1) // 2, dtype=torch.int64)
    else:
        lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
        s = ((hi - lo) / qmax).clamp_min(1e-4)
        z = torch.round(-lo / s.half().float()).clamp(0, qmax).to(torch.int64)
    s = s.half()
    if plant:
        if not sym:
            z[0, 0], z[0, 1] = 0, qmax
        s[0, 2] = 0.0
        s[0, 3] = -s[0, 3]
    q = torch.round(g / s.float()[:, None, :].where(s[:, None, :] != 0, torch.ones(1))
                    + z[:, None, :]).clamp(0, qmax).to(torch.int64)
    return q.reshape(n_in, out), s, z


def _float_model(arch: str):
    """(folder, state dict) of the tests' tiny float model with a tokenizer (tiny.py)."""
    src = tiny.make_float_model(arch=arch, heads=4, kv_heads=2)
    return src, tiny.load_safetensors_dir(src)


def _write(out: Path, src: Path, sd: dict, quant_config: dict, config_file: str | None) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    if config_file is None:
        config["quantization_config"] = quant_config
    else:  # AutoGPTQ / AutoAWQ's own file beside a plain config.json
        (out / config_file).write_text(json.dumps(quant_config))
    config["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def write_gptq_model(out: Path, bits: int = 4, group_size: int = 32, sym: bool = False,
                     fmt: str = "gptq", arch: str = "llama", config_file: str | None = None,
                     act_order: bool = False) -> Path:
    """A GPTQ checkpoint of the tiny float model: every linear layer but lm_head quantized
    (fp16 scales, int32 g_idx), the rest stored in fp16 as GPTQ tools save it."""
    src, sd = _float_model(arch)
    out_sd = {}
    for name, t in sd.items():
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and t.ndim == 2 and "layers." in name:
            n_in = t.shape[1]
            g = n_in if group_size == -1 else group_size
            q, s, z = rtn_groups(t, g, bits, sym)
            out_sd[f"{layer}.qweight"] = pack_words(q, bits, 0)
            out_sd[f"{layer}.qzeros"] = gptq_qzeros(z, bits, fmt)
            out_sd[f"{layer}.scales"] = s
            g_idx = torch.arange(n_in, dtype=torch.int32) // g
            if act_order:  # a permuted group assignment, as desc_act writes it
                g_idx = g_idx[torch.randperm(n_in, generator=torch.Generator().manual_seed(0))]
            out_sd[f"{layer}.g_idx"] = g_idx
        else:
            out_sd[name] = t.half()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
          "desc_act": act_order, "checkpoint_format": fmt, "static_groups": False,
          "true_sequential": True, "damp_percent": 0.01}
    return _write(out, src, out_sd, qc, config_file)


def write_awq_model(out: Path, group_size: int = 32, arch: str = "llama",
                    config_file: str | None = None, version: str = "gemm") -> Path:
    """An AutoAWQ GEMM checkpoint of the tiny float model (lm_head kept float)."""
    src, sd = _float_model(arch)
    out_sd = {}
    for name, t in sd.items():
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and t.ndim == 2 and "layers." in name:
            q, s, z = rtn_groups(t, t.shape[1] if group_size == -1 else group_size, 4, False)
            out_sd[f"{layer}.qweight"] = pack_words(q, 4, 1, AWQ_ORDER)
            out_sd[f"{layer}.qzeros"] = pack_words(z, 4, 1, AWQ_ORDER)
            out_sd[f"{layer}.scales"] = s
        else:
            out_sd[name] = t.half()
    if config_file is None:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
              "version": version, "modules_to_not_convert": None}
    else:
        qc = {"zero_point": True, "q_group_size": group_size, "w_bit": 4,
              "version": version.upper()}
    return _write(out, src, out_sd, qc, config_file)


# ---- decoders that are not ours ---------------------------------------------------------------

def gptq_spec_dequant(qweight, qzeros, scales, g_idx, bits: int, fmt: str) -> torch.Tensor:
    """fp32 W [out, in] read straight from the GPTQModel layout (numpy, field by field):
    w[o, i] = scales[g_idx[i], o] (q[i, o] - z[g_idx[i], o]), v1 zeros = word + v1_constant."""
    pf, mask = 32 // bits, (1 << bits) - 1
    qw = qweight.numpy().view(np.uint32).astype(np.uint64)
    qz = qzeros.numpy().view(np.uint32).astype(np.uint64)
    if fmt == "gptq":
        qz = (qz + v1_constant(bits)) % (1 << 32)
    n_in, out = qw.shape[0] * pf, scales.shape[1]
    q = np.empty((n_in, out), dtype=np.int64)
    for i in range(n_in):
        q[i] = (qw[i // pf] >> np.uint64((i % pf) * bits)) & np.uint64(mask)
    z = np.empty((qz.shape[0], qz.shape[1] * pf), dtype=np.int64)
    for c in range(z.shape[1]):
        z[:, c] = (qz[:, c // pf] >> np.uint64((c % pf) * bits)) & np.uint64(mask)
    gi = g_idx.numpy().astype(np.int64)
    w = scales.float().numpy()[gi] * (q - z[gi, :out]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(w.T))


def vllm_awq_dequantize(qweight, scales, qzeros) -> torch.Tensor:
    """vLLM's awq_dequantize_triton (awq_triton.py, unchanged) under the Triton interpreter
    (TRITON_INTERPRET=1), fp32 scales so the product is not rounded: W [out, in] fp32."""
    import os

    import triton
    import triton.language as tl
    import vllm.model_executor.layers.quantization as quant

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    shim = types.ModuleType("vllm.triton_utils")  # the real triton instead of the placeholder
    shim.triton, shim.tl = triton, tl
    saved = sys.modules.get("vllm.triton_utils")
    sys.modules["vllm.triton_utils"] = shim
    try:
        spec = importlib.util.spec_from_file_location(
            "vllm_awq_triton_interpreted", Path(quant.__path__[0]) / "awq_triton.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["vllm.triton_utils"]
        else:
            sys.modules["vllm.triton_utils"] = saved
    return mod.awq_dequantize_triton(qweight, scales.float(), qzeros).t().contiguous()


def has_avx512() -> bool:
    """vLLM's CPU WNA16 kernel (cpu_gemm_wna16) is built for AVX-512 on x86."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


def vllm_cpu_wna16_weight(qweight, scales, qzeros, group: int, bits: int = 4) -> torch.Tensor:
    """W [out, in] as vLLM's CPU GPTQ/AWQ kernel computes it (CPUWNA16LinearKernel, the
    kernel vLLM's CPU build serves 4-bit GPTQ with): identity @ W in fp16 activations, so
    each weight comes back rounded once to fp16. qweight packed along the input dim
    (GPTQ), qzeros the true zero points packed along the output dim (GPTQ v2 / vLLM's
    standard form) or None for symmetric (uint4b8: zero 8)."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.scalar_type import scalar_types

    assert bits == 4
    n_in, out = qweight.shape[0] * 8, qweight.shape[1]

    def param(data, **attrs):  # the attributes vLLM's parameters carry (no TP group needed)
        p = torch.nn.Parameter(data.clone(), requires_grad=False)
        for k, v in attrs.items():
            setattr(p, k, v)
        return p

    cfg = MPLinearLayerConfig(
        full_weight_shape=(n_in, out), partition_weight_shape=(n_in, out),
        weight_type=scalar_types.uint4 if qzeros is not None else scalar_types.uint4b8,
        act_type=torch.float16, group_size=group, zero_points=qzeros is not None)
    ok, why = CPUWNA16LinearKernel.can_implement(cfg)
    assert ok, why
    layer = torch.nn.Module()
    layer.register_parameter("qweight", param(qweight, input_dim=0, output_dim=1, packed_dim=0))
    layer.register_parameter("scales", param(scales.half(), input_dim=0, output_dim=1))
    layer.register_parameter("qzeros", None if qzeros is None else
                             param(qzeros, input_dim=0, output_dim=1, packed_dim=1))
    layer.bias = None
    kernel = CPUWNA16LinearKernel(cfg, w_q_param_name="qweight", w_s_param_name="scales",
                                  w_zp_param_name="qzeros")
    kernel.process_weights_after_loading(layer)
    return kernel.apply_weights(layer, torch.eye(n_in, dtype=torch.float16)).t().float()


def reference_state_dict(folder: Path, decode) -> dict[str, torch.Tensor]:
    """HF fp32 state dict of a GPTQ / AWQ folder: every quantized layer's weight from
    `decode(layer tensors dict)`, the rest upcast (exact)."""
    sd = tiny.load_safetensors_dir(folder)
    out = {}
    for name in [n for n in sd if n.endswith(".qweight")]:
        layer = name[: -len(".qweight")]
        t = {s: sd.pop(f"{layer}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")
             if f"{layer}.{s}" in sd}
        out[f"{layer}.weight"] = decode(t)
    out.update({k: v.float() for k, v in sd.items()})
    return out


def reference_model(folder: Path, decode):
    """transformers' model of `folder`'s config (its quantization_config dropped), fp32, with
    the weights of reference_state_dict(folder, decode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(reference_state_dict(folder, decode), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()
