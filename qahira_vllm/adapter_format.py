"""Adapter artifacts (Q-BaRA, QA-HiRA, LoRA), format_version 1: the one place they are defined.

An adapter is a PEFT-style folder:

    adapter_config.json        standard PEFT LoRA fields + a "qahira" section (below)
    adapter_model.safetensors  compact tensors, float32 (float16/bfloat16 also accepted)

Tensors, for each adapted linear layer P (HF module name, e.g. model.layers.0.self_attn.q_proj)
with weight [out, in]:

    qbara   base_model.model.{P}.lora_A.weight   [R, in/p]
            base_model.model.{P}.lora_B.weight   [out/q, R]
            delta(x) = s * R_q(B A P_p(x))       P_p: mean of p adjacent inputs; R_q: repeat
                                                 each output q times (repeat_interleave)
    lora    same names, p = q = 1                delta(x) = s * B A x
    qahira  base_model.model.{P}.qahira_M.weight [out/qo, in/pi]
            delta(x) = s * R_qo(M P_pi(x)),  i.e. dW[o, i] = s * M[o // qo, i // pi] / pi

Scaling. `qahira.scaling` is the exact multiplier `s`, applied once. The PEFT fields are written
so that PEFT's and vLLM's arithmetic (`lora_alpha / r`, no rsLoRA) gives the same number, bit for
bit: `r` is the stored rank (R for qbara, the rank for lora; for qahira any positive int, it only
carries the scaling) and `lora_alpha` is chosen with `lora_alpha / r == scaling` exactly. A loader
uses either `qahira.scaling` or `lora_alpha / r`, never both multiplied. For Q-BaRA the paper's
convention is s = alpha / r_lora with r_lora = R / 2 (the LoRA rank it replaces), so with
alpha = 16, R = 16: s = 2, r = 16, lora_alpha = 32.

Base fingerprint: see `checkpoint_fingerprint`. docs/FORMAT.md section 2 is the prose version.
This module is shared by the trainer, merge/export and the vLLM serving layer: keep it free of
training code and of vLLM imports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir, write_json
from .checkpoint import quantized_layers, read_headers, read_quant_config, resolve_model_dir
from .format import QUANT_TENSOR_SUFFIXES, QahiraFormatError, layer_dims
from .quant_math import describe_non_finite
from .safetensors_io import model_tensors, read_safetensors_header

ADAPTER_FORMAT_VERSION = 1
ADAPTER_TYPES = ("qbara", "qahira", "lora")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR_PREFIX = "base_model.model."
LORA_A, LORA_B, QAHIRA_M = "lora_A", "lora_B", "qahira_M"
TENSOR_KINDS = {"qbara": (LORA_A, LORA_B), "lora": (LORA_A, LORA_B), "qahira": (QAHIRA_M,)}
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FINGERPRINT_PREFIX = "qahira-fp1:sha256:"


class AdapterError(ValueError):
    """An adapter folder, config or tensor does not follow the format or does not fit the base."""


# PEFT LoraConfig fields that change the adapted layer's forward (variants, biases, extra
# trained modules or tokens, changed model structure) and that this project does not serve:
# an adapter setting any of them is refused by name (vLLM's PEFTHelper refuses the same ones).
# Training-only fields (lora_dropout, megatron_config, loftq/eva/corda/lora_ga configs without
# their init) and fan_in_fan_out (only the base weight's layout; A and B are stored the same)
# do not change the served math.
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
                    "target_parameters", "layer_replication", "alora_invocation_tokens",
                    "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
                    "monteclora_config")
# init_lora_weights strings that only initialise A and B (the saved adapter is a plain LoRA);
# "pissa", "olora", "corda", "loftq" change the base weights PEFT loads the adapter onto.
PEFT_INIT_ONLY = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


# ----------------------------------------------------------------------------- config

def peft_alpha_for(scaling: float, r: int) -> float:
    """A lora_alpha with `lora_alpha / r == scaling` exactly in float64 (PEFT's and vLLM's math).

    Not every (scaling, r) has one (e.g. 0.1 with r = 3); `peft_compatible_scaling` picks the
    nearest scaling that does. The paper's convention s = alpha / (R / 2) with lora_alpha =
    2 * alpha always has one.
    """
    alpha = scaling * r
    if alpha / r == scaling:
        return alpha
    # Correctly rounded division is monotone in alpha: try the neighbouring floats.
    for direction in (math.inf, -math.inf):
        a = alpha
        for _ in range(4):
            a = math.nextafter(a, direction)
            if a / r == scaling:
                return a
    raise AdapterError(f"no float lora_alpha gives lora_alpha / {r} == {scaling!r} exactly "
                       "(use peft_compatible_scaling)")


def peft_compatible_scaling(scaling: float, r: int) -> float:
    """`scaling` itself when PEFT's lora_alpha / r can express it exactly, else the float
    within one ulp that can (the adapter is then trained and served with that value)."""
    try:
        peft_alpha_for(scaling, r)
        return scaling
    except AdapterError:
        return (scaling * r) / r


@dataclass(frozen=True)
class AdapterConfig:
    """What `adapter_config.json` says. pool/repeat are p/q (qbara), pi/qo (qahira), 1/1 (lora).

    Which layers are adapted is PEFT's rule (`targeted`, PEFT's own check_target_module_exists):
    target_modules (names, or one regex string fullmatched against the module name),
    exclude_modules, layers_to_transform / layers_pattern. Per-layer rank and scaling
    (`layer_rank`, `layer_scaling`) follow PEFT's LoraModel: rank_pattern / alpha_pattern keys
    matched with PEFT's get_pattern_key (first matching key wins), scaling = alpha / r, or
    alpha / sqrt(r) with use_rslora. Patterns and rsLoRA exist only in plain PEFT LoRAs (no
    qahira section, which holds one exact scaling for every layer); `lora_alpha` then keeps
    PEFT's raw alpha so that alpha / r_layer is PEFT's number bit for bit.
    """

    adapter_type: str
    target_modules: tuple[str, ...] | str  # names, or a regex string (PEFT: re.fullmatch)
    scaling: float                      # the scaling of a layer without a pattern entry
    pool: int = 1
    repeat: int = 1
    rank: int | None = None             # R (qbara) or r (lora); None for qahira
    base_fingerprint: str | None = None
    base_model_name_or_path: str = ""
    peft_r: int | None = None           # r written for PEFT; defaults to rank (or 1 for qahira)
    lora_dropout: float = 0.0           # training-time only; recorded for PEFT
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    format_version: int = ADAPTER_FORMAT_VERSION
    # PEFT's targeting options (None: not used), as PEFT's LoraConfig takes them.
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    # PEFT's per-layer options (plain LoRA only): ((pattern key, value), ...) in file order.
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    lora_alpha: float | None = None     # PEFT's raw lora_alpha (required with patterns/rsLoRA)

    def __post_init__(self) -> None:
        src = "adapter config"
        self._normalise_peft_options(src)
        if self.adapter_type not in ADAPTER_TYPES:
            raise AdapterError(f"{src}: adapter_type={self.adapter_type!r}, expected one of "
                               f"{ADAPTER_TYPES}")
        if self.format_version != ADAPTER_FORMAT_VERSION:
            raise AdapterError(f"{src}: format_version={self.format_version!r}, this build "
                               f"reads {ADAPTER_FORMAT_VERSION}")
        for name in ("pool", "repeat"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AdapterError(f"{src}: {name}={v!r}, expected a positive integer")
        if self.adapter_type == "lora" and (self.pool, self.repeat) != (1, 1):
            raise AdapterError(f"{src}: a 'lora' adapter has pool=repeat=1, got pool="
                               f"{self.pool}, repeat={self.repeat}")
        if self.adapter_type == "qahira":
            if self.rank is not None:
                raise AdapterError(f"{src}: a 'qahira' adapter has no rank (M's shape comes "
                                   f"from pool/repeat), got rank={self.rank!r}")
        elif not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"{src}: rank={self.rank!r}, expected a positive integer for "
                               f"adapter_type {self.adapter_type!r}")
        if (not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool)
                or not math.isfinite(self.scaling)):
            raise AdapterError(f"{src}: scaling={self.scaling!r}, expected a finite number")
        if not self.target_modules:
            raise AdapterError(f"{src}: target_modules is empty")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "scaling", float(self.scaling))
        if self.peft_r is None:
            object.__setattr__(self, "peft_r", self.rank if self.rank is not None else 1)
        if self.adapter_type != "qahira" and self.peft_r != self.rank:
            raise AdapterError(f"{src}: PEFT r={self.peft_r} must equal the stored rank "
                               f"{self.rank} for a {self.adapter_type!r} adapter")
        per_layer = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora") if getattr(self, k)]
        if per_layer and self.adapter_type != "lora":
            raise AdapterError(f"{src}: {per_layer} exist only in plain PEFT LoRAs; a "
                               f"{self.adapter_type!r} adapter has one scaling for all layers")
        if per_layer and self.lora_alpha is None:
            raise AdapterError(f"{src}: {per_layer} need PEFT's raw lora_alpha (lora_alpha=...)")
        if self.lora_alpha is not None:
            if (not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool)
                    or not math.isfinite(self.lora_alpha)):
                raise AdapterError(f"{src}: lora_alpha={self.lora_alpha!r}, expected a finite "
                                   "number")
            if self._peft_scaling(self.peft_r, self.lora_alpha) != self.scaling:
                raise AdapterError(
                    f"{src}: scaling={self.scaling!r} is not PEFT's "
                    f"{'lora_alpha / sqrt(r)' if self.use_rslora else 'lora_alpha / r'} = "
                    f"{self._peft_scaling(self.peft_r, self.lora_alpha)!r} (lora_alpha="
                    f"{self.lora_alpha!r}, r={self.peft_r})")

    def _normalise_peft_options(self, src: str) -> None:
        """PEFT's option values (lists, dicts) -> hashable tuples; empty -> unused, as in PEFT."""
        def names(key):
            v = getattr(self, key)
            if v is None or isinstance(v, str):
                return v or None
            if not all(isinstance(x, str) for x in v):
                raise AdapterError(f"{src}: {key}={v!r}, expected a string or a list of strings")
            return tuple(v) or None

        object.__setattr__(self, "exclude_modules", names("exclude_modules"))
        object.__setattr__(self, "layers_pattern", names("layers_pattern"))
        layers = self.layers_to_transform
        if layers is not None and not isinstance(layers, int):
            layers = tuple(layers) or None
        for i in ((layers,) if isinstance(layers, int) else layers or ()):
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise AdapterError(f"{src}: layers_to_transform={self.layers_to_transform!r}, "
                                   "expected a layer index or a list of layer indices")
        object.__setattr__(self, "layers_to_transform", layers)
        for key, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            items = getattr(self, key)
            items = tuple((items or {}).items() if isinstance(items, dict) else items or ())
            for pattern, v in items:
                bad = (not isinstance(v, int) or v < 1) if kind == "rank" else \
                    not (isinstance(v, (int, float)) and math.isfinite(v))
                if not isinstance(pattern, str) or isinstance(v, bool) or bad:
                    raise AdapterError(f"{src}: {key}[{pattern!r}]={v!r}, expected a "
                                       + ("positive integer" if kind == "rank" else "number"))
            object.__setattr__(self, key, items)
        if not isinstance(self.use_rslora, bool):
            raise AdapterError(f"{src}: use_rslora={self.use_rslora!r}, expected true or false")

    def _peft_scaling(self, r: int, alpha: float) -> float:
        """PEFT's LoraLayer.update_layer: alpha / sqrt(r) with rsLoRA, else alpha / r."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def has_layer_patterns(self) -> bool:
        """True when rank or scaling can differ between layers (rank_pattern / alpha_pattern)."""
        return bool(self.rank_pattern or self.alpha_pattern)

    def _pattern_value(self, pattern: tuple, module: str):
        """PEFT's lookup (LoraModel._create_and_replace): get_pattern_key, first key wins."""
        if not pattern:
            return None
        from peft.utils.other import get_pattern_key  # lazily: PEFT is heavy to import

        values = dict(pattern)
        return values.get(get_pattern_key(list(values), module))

    def layer_rank(self, module: str) -> int | None:
        """The rank PEFT gives layer `module` (HF name): rank_pattern, else r. None for qahira."""
        r = self._pattern_value(self.rank_pattern, module)
        return self.rank if r is None else r

    def layer_scaling(self, module: str) -> float:
        """The multiplier PEFT applies to layer `module`'s B A x: alpha_l / r_l (or
        alpha_l / sqrt(r_l) with rsLoRA) with alpha_l, r_l from the patterns; else `scaling`."""
        if not self.has_layer_patterns:
            return self.scaling
        alpha = self._pattern_value(self.alpha_pattern, module)
        return self._peft_scaling(self.layer_rank(module),
                                  self.lora_alpha if alpha is None else alpha)

    def peft_lora_config(self, layer_names=()):
        """PEFT's LoraConfig holding this adapter's targeting options (PEFT validates them:
        e.g. layers_pattern needs layers_to_transform, a regex excludes layers_to_transform).
        `layer_names`: the base's adaptable layers, to expand PEFT's "all-linear" the way
        PEFT does (every linear layer's last name component; lm_head is never in them).
        Raises AdapterError where PEFT would refuse the config."""
        import warnings

        from peft import LoraConfig
        from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

        def as_list(v):
            return list(v) if isinstance(v, tuple) else v

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = LoraConfig(
                    r=self.peft_r, lora_alpha=self.peft_lora_alpha,
                    target_modules=as_list(self.target_modules),
                    exclude_modules=as_list(self.exclude_modules),
                    layers_to_transform=as_list(self.layers_to_transform),
                    layers_pattern=as_list(self.layers_pattern),
                    rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
                    use_rslora=self.use_rslora)
        except (ValueError, TypeError) as e:
            raise AdapterError(f"PEFT refuses this adapter's LoraConfig: {e}") from None
        if (isinstance(self.target_modules, str)
                and self.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
            # = peft.tuners.tuners_utils._maybe_include_all_linear_layers on the base's layers
            config.target_modules = {m.rpartition(".")[2] for m in layer_names} - {"lm_head"}
        return config

    def targeted(self, layer_names) -> list[str]:
        """The names in `layer_names` that PEFT adapts, in their order: PEFT's own
        check_target_module_exists (target_modules list or regex, exclude_modules,
        layers_to_transform / layers_pattern). Raises AdapterError where PEFT would refuse."""
        from peft.tuners.tuners_utils import check_target_module_exists

        layer_names = list(layer_names)
        config = self.peft_lora_config(layer_names)
        return [m for m in layer_names if check_target_module_exists(config, m)]

    @property
    def peft_lora_alpha(self) -> float:
        """lora_alpha with lora_alpha / peft_r == scaling exactly (raises if none exists);
        PEFT's raw lora_alpha where the config was read from a plain PEFT LoRA."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        try:
            return peft_alpha_for(self.scaling, self.peft_r)
        except AdapterError:
            raise AdapterError(
                f"scaling={self.scaling!r} is not exactly lora_alpha / r for any float "
                f"lora_alpha with r={self.peft_r}; use peft_compatible_scaling(scaling, r) = "
                f"{peft_compatible_scaling(self.scaling, self.peft_r)!r}") from None

    def to_json_dict(self, include_qahira: bool = True) -> dict[str, Any]:
        """adapter_config.json content; include_qahira=False gives a plain PEFT LoRA config
        (no unknown key for PEFT to warn about), valid only for adapter_type 'lora'."""
        qahira = {"adapter_type": self.adapter_type, "format_version": self.format_version,
                  "pool": self.pool, "repeat": self.repeat, "rank": self.rank,
                  "scaling": self.scaling, "base_fingerprint": self.base_fingerprint}
        if self.provenance:
            qahira["provenance"] = self.provenance
        if not include_qahira and self.adapter_type != "lora":
            raise AdapterError(f"a {self.adapter_type!r} adapter needs its qahira section "
                               "(pool/repeat change the tensor shapes)")
        if include_qahira and (self.has_layer_patterns or self.use_rslora):
            raise AdapterError("a qahira section holds one scaling for all layers: a LoRA with "
                               "rank_pattern / alpha_pattern / use_rslora is written as a plain "
                               "PEFT config (include_qahira=False)")
        targets = self.target_modules
        peft = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM",
            "r": self.peft_r, "lora_alpha": self.peft_lora_alpha,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "lora_dropout": self.lora_dropout,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": self.use_rslora,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            "base_model_name_or_path": self.base_model_name_or_path, "inference_mode": True,
        }
        for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            v = getattr(self, key)
            if v is not None:
                peft[key] = list(v) if isinstance(v, tuple) else v
        if self.has_layer_patterns:
            peft["rank_pattern"] = dict(self.rank_pattern)
            peft["alpha_pattern"] = dict(self.alpha_pattern)
        return {**peft, "qahira": qahira} if include_qahira else peft

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], source: str = CONFIG_NAME) -> "AdapterConfig":
        if not isinstance(d, dict):
            raise AdapterError(f"{source}: expected a JSON object")
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: peft_type={d.get('peft_type')!r}, expected 'LORA'")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                raise AdapterError(f"{source}: missing required field {key!r}")
        unsupported = [k for k in PEFT_UNSUPPORTED if d.get(k)]
        if d.get("bias", "none") != "none":
            unsupported.append(f"bias={d['bias']!r}")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in PEFT_INIT_ONLY:
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise AdapterError(
                f"{source}: unsupported PEFT features {unsupported}: they change the layer's "
                "forward (or, for init_lora_weights, the base weights PEFT loads the adapter "
                "onto), which this server does not implement; expected a LoRA delta "
                "s * B A x on the unchanged base (no DoRA, bias, modules_to_save, variants)")
        targets = d["target_modules"]
        if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{source}: target_modules={targets!r}, expected a list of "
                               "module names or one regex string")
        r, alpha = d["r"], d["lora_alpha"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(f"{source}: r={r!r}, expected a positive integer")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise AdapterError(f"{source}: lora_alpha={alpha!r}, expected a number")
        peft_scaling = alpha / math.sqrt(r) if d.get("use_rslora") else alpha / r
        common = dict(target_modules=targets if isinstance(targets, str) else tuple(targets),
                      peft_r=r, base_model_name_or_path=d.get("base_model_name_or_path") or "",
                      lora_dropout=float(d.get("lora_dropout") or 0.0),
                      **{k: d.get(k) for k in ("exclude_modules", "layers_to_transform",
                                               "layers_pattern")})
        q = d.get("qahira")
        if q is None:  # a plain PEFT LoRA from elsewhere: scaling from PEFT's own rule
            try:
                return cls(adapter_type="lora", scaling=peft_scaling, rank=r, lora_alpha=alpha,
                           use_rslora=bool(d.get("use_rslora")),
                           rank_pattern=d.get("rank_pattern") or {},
                           alpha_pattern=d.get("alpha_pattern") or {}, **common)
            except AdapterError as e:
                raise AdapterError(str(e).replace("adapter config", source, 1)) from None
        per_layer = [k for k in ("rank_pattern", "alpha_pattern") if d.get(k)]
        if per_layer:
            raise AdapterError(f"{source}: {per_layer} contradict qahira.scaling (one scaling "
                               "and one rank for every layer)")
        if not isinstance(q, dict):
            raise AdapterError(f"{source}: 'qahira' must be an object")
        missing = [k for k in ("adapter_type", "format_version", "scaling") if k not in q]
        if missing:
            raise AdapterError(f"{source}: qahira section misses {missing}")
        if q["adapter_type"] not in ADAPTER_TYPES:
            raise AdapterError(f"{source}: qahira.adapter_type={q['adapter_type']!r}, expected "
                               f"one of {ADAPTER_TYPES}")
        if q["format_version"] != ADAPTER_FORMAT_VERSION:
            raise AdapterError(f"{source}: qahira.format_version={q['format_version']!r}, this "
                               f"build reads {ADAPTER_FORMAT_VERSION}")
        if d.get("use_rslora"):
            raise AdapterError(f"{source}: use_rslora=true contradicts qahira.scaling (PEFT "
                               "would compute lora_alpha / sqrt(r))")
        scaling = q["scaling"]
        if (not isinstance(scaling, (int, float)) or isinstance(scaling, bool)
                or not math.isfinite(scaling)):
            raise AdapterError(f"{source}: qahira.scaling={scaling!r}, expected a finite number")
        if not math.isclose(peft_scaling, scaling,
                                                                  rel_tol=1e-12, abs_tol=0.0):
            raise AdapterError(
                f"{source}: lora_alpha / r = {alpha} / {r} = {peft_scaling!r} but "
                f"qahira.scaling = {scaling!r}: a PEFT loader and a qahira loader would apply "
                "different scalings; expected lora_alpha / r == qahira.scaling")
        try:
            return cls(adapter_type=q["adapter_type"], scaling=scaling,
                       pool=q.get("pool", 1), repeat=q.get("repeat", 1), rank=q.get("rank"),
                       base_fingerprint=q.get("base_fingerprint"),
                       provenance=q.get("provenance") or {}, format_version=q["format_version"],
                       **common)
        except AdapterError as e:
            raise AdapterError(str(e).replace("adapter config", source, 1)) from None


# ----------------------------------------------------------------------------- tensors

def tensor_name(module: str, kind: str) -> str:
    return f"{TENSOR_PREFIX}{module}.{kind}.weight"


def parse_tensor_name(name: str) -> tuple[str, str] | None:
    """'base_model.model.{P}.{kind}.weight' -> (P, kind); None if it is not an adapter tensor."""
    if not name.startswith(TENSOR_PREFIX) or not name.endswith(".weight"):
        return None
    stem = name[len(TENSOR_PREFIX):-len(".weight")]
    module, _, kind = stem.rpartition(".")
    if kind not in (LORA_A, LORA_B, QAHIRA_M) or not module:
        return None
    return module, kind


def expected_shapes(cfg: AdapterConfig, out_features: int, in_features: int,
                    module: str | None = None) -> dict[str, tuple[int, int]]:
    """Compact shape of each tensor of one layer with weight [out, in]; `module` (its HF
    name) selects its rank_pattern rank, else the config's rank."""
    if cfg.adapter_type == "qahira":
        return {QAHIRA_M: (out_features // cfg.repeat, in_features // cfg.pool)}
    rank = cfg.rank if module is None else cfg.layer_rank(module)
    return {LORA_A: (rank, in_features // cfg.pool),
            LORA_B: (out_features // cfg.repeat, rank)}


def matches_targets(module: str, targets) -> bool:
    """PEFT's rule for a list of target_modules alone: the full name or a '.'-suffix. An
    adapter config's full rule (regex, exclude_modules, layers_to_transform) is
    `AdapterConfig.targeted`."""
    if isinstance(targets, str):
        raise TypeError("matches_targets takes a list of names; use AdapterConfig.targeted "
                        "for a regex target_modules")
    return any(module == t or module.endswith("." + t) for t in targets)


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict[str, dict[str, torch.Tensor]]  # layer P -> {kind: tensor}
    path: Path | None = None

    @property
    def weights_file(self) -> str:
        return str(self.path / WEIGHTS_NAME) if self.path else WEIGHTS_NAME


def load_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read an adapter folder (config + tensors), checking everything that needs no base."""
    from safetensors.torch import load_file

    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    cfg_path = path / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{cfg_path} not found: expected an adapter folder with "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e})") from None
    config = AdapterConfig.from_json_dict(raw, source=str(cfg_path))
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise AdapterError(f"{weights} not found (adapter tensors; .bin files are not read)")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    kinds = TENSOR_KINDS[config.adapter_type]
    try:  # git-lfs pointer, bad header length, non-JSON header, truncated data: named here
        read_safetensors_header(weights)
    except QahiraFormatError as e:
        raise AdapterError(f"not a readable safetensors file: {e}") from None
    try:
        stored = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    for name, t in stored.items():
        parsed = parse_tensor_name(name)
        if parsed is None or parsed[1] not in kinds:
            expected = " / ".join(f"{TENSOR_PREFIX}{{P}}.{k}.weight" for k in kinds)
            raise AdapterError(f"{weights}: unexpected tensor {name!r} in a "
                               f"{config.adapter_type!r} adapter: expected {expected}")
        tensors.setdefault(parsed[0], {})[parsed[1]] = t
    if not tensors:
        raise AdapterError(f"{weights}: no adapter tensors")
    return Adapter(config=config, tensors=tensors, path=path)


def save_adapter(out_dir: str | os.PathLike, config: AdapterConfig,
                 tensors: dict[str, dict[str, torch.Tensor]], overwrite: bool = False,
                 extra_files: dict[str, str | bytes] | None = None,
                 include_qahira: bool = True) -> Path:
    """Write config + tensors atomically. Returns the folder.

    include_qahira=False writes a plain PEFT LoRA config (for 'lora' adapters meant for other
    tools); load_adapter then reads it as a LoRA with scaling lora_alpha / r and no fingerprint.
    """
    from safetensors.torch import save_file

    kinds = TENSOR_KINDS[config.adapter_type]
    flat = {}
    for module, group in sorted(tensors.items()):
        for kind, t in group.items():
            if kind not in kinds:
                raise AdapterError(f"save_adapter: {kind!r} is not a tensor of a "
                                   f"{config.adapter_type!r} adapter (expected {kinds})")
            flat[tensor_name(module, kind)] = t.detach().to("cpu").contiguous()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config.to_json_dict(include_qahira))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return Path(out_dir).resolve()


# ----------------------------------------------------------------------------- base checks

def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identity of a qahira checkpoint's quantized weights, cheap and deterministic.

    sha256 over: a version tag; the canonical JSON of the format fields of quantization_config
    (bits, block_size, offset_dtype, modules_not_converted, and format 2's scale_dtype and
    layers: not provenance); then, in sorted
    tensor-name order, each tensor's name, dtype and shape, plus the raw stored bytes of every
    qweight / scales / offsets tensor (other tensors: header only). Independent of sharding and
    of file names; reads ~bits/8 bytes per weight (about 75 MB for a 135M model at INT4).
    A merge changes offsets, so a merged checkpoint has a new fingerprint.
    """
    model_dir = resolve_model_dir(model_dir)
    cfg = read_quant_config(model_dir)
    h = hashlib.sha256(b"qahira-fingerprint-v1\0")
    core = {"bits": cfg.bits, "block_size": list(cfg.block_size),
            "offset_dtype": cfg.offset_dtype,
            "modules_not_converted": sorted(cfg.modules_not_converted)}
    if cfg.format_version == 2:  # only then: format-1 fingerprints stay as they were
        v2 = cfg.to_dict()
        core.update(scale_dtype=v2["scale_dtype"], layers=v2.get("layers", {}))
    h.update(json.dumps(core, sort_keys=True).encode())
    # The model's files and checked headers (safetensors_io): the same tensors vLLM serves.
    for name, e in sorted(model_tensors(model_dir).items()):
        h.update(f"\0{name}\0{e.dtype}\0{list(e.shape)}\0".encode())
        if name.rpartition(".")[2] in QUANT_TENSOR_SUFFIXES:
            f = e.file
            with open(f, "rb") as fh:
                fh.seek(e.data_start)
                remaining = e.nbytes
                while remaining:
                    chunk = fh.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise AdapterError(f"{f}: truncated data for tensor {name!r}")
                    h.update(chunk)
                    remaining -= len(chunk)
    return FINGERPRINT_PREFIX + h.hexdigest()


def base_layer_dims(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Adaptable layer name -> (out, in) of a qahira checkpoint (headers only): its quantized
    linear layers except lm_head, which a `--lm-head` checkpoint converts too but adapters never
    target (vLLM serves lm_head adapters through its own full-width path, not ours)."""
    model_dir = resolve_model_dir(model_dir)
    cfg = read_quant_config(model_dir)
    return {layer: layer_dims(layer, tensors, cfg)
            for layer, tensors in sorted(quantized_layers(read_headers(model_dir)).items())
            if not (layer == "lm_head" or layer.endswith(".lm_head"))}


def validate_adapter(adapter: Adapter, layer_dims: dict[str, tuple[int, int]],
                     base_fingerprint: str | None, max_rank: int | None = None,
                     require_fingerprint: bool = False) -> None:
    """Check an adapter against a base; raise AdapterError naming file/tensor/layer.

    layer_dims: the base's adaptable layers, HF module name -> (out, in) (`base_layer_dims`).
    base_fingerprint: `checkpoint_fingerprint(base)`; None skips the check. An adapter without a
    recorded fingerprint (a plain PEFT LoRA) passes unless require_fingerprint.
    """
    cfg, where = adapter.config, adapter.weights_file
    if base_fingerprint is not None:
        if cfg.base_fingerprint is None:
            if require_fingerprint:
                raise AdapterError(f"{adapter.path}: adapter records no base fingerprint; "
                                   f"expected qahira.base_fingerprint = {base_fingerprint}")
        elif cfg.base_fingerprint != base_fingerprint:
            raise AdapterError(
                f"{adapter.path}: adapter was trained on a base with fingerprint "
                f"{cfg.base_fingerprint}, this base has {base_fingerprint}: its quantized "
                "weights differ (another model, quantization or an already merged checkpoint)")
    for module in sorted(adapter.tensors):
        if module not in layer_dims:
            some = ", ".join(list(layer_dims)[:3])
            raise AdapterError(
                f"{where}: tensor {tensor_name(module, next(iter(adapter.tensors[module])))!r} "
                f"targets layer {module!r}, which is not a quantized linear layer of the base "
                f"(e.g. {some}, ...)")
    try:  # exactly the layers PEFT adapts (its own matching function)
        targeted = cfg.targeted(layer_dims)
    except AdapterError as e:
        raise AdapterError(f"{adapter.path}: {e}") from None
    if not targeted:
        raise AdapterError(f"{adapter.path}: {_targeting(cfg)} match no quantized linear layer "
                           "of the base")
    if max_rank is not None and cfg.rank is not None:
        rank, module = max((cfg.layer_rank(m), m) for m in targeted)
        if rank > max_rank:
            where_rank = f" (layer {module!r}, rank_pattern)" if rank != cfg.rank else ""
            raise AdapterError(f"{adapter.path}: rank {rank}{where_rank} is above the maximum "
                               f"{max_rank} (raise max rank or use a smaller adapter)")
    for module in targeted:
        out_f, in_f = layer_dims[module]
        problems = []
        if in_f % cfg.pool:
            problems.append(f"pool={cfg.pool} does not divide in={in_f}")
        if out_f % cfg.repeat:
            problems.append(f"repeat={cfg.repeat} does not divide out={out_f}")
        if problems:
            raise AdapterError(f"{adapter.path}: layer {module!r} [out={out_f}, in={in_f}]: "
                               + "; ".join(problems))
        group = adapter.tensors.get(module, {})
        for kind, shape in expected_shapes(cfg, out_f, in_f, module).items():
            name = tensor_name(module, kind)
            t = group.get(kind)
            if t is None:
                raise AdapterError(f"{where}: missing tensor {name!r}: expected {list(shape)} "
                                   f"for layer {module!r} [out={out_f}, in={in_f}], which "
                                   f"PEFT adapts by {_targeting(cfg)}")
            if tuple(t.shape) != shape:
                raise AdapterError(
                    f"{where}: tensor {name!r} has shape {list(t.shape)}: expected {list(shape)} "
                    f"({cfg.adapter_type}, pool={cfg.pool}, repeat={cfg.repeat}, rank="
                    f"{cfg.layer_rank(module)}, layer [out={out_f}, in={in_f}])")
            if t.dtype not in ACCEPTED_DTYPES:
                raise AdapterError(f"{where}: tensor {name!r} is {t.dtype}: expected one of "
                                   f"{[str(d) for d in ACCEPTED_DTYPES]}")
            bad = describe_non_finite(t)
            if bad:
                raise AdapterError(f"{where}: tensor {name!r} holds {bad}: expected finite "
                                   "weights")
    untargeted = sorted(set(adapter.tensors) - set(targeted))
    if untargeted:
        raise AdapterError(f"{where}: layers {untargeted[:3]} have tensors but PEFT does not "
                           f"adapt them by {_targeting(cfg)}")


def _targeting(cfg: AdapterConfig) -> str:
    """The config's targeting options, for messages."""
    t = cfg.target_modules
    parts = [f"target_modules {t!r}" if isinstance(t, str) else f"target_modules {list(t)}"]
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        v = getattr(cfg, key)
        if v is not None:
            parts.append(f"{key} {list(v) if isinstance(v, tuple) else v!r}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- QA-HiRA geometry

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_qahira_geometry(block_size: tuple[int, int],
                          dims: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(valid pools pi, valid repeats qo): pi % bi == 0 and pi divides every in;
    qo % bo == 0 and qo divides every out."""
    bo, bi = block_size
    in_gcd = math.gcd(*[i for _, i in dims])
    out_gcd = math.gcd(*[o for o, _ in dims])
    return ([d for d in _divisors(in_gcd) if d % bi == 0],
            [d for d in _divisors(out_gcd) if d % bo == 0])


def check_qahira_geometry(pool: int, repeat: int, block_size: tuple[int, int],
                          dims: dict[str, tuple[int, int]], source: str = "QA-HiRA") -> None:
    """Every quantization block must lie in one qo x pi tile, and tiles must divide every layer."""
    bo, bi = block_size
    pools, repeats = valid_qahira_geometry(block_size, list(dims.values()))
    if pool in pools and repeat in repeats:
        return
    why = []
    if pool % bi:
        why.append(f"pool pi={pool} is not a multiple of the block's bi={bi}")
    if repeat % bo:
        why.append(f"repeat qo={repeat} is not a multiple of the block's bo={bo}")
    for name, (out_f, in_f) in dims.items():
        if in_f % pool or out_f % repeat:
            why.append(f"layer {name!r} [out={out_f}, in={in_f}] is not tiled by {repeat} x {pool}")
            break
    raise AdapterError(
        f"{source}: geometry pool={pool}, repeat={repeat} does not fit the base's quantization "
        f"block [bo={bo}, bi={bi}] ({'; '.join(why)}). Every block must lie inside one qo x pi "
        f"tile (qo % bo == 0, pi % bi == 0) for an exact merge. Valid pool (pi): "
        f"{pools[:8] or 'none'}; valid repeat (qo): {repeats[:8] or 'none'}")


def default_qahira_geometry(block_size: tuple[int, int], dims: dict[str, tuple[int, int]],
                            paper_pool: int = 4, paper_repeat: int = 8) -> tuple[int, int]:
    """Paper's (pi=4, qo=8) when it fits the blocks, else the smallest valid sizes >= those."""
    pools, repeats = valid_qahira_geometry(block_size, list(dims.values()))
    if not pools or not repeats:
        raise AdapterError(
            f"QA-HiRA: no tile geometry fits block {list(block_size)} for layers of in-gcd / "
            f"out-gcd {math.gcd(*[i for _, i in dims.values()])} / "
            f"{math.gcd(*[o for o, _ in dims.values()])}")

    def pick(valid, want):
        at_least = [v for v in valid if v >= want]
        return at_least[0] if at_least else valid[-1]

    return pick(pools, paper_pool), pick(repeats, paper_repeat)

