"""Install Q-BaRA LoRA serving into vLLM, without editing vLLM's files. Idempotent and cheap.

Every vLLM symbol used here is a row of vllm_plugin/vllm_api.py, checked against the installed
vLLM before anything is patched. Two hooks, each applied when vLLM imports the module (or at
once if it is already imported), so that plugin registration itself imports nothing heavy:

  vllm.lora.worker_manager (imported by vLLM's model runners before any LoRA layer is built;
  it imports vllm.lora.model_manager, utils and layers, so all LoRA rows can be checked then):
    vllm.lora.utils._all_lora_classes          our layer classes first; they claim only layers
                                               whose quant method is qahira's (from_layer walks
                                               this tuple in order)
    vllm.lora.layers.base_linear._get_lora_device
                                               learns the device of qahira layers whose kernel
                                               replaced qweight (bf16 cpu_int4pack)
    vllm.lora.utils.from_layer_logits_processor (and model_manager's imported name)
                                               builds lora/logits.py's subclass (skips the
                                               vocab-sized LoRA gather while no adapter has
                                               lm_head weights), and accepts an lm_head
                                               converted by `quantize --lm-head`
    WorkerLoRAManager.create_lora_manager      remember the served model folder
    WorkerLoRAManager._load_adapter            our checks (lora/loader.py) run first; QA-HiRA
                                               adapters are built by loader.qahira_lora_model
  vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter
                                               a rejected adapter is answered 400, not 500

On a vLLM outside vllm_api.SUPPORTED_VLLM, or one whose LoRA rows do not match, none of the
LoRA hooks is installed (an error names the symbols) and vLLM's stock LoRA path serves; a changed
stock `_get_logits` only switches the lm_head skip off; a changed serving method leaves vLLM's
500. QAHIRA_NATIVE_LORA=0 in the environment keeps vLLM's stock LoRA layers and logits wrapper
(for comparisons); the other hooks still apply.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys

_applied: set[str] = set()


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.qahira")  # under vLLM's logger so its handlers print it


def _patch_lora_device(base_linear) -> None:
    """qahira kernels may replace qweight by their own buffers (cpu_int4pack does), which
    vLLM's LoRA device lookup does not know: answer for qahira layers, stock otherwise."""
    original = base_linear._get_lora_device

    def _get_lora_device(base_layer):
        if hasattr(base_layer, "qahira_kernel"):
            for t in (*base_layer.parameters(), *base_layer.buffers()):  # cpu_measured: in
                return t.device                                           # child modules
        return original(base_layer)

    base_linear._get_lora_device = _get_lora_device


def _patch_logits_processor(utils, logits_cls) -> None:
    """vLLM's from_layer_logits_processor, building `logits_cls` (lora/logits.py's subclass, or
    vLLM's own class when that is off) and taking dtype and device from the layer itself for an
    lm_head converted by `qahira quantize --lm-head` (qahira's tensors, no `weight`): the same
    steps as the stock function (whose source vllm_api pins). model_manager imports the function
    by name: patch it there too if it is already imported."""
    original = utils.from_layer_logits_processor

    @functools.wraps(original)  # vllm_api's source pin reads the original through it
    def from_layer_logits_processor(layer, lm_head, max_loras, lora_config, model_config=None):
        if hasattr(lm_head, "weight"):
            dtype, device = lm_head.weight.dtype, lm_head.weight.device
        elif hasattr(lm_head, "qahira_kernel"):
            dtype = lm_head.params_dtype
            device = next(t.device for t in (*lm_head.parameters(), *lm_head.buffers()))
        else:
            return original(layer, lm_head, max_loras, lora_config, model_config)
        wrapped = logits_cls(layer, lm_head.embedding_dim, dtype, device,
                             lm_head.get_sharded_to_full_mapping())
        wrapped.create_lora_weights(max_loras, lora_config, model_config)
        return wrapped

    utils.from_layer_logits_processor = from_layer_logits_processor
    manager = sys.modules.get("vllm.lora.model_manager")
    if manager is not None:
        manager.from_layer_logits_processor = from_layer_logits_processor


