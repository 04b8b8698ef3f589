"""Install Q-BaRA LoRA serving into vLLM, without editing vLLM's files. Idempotent and cheap.

Three hooks, each applied when vLLM imports the module (or at once if it is already imported),
so that plugin registration itself imports nothing heavy:

  vllm.lora.utils._all_lora_classes           our layer classes first; they claim only layers
                                              whose quant method is qahira's (from_layer walks
                                              this tuple in order); and
                                              vllm.lora.layers.base_linear._get_lora_device
                                              learns the device of qahira layers whose kernel
                                              replaced qweight (bf16 cpu_int4pack); and
                                              LogitsProcessorWithLoRA skips its per-token
                                              vocab-sized LoRA gather while no loaded adapter
                                              has lm_head weights (it would add exact zeros);
                                              and from_layer_logits_processor accepts an
                                              lm_head converted by `quantize --lm-head`
  vllm.lora.worker_manager.WorkerLoRAManager  create_lora_manager: remember the served model
                                              folder; _load_adapter: our checks run first
  vllm.entrypoints.openai.models.serving.OpenAIServingModels.load_lora_adapter
                                              a rejected adapter is answered 400, not 500

QAHIRA_NATIVE_LORA=0 in the environment keeps vLLM's stock LoRA layers (for comparisons).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_applied: set[str] = set()


def _patch_lora_device(base_linear) -> None:
    """qahira kernels may replace qweight by their own buffers (cpu_int4pack does), which
    vLLM's LoRA device lookup does not know: answer for qahira layers, stock otherwise."""
    original = base_linear._get_lora_device

    def _get_lora_device(base_layer):
        if hasattr(base_layer, "qahira_kernel"):
            for t in (*base_layer.parameters(recurse=False), *base_layer.buffers(recurse=False)):
                return t.device
        return original(base_layer)

    base_linear._get_lora_device = _get_lora_device


def _patch_logits_lora(logits_processor) -> None:
    """vLLM's lm_head LoRA wrapper runs bgmv shrink + expand over the whole vocabulary for every
    token that has an adapter, even when no adapter has lm_head weights (their slots are zero):
    on CPU, 32 tokens x 49152 x rank of gathers per step (measured: the bulk of the per-step
    cost of the first adapter on SmolLM2). While no slot holds lm_head weights, the logits are
    the base logits exactly, so compute only those; otherwise the stock path runs."""
    cls = logits_processor.LogitsProcessorWithLoRA
    if getattr(cls, "_qahira_patched", False):
        return
    set_lora, reset_lora, get_logits = cls.set_lora, cls.reset_lora, cls._get_logits

    def slots(self) -> set:
        return self.__dict__.setdefault("_qahira_lm_head_slots", set())

    def patched_set_lora(self, index, lora_a, lora_b):
        set_lora(self, index, lora_a, lora_b)
        slots(self).add(index)

    def patched_reset_lora(self, index):
        reset_lora(self, index)
        slots(self).discard(index)

    def patched_get_logits(self, hidden_states, lm_head, embedding_bias=None,
                           skip_gather=False):
        if slots(self) or skip_gather:
            return get_logits(self, hidden_states, lm_head, embedding_bias, skip_gather)
        head = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
        logits = self.base_layer._gather_logits(
            self.base_layer._apply_head(head, hidden_states, embedding_bias))
        if logits is None:
            return None
        if self.sharded_to_full_mapping_gpu is not None:
            logits = logits[:, self.sharded_to_full_mapping_gpu]
        return logits[:, :self.base_layer.vocab_size]

    cls.set_lora, cls.reset_lora = patched_set_lora, patched_reset_lora
    cls._get_logits = patched_get_logits
    cls._qahira_patched = True


def _patch_quantized_head(utils) -> None:
    """vLLM's lm_head LoRA wrapper takes its dtype and device from `lm_head.weight`; a head
    converted by `qahira quantize --lm-head` holds qahira's tensors instead (no `weight`), so
    answer from the layer itself. model_manager imports the function by name: patch it there
    too if it is already imported."""
    original = utils.from_layer_logits_processor

    def from_layer_logits_processor(layer, lm_head, max_loras, lora_config, model_config=None):
        if hasattr(lm_head, "weight") or not hasattr(lm_head, "qahira_kernel"):
            return original(layer, lm_head, max_loras, lora_config, model_config)
        device = next(t.device for t in (*lm_head.parameters(recurse=False),
                                         *lm_head.buffers(recurse=False)))
        wrapped = utils.LogitsProcessorWithLoRA(layer, lm_head.embedding_dim,
                                                lm_head.params_dtype, device,
                                                lm_head.get_sharded_to_full_mapping())
        wrapped.create_lora_weights(max_loras, lora_config, model_config)
        return wrapped

    utils.from_layer_logits_processor = from_layer_logits_processor
    manager = sys.modules.get("vllm.lora.model_manager")
    if manager is not None:
        manager.from_layer_logits_processor = from_layer_logits_processor


def _patch_lora_classes(utils) -> None:
    import vllm.lora.layers.base_linear as base_linear

    from . import layers

    _patch_lora_device(base_linear)
    _patch_quantized_head(utils)

    if os.environ.get("QAHIRA_NATIVE_LORA", "1") == "0":
        layers.ENABLED = False
        return
    import vllm.lora.layers.logits_processor as logits_processor

    _patch_logits_lora(logits_processor)
    ours = tuple(c for c in layers.QBARA_LORA_CLASSES if c not in utils._all_lora_classes)
    utils._all_lora_classes = ours + tuple(utils._all_lora_classes)


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

    def _load_adapter(self, lora_request):
        from .loader import validate_lora_request

        validate_lora_request(self, lora_request)
        return original_load(self, lora_request)

    cls._load_adapter = _load_adapter


def _patch_serving(serving) -> None:
    from http import HTTPStatus

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
    "vllm.lora.utils": _patch_lora_classes,
    "vllm.lora.worker_manager": _patch_worker_manager,
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
