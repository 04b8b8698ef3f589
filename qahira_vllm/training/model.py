"""A transformers model running a qahira checkpoint's own quantized weights, with adapters.

Converted linear layers become QuantLinear (the stored qweight/scales/offsets, dequantized per
call, never re-quantized); everything else (embeddings, norms, biases, lm_head) is loaded as
stored. The base is frozen; adapters are injected on the target modules (never lm_head).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter_format import (Adapter, AdapterConfig, check_qahira_geometry,
                              checkpoint_fingerprint, default_qahira_geometry, load_adapter,
                              matches_targets, peft_compatible_scaling, validate_adapter)
from ..checkpoint import read_quant_config, resolve_model_dir
from ..format import QWEIGHT, QahiraFormatError, QahiraQuantConfig, layer_dims
from .adapters import AdaptedLinear, LoRA, QAHiRA, QBaRA
from .qlinear import QuantLinear

METHODS = ("qbara", "qahira", "lora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
NEVER_ADAPTED = ("lm_head",)


@dataclass(frozen=True)
class AdapterSpec:
    """What to train. Scaling defaults to lora_alpha / lora_r for every method (the paper's
    Q-BaRA convention: r is the LoRA rank it replaces, R = 2r is its stored rank)."""

    method: str = "qbara"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_r: int = 8
    lora_alpha: float = 16.0
    rank: int | None = None       # Q-BaRA's R (default 2 * lora_r); LoRA's r (default lora_r)
    pool: int | None = None       # Q-BaRA p (default 2); QA-HiRA pi (default from block shape)
    repeat: int | None = None     # Q-BaRA q (default 2); QA-HiRA qo (default from block shape)
    scaling: float | None = None  # explicit multiplier; overrides lora_alpha / lora_r
    init: str = "zeros"           # QA-HiRA M init: zeros | kaiming
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @property
    def effective_scaling(self) -> float:
        return float(self.scaling) if self.scaling is not None else self.lora_alpha / self.lora_r


def normalize_targets(targets) -> tuple[str, ...]:
    """'q,k,v' / ['q_proj', ...] -> ('q_proj', 'k_proj', 'v_proj'); refuses lm_head."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",")]
    out = []
    for t in targets:
        t = t.strip()
        if not t:
            continue
        t = SHORT_TARGETS.get(t, t)
        if t in NEVER_ADAPTED or t.endswith(".lm_head"):
            raise ValueError(f"target {t!r}: lm_head is never adapted (it is usually not "
                             "quantized, and vLLM serves lm_head adapters through its own "
                             "vocab-sized LoRA path, not ours)")
        out.append(t)
    if not out:
        raise ValueError("no target modules given")
    return tuple(dict.fromkeys(out))


# ----------------------------------------------------------------------------- base model

def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def load_quantized_model(qckpt: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, cfg): HF causal LM with every converted linear a frozen QuantLinear.

    Loaded through transformers' own `from_pretrained` with qahira's registered quantizer
    (qahira_vllm.hf_quantizer: the one loading path, also what a plain transformers user gets);
    every float tensor in `dtype`, the packed tensors in their stored dtypes. Raises
    QahiraFormatError naming the file, tensor or layer for a checkpoint that does not fit the
    format or the model (including tensors the model lacks or does not get)."""
    from transformers import AutoModelForCausalLM

    from ..hf_quantizer import register

    register()  # no-op once `import qahira_vllm` has hooked it in
    qckpt = resolve_model_dir(qckpt)
    cfg = read_quant_config(qckpt)  # config errors name config.json, before transformers runs
    model, info = AutoModelForCausalLM.from_pretrained(qckpt, dtype=dtype,
                                                       output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(info["mismatched_keys"])
    if missing or unexpected or mismatched:
        raise QahiraFormatError(f"{qckpt}: checkpoint does not match {type(model).__name__}: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                                f"mismatched {mismatched[:5]}")
    model.requires_grad_(False)
    return model.eval(), cfg


def quant_layer_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Name -> (out, in) of every QuantLinear, read from its stored qweight (format.layer_dims,
    as for a checkpoint on disk)."""
    return {n: layer_dims(n, {QWEIGHT: m.qweight}, m.cfg) for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


# ----------------------------------------------------------------------------- adapters

def _targeted_layers(model: nn.Module, targets, cfg: QahiraQuantConfig) -> dict[str, tuple]:
    dims = quant_layer_dims(model)
    chosen = {n: d for n, d in dims.items() if matches_targets(n, targets)}
    float_hits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and matches_targets(n, targets)]
    if float_hits:
        raise ValueError(f"targets {list(targets)} match {float_hits[:3]}, kept in float in this "
                         f"checkpoint (modules_not_converted {list(cfg.modules_not_converted)}): "
                         "adapters go on quantized layers only; narrow the targets")
    if not chosen:
        raise ValueError(f"targets {list(targets)} match no quantized linear layer (e.g. "
                         f"{list(dims)[:3]})")
    return chosen


