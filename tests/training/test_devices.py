"""Device choice, torchrun environment parsing and the peak-memory figure of the trainer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qahira_vllm.cli import main as cli_main
from qahira_vllm.training.trainer import (DistInfo, TrainConfig, dist_from_env, peak_memory_mb,
                                          resolve_device)


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("").type == expected  # empty means auto
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "mps", "cpu:1", "gpu"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_without_gpu_or_past_the_count_is_refused():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="no CUDA device is usable|does not exist"):
        resolve_device(f"cuda:{n}")
    if n:
        # under torchrun every rank takes cuda:LOCAL_RANK, and an explicit index is refused
        assert resolve_device("cuda", DistInfo(1, 2, 0)) == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
            resolve_device("cuda:0", DistInfo(1, 2, 1))


def test_torchrun_environment():
    assert dist_from_env({}) == DistInfo(0, 1, 0)
    assert dist_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistInfo(3, 4, 1)
    with pytest.raises(ValueError, match="expected 0 <= RANK < WORLD_SIZE"):
        dist_from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="expected integers"):
        dist_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_cpu_peak_memory_is_the_peak_rss():
    # reference: the kernel's own high-water mark of this process (/proc, Linux)
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status")
                   if line.startswith("VmHWM:"))
    assert peak_memory_mb(torch.device("cpu")) == pytest.approx(hwm_kib / 1024, abs=2.0)


def test_cpu_peak_memory_of_a_child_is_its_own_not_its_parents():
    """A trainer started from a large process reports its own peak: exec carries the parent's
    high-water mark into getrusage's ru_maxrss (shown here, the reference), not into the
    reported peak. Parent: 1 GiB touched; child: a Python process with torch imported."""
    if not Path("/proc/self/status").exists():
        pytest.skip("Linux /proc only: elsewhere the peak is ru_maxrss")
    held = bytearray(1 << 30)
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = ("import resource, torch\n"
            "from qahira_vllm.training.trainer import peak_memory_mb\n"
            "print(peak_memory_mb(torch.device('cpu')), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    reported, ru_maxrss = float(out[0]), float(out[1])
    assert ru_maxrss >= 1024              # the inherited mark the trainer must not report
    assert 20 < reported < 900, reported  # torch's own import: a few hundred MiB
    del held


def test_identity_keeps_the_device_kind_not_its_index():
    base = dict(base="b", data="d", out="o")
    assert TrainConfig(**base, device="cpu").identity()["device"] == "cpu"
    assert TrainConfig(**base, device="cuda:1").identity()["device"] == "cuda"


def test_cli_refuses_an_unknown_device(qckpt, pattern_data, tmp_path, capsys):
    args = ["train", "--base", str(qckpt), "--data", str(pattern_data), "--out",
            str(tmp_path / "x"), "--device", "tpu", "--no-progress"]
    assert cli_main(args) == 2
    assert "device='tpu'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
