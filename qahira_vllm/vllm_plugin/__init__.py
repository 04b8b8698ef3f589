"""vLLM plugin entry point (`vllm.general_plugins`: qahira = qahira_vllm.vllm_plugin:register).

vLLM calls register() in every process it starts, possibly more than once: it must be
idempotent and cheap. It imports only the config module, which in turn imports the vLLM
quantization base classes that vLLM has already loaded, and installs the Q-BaRA LoRA
hooks (qahira_vllm.lora.install), which patch vLLM's LoRA modules only as vLLM imports them.
"""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from . import config  # noqa: F401  (the decorator registers "qahira" with vLLM)
    from ..lora.install import install as install_qbara_lora

    install_qbara_lora()

    _registered = True