def _valid_divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_adapter(model: nn.Module, cfg: QahiraQuantConfig, spec: AdapterSpec,
                 base_model_name: str = "", base_fingerprint: str | None = None) -> AdapterConfig:
    """Resolve defaults and check the geometry against the base; no modules are changed."""
    dims = _targeted_layers(model, spec.targets, cfg)
    provenance = {"lora_r": spec.lora_r, "lora_alpha": spec.lora_alpha, "dropout": spec.dropout}
    peft_r = spec.lora_r if spec.method == "qahira" else (
        spec.rank or (spec.lora_r if spec.method == "lora" else 2 * spec.lora_r))
    common = dict(target_modules=spec.targets,
                  scaling=peft_compatible_scaling(spec.effective_scaling, peft_r),
                  base_fingerprint=base_fingerprint, base_model_name_or_path=base_model_name,
                  lora_dropout=spec.dropout)
    if spec.method == "qahira":
        # One tile geometry for every target: with per-layer blocks (format 2) it must hold
        # whole blocks of each.
        block = cfg.block_lcm(dims)
        default_pool, default_repeat = default_qahira_geometry(block, dims)
        pool = spec.pool if spec.pool is not None else default_pool
        repeat = spec.repeat if spec.repeat is not None else default_repeat
        check_qahira_geometry(pool, repeat, block, dims)
        provenance["init"] = spec.init
        return AdapterConfig(adapter_type="qahira", pool=pool, repeat=repeat, rank=None,
                             peft_r=spec.lora_r, provenance=provenance, **common)
    if spec.method == "lora":
        if spec.pool not in (None, 1) or spec.repeat not in (None, 1):
            raise ValueError("lora: pool and repeat are 1 (use --method qbara to pool)")
        return AdapterConfig(adapter_type="lora", rank=spec.rank or spec.lora_r,
                             provenance=provenance, **common)
    pool = spec.pool if spec.pool is not None else 2
    repeat = spec.repeat if spec.repeat is not None else 2
    in_gcd = math.gcd(*[i for _, i in dims.values()])
    out_gcd = math.gcd(*[o for o, _ in dims.values()])
    if in_gcd % pool or out_gcd % repeat:
        raise ValueError(f"qbara: pool p={pool} must divide every target layer's in and repeat "
                         f"q={repeat} every out; valid p: {_valid_divisors(in_gcd)[:10]}, valid "
                         f"q: {_valid_divisors(out_gcd)[:10]}")
    return AdapterConfig(adapter_type="qbara", pool=pool, repeat=repeat,
                         rank=spec.rank or 2 * spec.lora_r, provenance=provenance, **common)


def inject_adapters(model: nn.Module, config: AdapterConfig, init: str = "zeros",
                    dropout: float = 0.0, seed: int | None = None) -> list[str]:
    """Wrap each targeted QuantLinear in AdaptedLinear. Returns the adapted layer names."""
    if seed is not None:
        torch.manual_seed(seed)
    # PEFT's targeting (regex, exclude_modules, layers_to_transform) and per-layer rank/scaling
    names = config.targeted([n for n, m in model.named_modules() if isinstance(m, QuantLinear)])
    for name in names:  # sorted by module order, so initialization is reproducible
        base = model.get_submodule(name)
        i, o, s = base.in_features, base.out_features, config.layer_scaling(name)
        if config.adapter_type == "qbara":
            adapter = QBaRA(i, o, config.rank, config.pool, config.repeat, s, dropout)
        elif config.adapter_type == "qahira":
            adapter = QAHiRA(i, o, config.pool, config.repeat, s, dropout, init=init)
        else:
            adapter = LoRA(i, o, config.layer_rank(name), s, dropout)
        _set_submodule(model, name, AdaptedLinear(base, adapter))
    return names


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_tensors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Layer name -> {kind: tensor} (the compact tensors to save)."""
    return {n: {k: t.detach().to(torch.float32).clone() for k, t in m.adapter.tensors().items()}
            for n, m in adapted_layers(model).items()}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def attach_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Inject a saved adapter into a QuantLinear model (after validating it against the model)."""
    validate_adapter(adapter, quant_layer_dims(model), None)
    names = inject_adapters(model, adapter.config)
    for name in names:
        model.get_submodule(name).adapter.load_tensors(adapter.tensors[name])
    for p in trainable_parameters(model):
        p.requires_grad_(False)


def load_model_with_adapter(qckpt: str | os.PathLike, adapter_dir: str | os.PathLike,
                            dtype: torch.dtype = torch.float32, check_fingerprint: bool = True):
    """The trainer's forward of base + adapter (eval mode, frozen)."""
    adapter = load_adapter(adapter_dir)
    model, cfg = load_quantized_model(qckpt, dtype)
    fingerprint = checkpoint_fingerprint(qckpt) if check_fingerprint else None
    validate_adapter(adapter, quant_layer_dims(model), fingerprint)
    attach_adapter(model, adapter)
    return model.eval()


def build_training_model(qckpt: str | os.PathLike, spec: AdapterSpec,
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         gradient_checkpointing: bool = False):
    """(model, adapter_config): base frozen, fresh adapters trainable."""
    qckpt = resolve_model_dir(qckpt)
    model, cfg = load_quantized_model(qckpt, dtype)
    config = plan_adapter(model, cfg, spec, base_model_name=str(qckpt),
                          base_fingerprint=checkpoint_fingerprint(qckpt))
    inject_adapters(model, config, init=spec.init, dropout=spec.dropout, seed=seed)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen embedding (no input grads needed).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, config


__all__ = ["AdapterSpec", "METHODS", "DEFAULT_TARGETS", "load_quantized_model", "plan_adapter",
           "inject_adapters", "adapter_tensors", "attach_adapter", "load_model_with_adapter",
           "build_training_model", "quant_layer_dims", "trainable_parameters"]
