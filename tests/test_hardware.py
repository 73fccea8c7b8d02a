"""Hardware keys: GPU name and memory, else the CPU; provenance carries library versions."""

import pytest

from harness import hardware


@pytest.mark.parametrize(
    ("name", "memory_mib", "key"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H200", 143771, "nvidia-h200-140gb"),
        ("NVIDIA GeForce RTX 4090", 24564, "nvidia-geforce-rtx-4090-24gb"),
        ("NVIDIA A100-SXM4-40GB", 40960, "nvidia-a100-sxm4-40gb"),
    ],
)
def test_a_gpu_key_carries_name_and_memory(monkeypatch, name, memory_mib, key):
    monkeypatch.setattr(hardware, "gpu_info", lambda index=0: {"name": name, "memory_mib": memory_mib})
    assert hardware.hardware_key("cuda") == key


def test_a_cpu_key_carries_the_model_and_core_count(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz")
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware.hardware_key("cpu") == "cpu-intel-xeon-platinum-8488c-2c"


def test_asking_for_a_gpu_key_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(hardware, "gpu_info", lambda index=0: None)
    with pytest.raises(RuntimeError, match="NVML sees no GPU"):
        hardware.hardware_key("cuda")


def test_the_environment_records_the_libraries_that_decide_a_figure():
    env = hardware.environment()
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert "bitsandbytes" in env["packages"]
    info = hardware.machine_info("cpu")
    assert info["hardware_key"].startswith("cpu-") and info["python"]


@pytest.mark.parametrize(
    ("worker", "visible", "count", "pinned"),
    [
        ("gw0", "", 2, "0"),
        ("gw1", "", 2, "1"),
        ("gw2", "", 2, "0"),          # more workers than GPUs: they share, round robin
        ("gw1", "4,6", 8, "6"),       # only the GPUs the session may use
        ("gw3", "GPU-a,GPU-b", 8, "GPU-b"),
        ("gw1", "", 1, None),         # one GPU: nothing to spread
        ("main", "", 4, None),        # not under xdist
        (None, "", 4, None),
    ],
)
def test_xdist_workers_are_pinned_to_one_gpu_each(monkeypatch, worker, visible, count, pinned):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    env = hardware.worker_gpu_env(worker, count)
    assert env == ({"CUDA_VISIBLE_DEVICES": pinned} if pinned else {})
