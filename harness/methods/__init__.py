"""Quantization methods: a lazy registry from backend name to "module:Class".

Nothing here imports a backend's library: a missing optional library only skips its own cells, with
the reason, and never breaks collection. A new engine is one more file and one more line below.
"""

from __future__ import annotations

import importlib

from harness.methods.base import Method, MethodUnavailable, Param

BACKENDS: dict[str, str] = {
    "torch": "harness.methods.dense:DenseMethod",
    "bnb": "harness.methods.bnb:BitsAndBytesMethod",
    "gguf": "harness.methods.gguf:GGUFMethod",
    "gptq": "harness.methods.gptq:GPTQMethod",
    "torchao": "harness.methods.torchao:TorchAoMethod",
    "quanto": "harness.methods.quanto:QuantoMethod",
    "vllm": "harness.methods.vllm:VLLMMethod",
    "exllamav2": "harness.methods.exllamav2:ExLlamaV2Method",
}

__all__ = ["BACKENDS", "Method", "MethodUnavailable", "Param", "method_class"]


def method_class(backend: str) -> type[Method]:
    """Import and return the class registered for `backend` (or a "module:Class" path)."""
    target = BACKENDS.get(backend, backend)
    if ":" not in target:
        raise KeyError(f"unknown backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = target.split(":", 1)
    return getattr(importlib.import_module(module_name), class_name)
