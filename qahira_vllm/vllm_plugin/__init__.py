"""vLLM plugin entry point (`vllm.general_plugins`: qahira = qahira_vllm.vllm_plugin:register).

vLLM calls register() in every process it starts, possibly more than once: it must be
idempotent and cheap. It checks the installed vLLM against vllm_api.SYMBOLS (the version, and
the rows whose modules vLLM has already imported: importing more costs seconds; the rest are
checked where they are first used), imports only the config module, which in turn imports the
vLLM quantization base classes that vLLM has already loaded, and installs the Q-BaRA LoRA
hooks (qahira_vllm.lora.install), which patch vLLM's LoRA modules only as vLLM imports them.
"""

_registered = False


def register() -> None:
    """Register the `qahira` quantization method and the Q-BaRA LoRA hooks with vLLM.

    Raises vllm_api.VllmIncompatibleError (naming each symbol and the supported vLLM versions)
    when a symbol the quantization method needs is missing or changed. A vLLM outside
    vllm_api.SUPPORTED_VLLM, or with changed LoRA symbols, gets no LoRA hooks (an error is
    logged; vLLM's stock LoRA serves)."""
    global _registered
    if _registered:
        return
    from . import vllm_api

    # The quantization rows in modules already imported; get_quant_method checks all of them.
    decision = vllm_api.decide(vllm_api.check_vllm((vllm_api.QUANT,), loaded_only=True),
                               vllm_api.version_supported())
    if decision.refuse:
        raise vllm_api.VllmIncompatibleError(decision.refusal())
    from . import config  # noqa: F401  (the decorator registers "qahira" with vLLM)

    if decision.version_ok:
        # Each hook checks its own rows when it applies (lora/install.py).
        from ..lora.install import install as install_qbara_lora

        install_qbara_lora()
    else:
        from vllm.logger import init_logger

        init_logger("vllm.qahira").error(
            "qahira: vLLM %s is outside the supported %s: Q-BaRA LoRA hooks not installed, "
            "vLLM's stock LoRA serves", vllm_api.vllm_version(), vllm_api.SUPPORTED_VLLM)
    _registered = True
