"""Unquantized weights in fp32, fp16 or bf16, run either eagerly or compiled with a static KV cache."""

from __future__ import annotations

from typing import Any

from harness.methods.base import DTYPES, MODE, CompilableMethod, Param
from harness.methods.kvcache import KV_PARAMS, KVCacheMixin


class DenseMethod(KVCacheMixin, CompilableMethod):
    """torch weights in one dtype, run eagerly or compiled (`mode`, see CompilableMethod); an eager one may
    quantize its KV cache (`kv_cache`, harness/methods/kvcache.py)."""

    NAME = "torch"
    MARKER = "torch"
    PARAMS = {
        "dtype": Param(str, "float16", "weight and activation dtype", DTYPES),
        "mode": MODE,
        **KV_PARAMS,
    }

    def load(self, pretrained: str) -> Any:
        return self.load_transformers(pretrained)

    def describe(self, model: Any) -> dict[str, Any]:
        return {**super().describe(model),
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
