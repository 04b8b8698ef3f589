"""qahira-vllm: block-wise INT4/INT8 checkpoints with float offsets, QA-HiRA merges and
multi-adapter Q-BaRA serving for vLLM. See README.md and docs/FORMAT.md."""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Make `AutoModelForCausalLM.from_pretrained(qckpt)` know `quant_method: "qahira"`
    (qahira_vllm.hf_quantizer) without importing transformers here (~5 s): register now if its
    quantizer registry is already imported, else right after it is (a post-import hook on
    `transformers.quantizers.auto`, which every from_pretrained imports)."""
    import sys

    target = "transformers.quantizers.auto"
    if target in sys.modules:
        _load_hf_quantizer()
        return

    class _Loader:
        def __init__(self, loader):
            self._loader = loader

        def __getattr__(self, name):
            return getattr(self._loader, name)

        def create_module(self, spec):
            return self._loader.create_module(spec)

        def exec_module(self, module):
            self._loader.exec_module(module)
            _load_hf_quantizer()

    class _Finder:
        def find_spec(self, fullname, path=None, target_=None):
            if fullname != target:
                return None
            sys.meta_path.remove(self)  # fires once; the other finders locate the module
            import importlib.util

            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, _Finder())


def _load_hf_quantizer() -> None:
    import importlib
    import warnings

    try:  # the module registers itself (once; a partial import is finished by its importer)
        importlib.import_module("qahira_vllm.hf_quantizer")
    except Exception as e:  # never break transformers' own import
        warnings.warn(f"qahira: transformers integration not registered: {e!r}", stacklevel=2)


_register_with_transformers()
