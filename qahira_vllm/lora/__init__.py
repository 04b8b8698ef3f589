"""Native multi-adapter Q-BaRA serving through vLLM's own LoRA API (docs/SERVING_ADAPTERS.md).

ops      pure-torch segment math (pool -> shrink -> expand -> repeat-add per slot segment)
batch    token -> slot segments, computed once per batch from vLLM's punica metadata
layers   vLLM LoRA layer classes for qahira linear layers (compact per-slot buffers, TP shards)
loader   adapter checks run before vLLM's loader (format, fingerprint, shapes, rank, TP fit)
install  the hooks into vLLM, applied by the plugin's register()
"""
