"""The archived engines (auto-gptq, autoawq): skipped with the reason when absent, loaded through their own API."""

import sys
import types

import pytest
import torch

from harness.methods.base import MethodUnavailable
from harness.methods.gptq import GPTQMethod


def test_a_missing_legacy_engine_skips_with_the_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "auto_gptq" else real(name))
    method = GPTQMethod({"engine": "auto-gptq", "quantizer": "rtn", "checkpoint": "/x"}, "cpu")
    with pytest.raises(MethodUnavailable, match="auto-gptq is not installed: it is archived upstream"):
        method.check_available()


class QuantLinear(torch.nn.Linear):
    """Stands in for auto_gptq's quantized layer class (its module path is what identifies it)."""


QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_exllamav2"


def fake_auto_gptq(calls):
    class Wrapped:
        def __init__(self):
            self.model = torch.nn.Sequential(QuantLinear(4, 4))

    class AutoGPTQForCausalLM:
        @staticmethod
        def from_quantized(path, **kwargs):
            calls.append((path, kwargs))
            return Wrapped()

    return types.SimpleNamespace(AutoGPTQForCausalLM=AutoGPTQForCausalLM)


def test_auto_gptq_loads_with_its_kernel_flags_and_records_its_layers(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "auto_gptq", fake_auto_gptq(calls))
    monkeypatch.setattr("harness.methods.gptq.check_checkpoint", lambda folder: {"quant_method": "gptq"})
    method = GPTQMethod({"engine": "auto-gptq", "kernel": "exllama_v2", "checkpoint": str(tmp_path)}, "cpu")
    model = method.load("unused")
    path, kwargs = calls[0]
    assert path == str(tmp_path) and kwargs["disable_exllamav2"] is False and kwargs["disable_exllama"] is True
    method.verify(model, generated=False)
    assert method.kernels(model) == ["QuantLinear"]


def test_a_legacy_model_without_its_quantized_layers_fails(monkeypatch, tmp_path):
    method = GPTQMethod({"engine": "autoawq", "checkpoint": str(tmp_path)}, "cpu")
    with pytest.raises(RuntimeError, match="no autoawq quantized layer"):
        method.verify(torch.nn.Sequential(torch.nn.Linear(4, 4)), generated=False)
