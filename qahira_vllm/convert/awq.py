"""AWQ (AutoAWQ GEMM layout) -> qahira, exactly, for 4-bit linear layers with zero points.

Layout per quantized linear layer `L` (in -> out features, group size g):

    L.qweight  int32 [in, out / 8]       field j (from bit 4j) of word [i, c] = q[i, 8c + ORDER[j]]
    L.qzeros   int32 [in / g, out / 8]   the same order: z[k, 8c + ORDER[j]]
    L.scales   fp16  [in / g, out]
    L.bias     float [out]               optional, kept as is

    ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  (AutoAWQ's pack order; vLLM's AWQ kernels undo it)
    w[o, i] = scales[i // g, o] * (q[i, o] - z[i // g, o])

The format's math is then GPTQ's (common.zero_point_to_format: s = scale, q' = q, o = -s z,
exact in fp32).
Refused by name: quantization versions other than GEMM (GEMV packs [out, in / 8] in another
order; gemv_fast, marlin and others differ too), bits other than 4, zero_point=false (no
qzeros), scales not exact in float16.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ..format import QahiraFormatError
from . import SourceModel
from .common import check_scales, unpack_int32
from .gptq import expect, layer_decoders, open_source, source_model

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4


def awq_settings(qc: dict, where: str) -> dict:
    """group_size and version of an AWQ quantization config (AutoAWQ's w_bit / q_group_size
    or transformers' bits / group_size); QahiraFormatError naming `where` otherwise."""
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QahiraFormatError(
            f"{where}: AWQ version {qc.get('version')!r} is not converted (only GEMM: qweight "
            "[in, out/8] in AutoAWQ's interleaved order; GEMV and others pack differently)")
    bits = qc.get("w_bit", qc.get("bits"))
    if bits != BITS:
        raise QahiraFormatError(f"{where}: AWQ bits={bits!r} is not converted (GEMM is 4-bit)")
    if not qc.get("zero_point", True):
        raise QahiraFormatError(f"{where}: AWQ zero_point=false is not converted (the GEMM "
                                "layout converted here has qzeros)")
    group = qc.get("q_group_size", qc.get("group_size", -1))
    if not isinstance(group, int) or (group != -1 and group < 1):
        raise QahiraFormatError(f"{where}: AWQ group_size={group!r}: expected -1 or >= 1")
    return {"group_size": group, "version": version}


def awq_layer(t: dict[str, torch.Tensor], st: dict, where: str, name: str = "",
              folder: Path | None = None):
    """(decode, reference, group) of one AWQ GEMM layer's tensors (see gptq.source_model);
    `name` and `folder` name the scales in a scale error."""
    qweight = t.get("qweight")
    if qweight is None or qweight.ndim != 2:
        raise QahiraFormatError(f"{where}: qweight missing or not 2-D")
    n_in, out = qweight.shape[0], qweight.shape[1] * 8
    group = n_in if st["group_size"] == -1 else st["group_size"]
    if n_in % group:
        raise QahiraFormatError(f"{where}: group_size {group} does not divide the {n_in} "
                                "input features (a partial last group has no 1 x g block)")
    expect(qweight, "qweight", torch.int32, (n_in, out // 8), where)
    scales = expect(t.get("scales"), "scales", (torch.float16, torch.bfloat16, torch.float32),
                    (n_in // group, out), where)
    qzeros = expect(t.get("qzeros"), "qzeros", torch.int32, (n_in // group, out // 8), where)
    s = check_scales(scales, f"{name}.scales" if name else "scales", folder)
    z = unpack_int32(qzeros, BITS, 1, order=ORDER)

    decode, reference = layer_decoders(lambda: unpack_int32(qweight, BITS, 1, order=ORDER), s, z,
                                       group, BITS)
    return decode, reference, group


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read an AWQ (GEMM) model folder (config.json with quantization_config quant_method
    "awq", or AutoAWQ's quant_config.json) as a SourceModel (qahira_vllm.convert).

    Every layer is checked before anything is decoded; QahiraFormatError names the folder,
    layer or tensor for what cannot be converted exactly (module docstring)."""
    folder, config, qc, raw, tensors = open_source(src, "awq", ("qweight", "qzeros", "scales"))
    st = awq_settings(qc, f"{folder} quantization config")
    layers, groups = {}, {}
    for name, t in raw.items():
        decode, reference, groups[name] = awq_layer(t, st, f"AWQ layer {name!r} in {folder}",
                                                    name, folder)
        layers[name] = (decode, reference, f"awq gemm g{st['group_size']} {name}")
    provenance = {"source_bits": BITS, "source_group_size": st["group_size"],
                  "source_version": st["version"]}
    with source_model(folder, config, tensors, layers, groups, dtype, [], provenance,
                      progress, "AWQ") as source:
        yield source
