"""Fixtures shared by the harness's own tests."""

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


@pytest.fixture
def tiny_job():
    """A worker job for the two-layer synthetic test architecture on the CPU: seconds, not minutes."""

    def make(method_class="harness.methods.dense:DenseMethod", batch_sizes=(1,), **run):
        return {
            "suite": "cpu",
            "device": "cpu",
            "method_class": method_class,
            "method": {"name": "fp32", "backend": "torch", "params": {"dtype": "float32"}},
            "model": {"name": "tiny", "source": "synthetic", "arch": "tiny-test", "seed": 0, "path": None,
                      "hub_id": None, "revision": None, "slow": False},
            "batch_sizes": list(batch_sizes),
            "run": {"prompt_tokens": 8, "new_tokens": 4, "warmup": 1, "repeats": 2, "cell_timeout_s": 120,
                    "seed": 0, **run},
            "accuracy": {"context_tokens": 32, "stride": 32, "max_eval_tokens": 96},
            "inject_decode_delay_ms": 0,
        }

    return make


@pytest.fixture
def worker_env(tmp_path_factory):
    """Environment for workers: the misbehaving test methods importable, a private cache.

    The caller's PYTHONPATH stays behind the tests folder: a checkout run through another checkout's
    environment (PYTHONPATH=. beside an editable install) tests its own harness in pytester's subprocesses too.
    """
    cache = tmp_path_factory.getbasetemp() / "qb-cache"
    path = os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, "QUANTBENCH_CACHE": str(cache)}


pytest_plugins = ["pytester"]
