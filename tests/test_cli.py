"""The `qahira` console script: help, `qahira quantize` end to end, argument and layer errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


from support import tiny as tm  # noqa: E402
from qahira_vllm.cli import VERBS, main  # noqa: E402
from qahira_vllm.cli.quantize import parse_block  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "qahira"
# `python -m qahira_vllm.cli` does not work (the package has no __main__.py); this is what the
# console script entry point `qahira_vllm.cli:main` runs.
MAIN = "import sys; from qahira_vllm.cli import main; sys.exit(main())"


def _cli(*args, cwd=None, timeout=180):
    """Run the installed console script if there is one, else `python -m qahira_vllm.cli`."""
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", MAIN]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd + list(args), cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    return {"llama": tm.make_model_dir(root / "llama", "llama", seed=4),
            "llama_nd": tm.make_model_dir(root / "llama_nd", "llama", seed=5, **tm.NON_DIVIDING)}


def test_help_lists_all_verbs():
    for r in (_cli("--help"),
              subprocess.run([sys.executable, "-c", MAIN, "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)):
        assert r.returncode == 0, r.stderr
        for verb in ("quantize", "serve", "models", "train", "merge", "export"):
            assert verb in r.stdout
        assert set(VERBS) <= set(r.stdout.split())


def test_no_args_prints_help(capsys):
    assert main([]) == 0
    assert "quantize" in capsys.readouterr().out


def test_unknown_verb(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_a_module_or_a_clean_error(verb, capsys):
    try:
        module = importlib.import_module(f"qahira_vllm.cli.{verb}")
    except ModuleNotFoundError as e:
        if e.name != f"qahira_vllm.cli.{verb}":
            pytest.skip(f"verb {verb} needs an optional dependency: {e}")
        # listed but not implemented: a clear usage error, not a traceback
        with pytest.raises(SystemExit) as ei:
            main([verb])
        assert ei.value.code == 2
        assert f"verb {verb!r} is not implemented" in capsys.readouterr().err
        return
    assert callable(module.add_arguments) and callable(module.run)


def test_quantize_help_lists_options():
    r = _cli("quantize", "--help")
    assert r.returncode == 0
    for opt in ("--bits", "--block", "--offset-dtype", "--quantizer", "--keep-unconvertible",
                "--skip", "--overwrite", "--device"):
        assert opt in r.stdout


def test_quantize_end_to_end(srcs, tmp_path):
    out = tmp_path / "q"
    r = _cli("quantize", str(srcs["llama"]), str(out), "--bits", "4", "--block", "8x4",
             "--offset-dtype", "float32", "--quantizer", "minmax")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout is exactly the JSON summary
    assert summary["out_dir"] == str(out.resolve())
    assert summary["layers_converted"] == 14 and summary["modules_not_converted"] == []
    assert 0 < summary["relative_weight_error"] < 0.15
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [8, 4]
    assert qc["offset_dtype"] == "float32" and qc["quantizer"] == "minmax"
    sd = tm.load_safetensors_dir(out)
    assert sd["model.layers.0.mlp.down_proj.qweight"].shape == (128, 32)
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (16, 64)


def test_existing_output_is_a_clean_error(srcs, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    rc = main(["quantize", str(srcs["llama"]), str(out), "--block", "8x4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "qahira quantize: error:" in err
    assert "already exists" in err and "--overwrite" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("block", ["3", "1x", "x64", "1x64x2", "ax64", "0x64", "1x-4", ""])
def test_bad_block_is_a_usage_error(block, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["quantize", "m", "o", "--block", block])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "usage: qahira quantize" in err
    assert f"--block {block!r}" in err


def test_bad_block_subprocess():
    r = _cli("quantize", "m", "o", "--block", "3")
    assert r.returncode != 0
    assert "argument --block: --block '3': expected BOxBI" in r.stderr
    assert "Traceback" not in r.stderr


def test_parse_block():
    assert parse_block("1x64") == (1, 64)
    assert parse_block("8X4") == (8, 4)
    assert parse_block(" 2x16 ") == (2, 16)


def test_non_dividing_layer_exits_nonzero_naming_layer(srcs, tmp_path, capsys):
    out = tmp_path / "nd"
    rc = main(["quantize", str(srcs["llama_nd"]), str(out), "--block", "1x64"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "qahira quantize: error: layer 'model.layers.0.mlp.down_proj'" in err
    assert "mlp.down_proj" in err and "[out=128, in=96]" in err
    assert "--keep-unconvertible" in err
    assert not out.exists()
    # and with --keep-unconvertible it succeeds, listing the layers it kept in float
    rc = main(["quantize", str(srcs["llama_nd"]), str(out), "--block", "1x64",
               "--keep-unconvertible"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules_not_converted"] == ["model.layers.0.mlp.down_proj",
                                                "model.layers.1.mlp.down_proj"]


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    rc = main(["quantize", str(tmp_path / "nope.txt"), str(tmp_path / "o")])
    # not a folder and (offline / unknown) not a hub repo either -> FileNotFoundError -> rc 2
    assert rc == 2
    assert "qahira quantize: error:" in capsys.readouterr().err
