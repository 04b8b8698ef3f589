"""Which safetensors files form a model, and reading their headers without trusting them.

Every reader of model weights in this project (checkpoint headers and tensors, the fingerprint,
quantize, merge, the trainer, the vLLM plugin's load-time validation) lists files through
`model_weight_files` and reads headers through `read_safetensors_header`, so that they all see
the same tensors and a damaged file is refused with its name and cause before anything runs.

Which files (a local folder):
- `model.safetensors.index.json` present: exactly the files its `weight_map` names (vLLM's
  default loader, `weight_utils.filter_duplicate_safetensors_files`, reads the same set; a
  `model.safetensors` or `consolidated.safetensors` beside the shards is ignored, with a warning).
  transformers' `from_pretrained` differs in one case: it prefers a `model.safetensors` over
  the index when both exist; we follow the server.
- otherwise `model.safetensors` (what transformers reads; vLLM then reads *every*
  `*.safetensors`, which `check_vllm_reads_same` refuses for served checkpoints).
A tensor name found in two of those files is refused, naming both.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .format import QahiraFormatError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_LFS_MAGIC = b"version https://git-lfs"
_HEADER_LEN_BYTES = 8  # little-endian u64 header length, then the JSON header, then the data

# Bytes per element of the safetensors dtype codes (sub-byte F4 / F6 types are not checked).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it.

    dtype: the safetensors code ("F16", "I32", ...); shape: ints; data_start: absolute byte
    offset of its data in `file`; nbytes: its data length."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    data_start: int
    nbytes: int


def _header_and_data_start(path: str | os.PathLike) -> tuple[dict, int]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(max(len(_LFS_MAGIC), _HEADER_LEN_BYTES))
            if head.startswith(_LFS_MAGIC):
                raise QahiraFormatError(
                    f"{path} is a git-lfs pointer: fetch the real file (git lfs pull)")
            if size < _HEADER_LEN_BYTES:
                raise QahiraFormatError(
                    f"{path}: file is {size} bytes, shorter than the 8-byte safetensors header "
                    "length: damaged or incomplete; fetch it again")
            n = int.from_bytes(head[:_HEADER_LEN_BYTES], "little")
            if n == 0:
                raise QahiraFormatError(
                    f"{path}: header length is 0 (the first 8 bytes are zero): not a "
                    "safetensors file, or a damaged one; fetch it again")
            if n > size - _HEADER_LEN_BYTES:
                raise QahiraFormatError(
                    f"{path}: header length {n} exceeds the file size {size}: not a "
                    "safetensors file, or a damaged/truncated one; fetch it again")
            fh.seek(_HEADER_LEN_BYTES)
            raw = fh.read(n)
    except OSError as e:
        raise QahiraFormatError(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QahiraFormatError(f"{path}: header is not JSON ({e}): not a safetensors file, "
                                "or a damaged one; fetch it again") from None
    if not isinstance(header, dict):
        raise QahiraFormatError(f"{path}: header is not JSON of tensors (a "
                                f"{type(header).__name__}, not an object): not a safetensors file")
    data_start = _HEADER_LEN_BYTES + n
    data_size = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, data_size)
    return header, data_start


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
          and isinstance(info.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in info["shape"])
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(o, int) for o in info["data_offsets"])
          and 0 <= info["data_offsets"][0] <= info["data_offsets"][1])
    if not ok:
        raise QahiraFormatError(
            f"{path}: header entry of tensor {name!r} is {info!r}: expected "
            "{'dtype': str, 'shape': [ints], 'data_offsets': [begin, end]}: damaged file")
    begin, end = info["data_offsets"]
    if end > data_size:
        raise QahiraFormatError(
            f"{path}: tensor {name!r} data ends at byte {end} of the data section, but the file "
            f"holds only {data_size} bytes after its header: the file is truncated (incomplete "
            "download?); fetch it again")
    itemsize = _DTYPE_BYTES.get(info["dtype"])
    if itemsize is not None and end - begin != math.prod(info["shape"]) * itemsize:
        raise QahiraFormatError(
            f"{path}: tensor {name!r} ({info['dtype']} {info['shape']}) needs "
            f"{math.prod(info['shape']) * itemsize} bytes but its data_offsets span "
            f"{end - begin}: damaged file")


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The parsed JSON header of one safetensors file, checked against the file.

    Returns {tensor name: {"dtype", "shape", "data_offsets"}, optional "__metadata__": {...}}.
    Raises QahiraFormatError naming the file when it is a git-lfs pointer, shorter than 8 bytes,
    its header length is 0 or exceeds the file size, its header is not a JSON object, an entry
    is malformed, or a tensor's data lies past the end of the file (truncated)."""
    return _header_and_data_start(path)[0]


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QahiraFormatError(f"{index}: is not JSON ({e}); fetch it again") from None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise QahiraFormatError(f"{index}: expected a 'weight_map' object of tensor name -> "
                                "shard file name")
    return wm


