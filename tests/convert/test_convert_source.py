"""`qahira convert` takes a hub repo id as SRC: huggingface_hub resolves it from its cache, offline.

The cache is laid out as huggingface_hub documents it (models--OWNER--NAME/refs/main and
snapshots/COMMIT/), filled with a GPTQ folder, and the CLI runs in a child process with
HF_HUB_CACHE pointing there and HF_HUB_OFFLINE=1, as a user without network would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from support.convert_checks import stored_dequant
from support.gptq_files import write_gptq_model

from qahira_vllm.convert import resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path, repo_id: str):
    src = write_gptq_model(tmp_path / "gptq", bits=4, group_size=32)
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return src, cache


def _cli(args, env_extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "qahira_vllm.cli", "convert", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_repo_id_from_the_offline_cache_converts_like_the_folder(tmp_path):
    src, cache = _hub_cache(tmp_path, "someone/tiny-gptq")
    out = tmp_path / "from-hub"
    proc = _cli(["someone/tiny-gptq", str(out), "--verify", "--no-progress"],
                {"HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["source_format"] == "gptq" and summary["verify_worst"] == 0.0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["source_model"] == "someone/tiny-gptq"   # the id, not the cache path
    from qahira_vllm.convert import convert

    convert(src, tmp_path / "from-folder", progress=False)
    _, ours, _ = stored_dequant(out)
    _, theirs, _ = stored_dequant(tmp_path / "from-folder")
    assert len(ours) == 14 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unknown_repo_id_offline_is_a_clear_error(tmp_path):
    proc = _cli(["nobody/not-cached", str(tmp_path / "out"), "--no-progress"],
                {"HF_HUB_CACHE": str(tmp_path / "empty-hub")})
    assert proc.returncode != 0
    assert "'nobody/not-cached' is neither a local folder nor a downloadable hub repo" in \
        proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("src", ["missing.gguf", "./no-such-folder", "a/b/c"])
def test_missing_local_paths_are_not_looked_up_on_the_hub(src, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / src if src == "missing.gguf" else src)
