"""qahira-vllm: block-wise INT4/INT8 checkpoints with float offsets, QA-HiRA merges and
multi-adapter Q-BaRA serving for vLLM. See README.md and docs/FORMAT.md."""

__version__ = "0.1.0"
