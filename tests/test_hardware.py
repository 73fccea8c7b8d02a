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
