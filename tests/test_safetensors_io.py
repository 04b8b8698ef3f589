"""qahira_vllm.safetensors_io: which files form a model, and damaged files, through every reader.

References: safetensors' own load_file on the files the index names (read by the test from the
index JSON), and a quantization of the same weights from a clean single-file folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


from support import tiny  # noqa: E402
from support import tiny as tm  # noqa: E402
from qahira_vllm.adapter_format import (AdapterError, base_layer_dims,  # noqa: E402
                                        checkpoint_fingerprint, load_adapter)
from qahira_vllm.checkpoint import (load_quantized_state, read_headers,  # noqa: E402
                                    read_quant_config, validate_checkpoint)
from qahira_vllm.format import QahiraFormatError  # noqa: E402
from qahira_vllm.quantize import quantize_model  # noqa: E402
from qahira_vllm.safetensors_io import (INDEX_NAME, model_weight_files,  # noqa: E402
                                        read_safetensors_header)

QARGS = dict(bits=4, block_size=(1, 64), clip_search=False, progress=False)


def _shard(src: Path, dst: Path) -> list[str]:
    """Copy a single-file model folder to dst as index + shards; returns the shard names."""
    from huggingface_hub import save_torch_state_dict

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    save_torch_state_dict(tensors, dst, max_shard_size="100KB")
    shards = sorted(set(json.loads((dst / INDEX_NAME).read_text())["weight_map"].values()))
    assert len(shards) > 1
    return shards


def _indexed_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Reference: safetensors' load_file over exactly the files the index names."""
    out = {}
    for f in sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())):
        out.update(load_file(str(folder / f)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stio")
    src = tm.make_model_dir(root / "src", "qwen2", seed=3)
    stale_src = tm.make_model_dir(root / "stale_src", "qwen2", seed=11)  # same names, shapes
    q4 = root / "q4"
    quantize_model(src, q4, **QARGS)
    return {"root": root, "src": src, "stale_src": stale_src, "q4": q4}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tm.load_safetensors_dir(a), tm.load_safetensors_dir(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ------------------------------------------------------------------ which files are the model

def test_index_with_stray_consolidated_is_ignored(models, tmp_path):
    folder = tmp_path / "sharded"
    _shard(models["src"], folder)
    # A Mistral-style consolidated file: other tensor names, which vLLM cannot place.
    save_file({"layers.0.attention.wq.weight": torch.ones(128, 128)},
              str(folder / "consolidated.safetensors"))
    assert [p.name for p in model_weight_files(folder)] == sorted(
        set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
    out = tmp_path / "out"
    quantize_model(folder, out, **QARGS)
    assert not any(n.startswith("layers.") for n in read_headers(out))
    assert not list(out.glob("consolidated*"))
    validate_checkpoint(out, read_quant_config(out))  # the plugin's load-time check passes
    ref = tmp_path / "ref"
    quantize_model(models["src"], ref, **QARGS)
    _assert_same_tensors(out, ref)


def test_index_with_stale_model_safetensors_uses_indexed_weights(models, tmp_path):
    folder = tmp_path / "sharded"
    _shard(models["src"], folder)
    shutil.copy(models["stale_src"] / "model.safetensors", folder / "model.safetensors")
    indexed = _indexed_tensors(folder)
    stale = load_file(str(folder / "model.safetensors"))
    assert sorted(stale) == sorted(indexed)
    assert all(not torch.equal(stale[k], indexed[k]) for k in indexed if k.endswith("proj.weight"))

    out = tmp_path / "out"
    quantize_model(folder, out, **QARGS)
    # Reference: the indexed weights (load_file) alone in a clean single-file folder.
    clean = tmp_path / "clean"
    shutil.copytree(models["src"], clean)
    (clean / "model.safetensors").unlink()
    save_file(indexed, str(clean / "model.safetensors"))
    ref = tmp_path / "ref"
    quantize_model(clean, ref, **QARGS)
    _assert_same_tensors(out, ref)
    # And the dequantized output is near the indexed weight, far from the stale one.
    _, quant, _ = load_quantized_state(out)
    layer = "model.layers.0.mlp.down_proj"
    deq = tm.dequant_packed_ref(quant[layer]["qweight"], quant[layer]["scales"],
                                quant[layer]["offsets"], (1, 64), 4)
    w_idx, w_stale = indexed[f"{layer}.weight"], stale[f"{layer}.weight"]
    assert (deq - w_idx).norm() < 0.2 * w_idx.norm() < (deq - w_stale).norm()


def test_index_naming_a_missing_shard(models, tmp_path):
    folder = tmp_path / "sharded"
    shards = _shard(models["src"], folder)
    (folder / shards[-1]).unlink()
    for read in (model_weight_files, read_headers,
                 lambda d: quantize_model(d, tmp_path / "out", **QARGS)):
        with pytest.raises(QahiraFormatError) as e:
            read(folder)
        msg = str(e.value)
        assert INDEX_NAME in msg and repr(shards[-1]) in msg and "does not exist" in msg, msg
    assert not (tmp_path / "out").exists()


def test_same_tensor_in_two_indexed_shards(models, tmp_path):
    folder = tmp_path / "sharded"
    shards = _shard(models["src"], folder)
    first, last = load_file(str(folder / shards[0])), load_file(str(folder / shards[-1]))
    dup = sorted(first)[0]
    last[dup] = first[dup]
    save_file(last, str(folder / shards[-1]), metadata={"format": "pt"})
    with pytest.raises(QahiraFormatError) as e:
        quantize_model(folder, tmp_path / "out", **QARGS)
    msg = str(e.value)
    assert repr(dup) in msg and shards[0] in msg and shards[-1] in msg, msg
    assert not (tmp_path / "out").exists()


def test_weights_under_other_names_only(models, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(models["src"], folder)
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(QahiraFormatError, match=r"weights\.safetensors.*neither model"):
        model_weight_files(folder)


def test_served_folder_with_stray_file_is_refused(models, tmp_path):
    """vLLM loads every *.safetensors of a folder without an index: the plugin's check
    (validate_checkpoint, called from QahiraConfig.maybe_update_config) names the stray."""
    bad = tmp_path / "stray"
    shutil.copytree(models["q4"], bad)
    save_file({"extra.weight": torch.zeros(2, 2)}, str(bad / "extra.safetensors"))
    cfg = read_quant_config(bad)
    with pytest.raises(QahiraFormatError) as e:
        validate_checkpoint(bad, cfg)
    assert "extra.safetensors" in str(e.value) and "vLLM loads every" in str(e.value)
    # Our readers themselves read model.safetensors only, like transformers.
    assert model_weight_files(bad) == [bad / "model.safetensors"]

    (bad / "extra.safetensors").rename(bad / "consolidated.safetensors")
    with pytest.raises(QahiraFormatError, match=r"consolidated\.safetensors: vLLM's default "
                                                r"loader reads only consolidated"):
        validate_checkpoint(bad, cfg)


def test_served_sharded_folder_with_stale_single_file_passes(models, tmp_path):
    """With an index vLLM reads only the indexed shards, as we do: nothing to refuse."""
    folder = tmp_path / "sharded"
    _shard(models["q4"], folder)
    fp = checkpoint_fingerprint(models["q4"])
    shutil.copy(models["q4"] / "model.safetensors", folder / "model.safetensors")
    sd = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.offsets"
    sd[name] = sd[name] + 1
    save_file(sd, str(folder / "model.safetensors"))
    assert len(validate_checkpoint(folder, read_quant_config(folder))) == 14
    assert checkpoint_fingerprint(folder) == fp  # the stale offsets are not read


# ------------------------------------------------------------------------------ damaged files

def _lfs(f: Path) -> str:
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                 + "ab" * 32 + "\nsize 1234567\n")
    return "is a git-lfs pointer: fetch the real file (git lfs pull)"


def _zero_len(f: Path) -> str:
    b = f.read_bytes()
    f.write_bytes(b"\0" * 8 + b[8:])
    return "header length is 0"


def _len_too_big(f: Path) -> str:
    b = f.read_bytes()
    n = len(b) + 100
    f.write_bytes(n.to_bytes(8, "little") + b[8:])
    return f"header length {n} exceeds the file size {len(b)}"


def _not_json(f: Path) -> str:
    b = f.read_bytes()
    n = int.from_bytes(b[:8], "little")
    f.write_bytes(b[:8] + b"x" * n + b[8 + n:])
    return "header is not JSON"


def _truncated(f: Path) -> str:
    b = f.read_bytes()
    f.write_bytes(b[:-100])
    return "the file is truncated"


def _short(f: Path) -> str:
    f.write_bytes(b"\x01\x02\x03")
    return "shorter than the 8-byte"


DAMAGE = {"lfs": _lfs, "zero_len": _zero_len, "len_too_big": _len_too_big,
          "not_json": _not_json, "truncated": _truncated, "short": _short}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_every_reader(models, tmp_path, kind):
    # quantize: refused before any work, nothing written
    src = tmp_path / "src"
    shutil.copytree(models["src"], src)
    expected = DAMAGE[kind](src / "model.safetensors")
    with pytest.raises(QahiraFormatError) as e:
        quantize_model(src, tmp_path / "out", **QARGS)
    assert expected in str(e.value) and str(src / "model.safetensors") in str(e.value)
    assert not (tmp_path / "out").exists()
    # every qahira checkpoint reader: headers, the plugin's check, fingerprint, merge/trainer
    ckpt = tmp_path / "ckpt"
    shutil.copytree(models["q4"], ckpt)
    expected = DAMAGE[kind](ckpt / "model.safetensors")
    cfg = read_quant_config(ckpt)
    readers = {"read_headers": read_headers, "validate": lambda d: validate_checkpoint(d, cfg),
               "fingerprint": checkpoint_fingerprint, "base_layer_dims": base_layer_dims,
               "load_quantized_state": load_quantized_state,
               "header": lambda d: read_safetensors_header(d / "model.safetensors")}
    for name, read in readers.items():
        with pytest.raises(QahiraFormatError) as e:
            read(ckpt)
        assert expected in str(e.value) and str(ckpt / "model.safetensors") in str(e.value), name


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_adapter_file(models, tmp_path, kind):
    adapter = tiny.random_adapter(models["q4"], tmp_path / "adapter")
    load_adapter(adapter)  # readable before the damage
    f = adapter / "adapter_model.safetensors"
    expected = DAMAGE[kind](f)
    with pytest.raises(AdapterError) as e:
        load_adapter(adapter)
    assert expected in str(e.value) and str(f) in str(e.value)


def test_valid_header_round_trip(models):
    """The parsed header agrees with safetensors' own reading of the file."""
    f = models["q4"] / "model.safetensors"
    header = read_safetensors_header(f)
    tensors = load_file(str(f))
    assert sorted(k for k in header if k != "__metadata__") == sorted(tensors)
    for k, t in tensors.items():
        assert header[k]["shape"] == list(t.shape)
