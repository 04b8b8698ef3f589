"""The embedded model's exact qahira checkpoint (models.fetch_converted): its GGUF converted
as it is, for the demo and `qahira models fetch`."""

from __future__ import annotations

import json
import shutil

import torch

from support import tiny
from support.gguf_files import transformers_gguf_tensors


def test_fetch_converted_is_the_gguf_bit_for_bit_in_model_dtype(tmp_path, monkeypatch):
    from qahira_vllm import models

    src = models.fetch_gguf("smollm2-135m", verbose=False)  # the session's cached file
    monkeypatch.setenv("QAHIRA_HOME", str(tmp_path))
    models.gguf_path("smollm2-135m").parent.mkdir(parents=True)
    shutil.copy2(src, models.gguf_path("smollm2-135m"))  # no second download
    # a folder left by an older release (quantized from the bf16 copy) is rebuilt
    stale = models.converted_dir("smollm2-135m")
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))

    ckpt = models.fetch_converted("smollm2-135m", verbose=False)
    assert ckpt == stale
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["source_format"] == "gguf"
    assert config["dtype"] == "bfloat16"
    sd = tiny.load_safetensors_dir(ckpt)
    ref = transformers_gguf_tensors(src)
    n = 0
    for name in sd:
        if name.endswith(".qweight"):
            layer = name[: -len(".qweight")]
            w = tiny.dequant_packed_ref(sd[name], sd[f"{layer}.scales"], sd[f"{layer}.offsets"],
                                        (1, 32), 4).float()
            assert torch.equal(w, ref[f"{layer}.weight"]), layer
            n += 1
    assert n == 210
    emb = sd["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, ref["model.embed_tokens.weight"].to(torch.bfloat16))
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert models.fetch_converted("smollm2-135m", verbose=False) == ckpt  # cached now
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