def model_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files that form the model in `model_dir`, in a fixed order.

    With model.safetensors.index.json: exactly the files its weight_map names (sorted), each
    of which must exist inside the folder. Otherwise [model.safetensors].
    Raises FileNotFoundError when the folder has no *.safetensors at all; QahiraFormatError
    (naming the folder or index and the file) for a missing shard, a bad index, or weights
    under other names only."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        wm = _read_index(index)
        files: dict[str, str] = {}  # file name -> one tensor it holds (for the message)
        for tensor, fname in wm.items():
            files.setdefault(fname, tensor)
        out = []
        for fname, tensor in sorted(files.items()):
            path = model_dir / fname
            if Path(os.path.normpath(path)).parent != Path(os.path.normpath(model_dir)):
                raise QahiraFormatError(f"{index}: shard {fname!r} is not a file name in "
                                        f"{model_dir}")
            if not path.is_file():
                raise QahiraFormatError(
                    f"{index} names shard {fname!r} (holding e.g. {tensor!r}) but {path} does "
                    "not exist: the download is incomplete; fetch the missing shard")
            out.append(path)
        if not out:
            raise QahiraFormatError(f"{index}: weight_map is empty")
        ignored = sorted(p.name for p in model_dir.glob("*.safetensors") if p not in out)
        if ignored:
            logger.warning("%s: ignoring %s: not named by %s (vLLM ignores them too)",
                           model_dir, ignored, INDEX_NAME)
        return out
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not others:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}: expected "
                                f"{SINGLE_NAME} or {INDEX_NAME} with its shards")
    raise QahiraFormatError(
        f"{model_dir} has {others} but neither {SINGLE_NAME} nor {INDEX_NAME}: transformers and "
        f"qahira read only those; rename a single-file checkpoint to {SINGLE_NAME}, or add the "
        "index of a sharded one")


def model_tensors(model_dir: str | os.PathLike) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry over `model_weight_files(model_dir)`, headers only (no data).

    Every header is checked (read_safetensors_header); a tensor name found in two files raises
    QahiraFormatError naming both."""
    entries: dict[str, TensorEntry] = {}
    for f in model_weight_files(model_dir):
        header, data_start = _header_and_data_start(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in entries:
                raise QahiraFormatError(
                    f"tensor {name!r} is in both {entries[name].file} and {f}: one of them is "
                    "stale or misplaced; remove it (or fix the index) so each tensor has one file")
            begin, end = info["data_offsets"]
            entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), f,
                                        data_start + begin, end - begin)
    return entries


def check_vllm_reads_same(model_dir: str | os.PathLike) -> None:
    """Refuse a folder whose weights vLLM's default loader would read differently from us.

    vLLM (load_format "auto", default_loader._prepare_weights) reads only consolidated*.safetensors
    when any is present (the Mistral layout), and without an index every *.safetensors in the
    folder. Raises QahiraFormatError naming the file that vLLM would read and we do not."""
    model_dir = Path(model_dir)
    ours = set(model_weight_files(model_dir))
    consolidated = sorted(model_dir.glob("consolidated*.safetensors"))
    if consolidated:
        raise QahiraFormatError(
            f"{consolidated[0]}: vLLM's default loader reads only consolidated*.safetensors when "
            f"one is present (Mistral layout), not the checkpoint's {sorted(p.name for p in ours)}"
            f"; move {[p.name for p in consolidated]} out of {model_dir}")
    if not (model_dir / INDEX_NAME).is_file():
        stray = sorted(p for p in model_dir.glob("*.safetensors") if p not in ours)
        if stray:
            raise QahiraFormatError(
                f"{stray[0]}: without {INDEX_NAME} vLLM loads every *.safetensors in "
                f"{model_dir}, so it would load {[p.name for p in stray]} beside {SINGLE_NAME}, "
                "which qahira does not read; move the stray file(s) out of the folder")
