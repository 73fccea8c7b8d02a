"""Hardware keys: GPU name and memory, else the CPU; provenance carries library versions."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    ("name", "flags", "isa", "key"),
    [
        ("Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz", "fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile",
         "amx", "cpu-intel-xeon-platinum-8488c-amx-2c"),
        ("AMD EPYC", "fpu sse2 avx2 fma avx512f avx512_bf16", "avx512", "cpu-amd-epyc-avx512-2c"),
        ("AMD EPYC", "fpu sse2 avx2 fma", "avx2", "cpu-amd-epyc-avx2-2c"),
        ("Neoverse-V1", "fp asimd sve", "sve", "cpu-neoverse-v1-sve-2c"),
        ("QEMU Virtual CPU version 2.5+", "fpu sse2", None, "cpu-qemu-virtual-version-2.5-2c"),
    ],
)
def test_a_cpu_key_carries_the_model_vector_tier_and_core_count(monkeypatch, tmp_path, name, flags, isa, key):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: {flags}\n\n")
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda text: cpuinfo if text == "/proc/cpuinfo" else real_path(text))
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware.hardware_key("cpu") == key
    info = hardware.machine_info("cpu")
    assert info["hardware_key"] == key
    assert info["cpu_isa"] == isa
    assert set(info["cpu_vector_flags"]) <= set(flags.split())


def test_a_cpu_whose_flags_cannot_be_read_keeps_a_key_without_a_tier(monkeypatch, tmp_path):
    real_path, missing = hardware.Path, tmp_path / "none"
    monkeypatch.setattr(hardware, "Path", lambda text: missing if text == "/proc/cpuinfo" else real_path(text))
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 8)
    assert hardware.cpu_vector_isa() is None
    assert hardware.hardware_key("cpu") == "cpu-arm-8c"


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


@given(cpus=st.sets(st.integers(0, 255), min_size=1, max_size=96), workers=st.integers(2, 16))
def test_xdist_workers_share_the_cpus_in_disjoint_slices_that_cover_them(cpus, workers):
    shares = [hardware.worker_cpu_share(f"gw{i}", workers, list(cpus)) for i in range(workers)]
    if workers > len(cpus):
        assert shares == [None] * workers  # too few CPUs to split: every worker keeps them all
        return
    assert sorted(c for share in shares for c in share) == sorted(cpus)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(share == sorted(share) for share in shares)


@pytest.mark.parametrize(("worker", "count"), [(None, 4), ("main", 4), ("gw0", 1)])
def test_without_several_xdist_workers_the_cpus_are_not_split(worker, count):
    assert hardware.worker_cpu_share(worker, count, [0, 1, 2, 3]) is None
    assert hardware.cpu_share_env(None) == {}


def test_a_share_sizes_the_thread_pools_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    assert hardware.cpu_share_env([4, 5, 6, 7]) == {"QUANTBENCH_CPUS": "4,5,6,7", "OMP_NUM_THREADS": "4"}


def _child_affinity(value):
    code = ("import os\nfrom harness.hardware import apply_cpu_share\n"
            "apply_cpu_share()\nprint(len(os.sched_getaffinity(0)))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "QUANTBENCH_CPUS": value})


def test_a_worker_pins_itself_to_its_share_and_names_a_bad_one():
    mine = sorted(os.sched_getaffinity(0))
    pinned = _child_affinity(str(mine[0]))
    assert pinned.returncode == 0 and pinned.stdout.strip() == "1", pinned.stderr
    bad = _child_affinity("0,x")
    assert bad.returncode != 0 and "QUANTBENCH_CPUS='0,x'" in bad.stderr
    assert "QUANTBENCH_CPUS='100000'" in _child_affinity("100000").stderr


def test_the_revision_is_dirty_for_changed_code_and_not_for_the_baseline_store_a_run_writes(tmp_path):
    from harness.hardware import suite_revision

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=q", "-c", "user.email=q@example.org", *args],
                       check=True, capture_output=True)

    code, stored = tmp_path / "harness" / "x.py", tmp_path / "baselines" / "gpu-a" / "m.json"
    for path, text in ((code, "a = 1\n"), (stored, "{}\n")):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    clean = suite_revision(tmp_path)
    assert clean and "+dirty" not in clean
    stored.write_text('{"cells": {}}\n')  # what --update-baselines does while the run goes on
    suite_revision.cache_clear()
    assert suite_revision(tmp_path) == clean
    code.write_text("a = 2\n")
    suite_revision.cache_clear()
    assert suite_revision(tmp_path) == clean + "+dirty"