def _install_lora(worker_manager) -> None:
    """Check the LoRA rows of vllm_api, then install the LoRA hooks (all or none)."""
    from ..vllm_plugin import vllm_api

    decision = vllm_api.lora_decision()
    if not decision.lora:
        problems = vllm_api.check_vllm((vllm_api.LORA,)) if decision.version_ok else []
        _logger().error(
            "qahira: Q-BaRA LoRA serving is OFF, vLLM's stock LoRA serves instead: %s",
            "; ".join(map(str, problems)) if problems else
            f"vLLM {vllm_api.vllm_version()} is outside the supported {vllm_api.SUPPORTED_VLLM}")
        return
    import vllm.lora.layers.base_linear as base_linear
    import vllm.lora.utils as utils
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    from . import layers

    native = os.environ.get("QAHIRA_NATIVE_LORA", "1") != "0"
    logits_cls = LogitsProcessorWithLoRA
    if native and decision.lm_head_skip:
        from .logits import QahiraLogitsProcessorWithLoRA as logits_cls
    elif native:
        _logger().warning(
            "qahira: lm_head LoRA gather skip is off (vLLM's logits path changed): %s",
            "; ".join(map(str, vllm_api.check_vllm((vllm_api.LM_HEAD,)))))
    _patch_lora_device(base_linear)
    _patch_logits_processor(utils, logits_cls)
    if native:
        ours = tuple(c for c in layers.QBARA_LORA_CLASSES if c not in utils._all_lora_classes)
        utils._all_lora_classes = ours + tuple(utils._all_lora_classes)
    else:
        layers.ENABLED = False
    _patch_worker_manager(worker_manager)


def _patch_worker_manager(worker_manager) -> None:
    def remember_model_dir(original):
        def create_lora_manager(self, model, vllm_config):
            self._qahira_model_dir = str(vllm_config.model_config.model)
            return original(self, model, vllm_config)
        return create_lora_manager

    # The LRU subclass (the one vLLM's model runners use) overrides create_lora_manager.
    for cls in (worker_manager.WorkerLoRAManager, worker_manager.LRUCacheWorkerLoRAManager):
        if "create_lora_manager" in cls.__dict__:
            cls.create_lora_manager = remember_model_dir(cls.__dict__["create_lora_manager"])

    cls = worker_manager.WorkerLoRAManager
    original_load = cls._load_adapter

    @functools.wraps(original_load)  # vllm_api's source pin reads the original through it
    def _load_adapter(self, lora_request):
        from .loader import qahira_lora_model, validate_lora_request

        adapter = validate_lora_request(self, lora_request)
        if adapter is not None and adapter.config.adapter_type == "qahira":
            return qahira_lora_model(self, lora_request, adapter)
        return original_load(self, lora_request)

    cls._load_adapter = _load_adapter


def _patch_serving(serving) -> None:
    """Answer a rejected adapter (lora/loader.py's AdapterRejected, recognised by the REJECTED
    prefix of its message: vllm_api's docstring says why text) with 400."""
    from http import HTTPStatus

    from ..vllm_plugin import vllm_api

    problems = vllm_api.check_vllm((vllm_api.HTTP,))
    if not vllm_api.decide(problems, vllm_api.version_supported()).http_400:
        _logger().error("qahira: rejected adapters are answered with vLLM's 500, not 400: %s",
                        "; ".join(map(str, problems))
                        or f"vLLM {vllm_api.vllm_version()} is outside the supported "
                           f"{vllm_api.SUPPORTED_VLLM}")
        return
    cls = serving.OpenAIServingModels
    original = cls.load_lora_adapter

    async def load_lora_adapter(self, request, base_model_name=None):
        from .loader import REJECTED

        result = await original(self, request, base_model_name)
        error = getattr(result, "error", None)
        if error is not None and REJECTED in str(error.message):
            # vLLM answers every engine-side load failure with 500; ours is the client's fault.
            message = str(error.message)
            message = message[message.index(REJECTED):]
            # The multiproc executor appends its own hint after the worker's message.
            message = message.split("', please check the stack trace")[0]
            return serving.create_error_response(
                message=message, err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST)
        return result

    cls.load_lora_adapter = load_lora_adapter


_HOOKS = {
    "vllm.lora.worker_manager": _install_lora,
    "vllm.entrypoints.openai.models.serving": _patch_serving,
}


def _apply(name: str, module) -> None:
    if name not in _applied:
        _applied.add(name)
        _HOOKS[name](module)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then our hook on the fresh module."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, attr):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, attr)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _apply(self._name, module)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _HOOKS or name in _applied:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, name)
        return spec


_finder = _AfterImportFinder()


def install() -> None:
    for name in _HOOKS:
        if name in sys.modules:
            _apply(name, sys.modules[name])
    if _finder not in sys.meta_path and any(n not in _applied for n in _HOOKS):
        sys.meta_path.insert(0, _finder)
