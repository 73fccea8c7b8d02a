"""bitsandbytes: LLM.int8 and 4-bit NF4 / FP4 (optionally double-quantized) through transformers."""

from __future__ import annotations

from typing import Any

from harness.methods.base import DTYPES, Method, Param, torch_dtype
from harness.methods.kvcache import KV_PARAMS, KVCacheMixin

INT8_CONSISTENCY_TOLERANCE = 0.75  # see BitsAndBytesMethod.consistency_tolerance


class BitsAndBytesMethod(KVCacheMixin, Method):
    """Weights quantized on load by bitsandbytes; runs on CUDA GPUs and (0.48+) on x86 CPUs; may quantize its
    KV cache (`kv_cache`, harness/methods/kvcache.py)."""

    NAME = "bnb"
    MARKER = "bnb"
    ACCURACY_PACKAGES = (*Method.ACCURACY_PACKAGES, "bitsandbytes")
    PARAMS = {
        "quant": Param(str, "nf4", "int8 (LLM.int8), nf4 or fp4", ("int8", "nf4", "fp4")),
        "double_quant": Param(bool, False, "4-bit: quantize the quantization constants too"),
        "compute_dtype": Param(str, "float16", "4-bit: dtype of the matmuls", DTYPES),
        "dtype": Param(str, "float16", "dtype of the modules left unquantized (norms, lm_head)", DTYPES),
        "int8_threshold": Param(float, 6.0, "int8: outlier threshold; activations above it stay in 16 bit"),
        **KV_PARAMS,
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("bitsandbytes",)

    def quantization_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        if self.params["quant"] == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(self.params["int8_threshold"]))
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.params["quant"],
            bnb_4bit_use_double_quant=self.params["double_quant"],
            bnb_4bit_compute_dtype=torch_dtype(self.params["compute_dtype"]),
        )

    def load(self, pretrained: str) -> Any:
        return self.load_transformers(pretrained, self.quantization_config())

    def consistency_tolerance(self) -> float:
        """LLM.int8 is batch-variant by design: a hidden-state column with any entry over `int8_threshold` in
        the batch runs in fp16 for every row, so a row's arithmetic depends on its neighbours. On the H200,
        Llama-2-7B (synthetic) rows moved by 0.44-0.69 standard deviations of their logits batched against
        alone, TinyLlama's by 0.34-0.41 (docs/evidence/nvidia-h200-140gb/gate-contended-results.jsonl); a
        left-padding bug moves them by about one or more."""
        return INT8_CONSISTENCY_TOLERANCE if self.params["quant"] == "int8" else super().consistency_tolerance()

    def capture_blocker(self) -> str | None:
        """LLM.int8 finds its outlier columns on the host at every matmul (a device-to-host sync), which CUDA
        graph capture refuses; 4-bit layers capture."""
        if self.params["quant"] == "int8":
            return "LLM.int8 finds its outlier columns on the host at every matmul (a sync inside the step)"
        return None

    def verify(self, model: Any, generated: bool) -> None:
        import bitsandbytes as bnb

        wanted = bnb.nn.Linear8bitLt if self.params["quant"] == "int8" else bnb.nn.Linear4bit
        if not any(isinstance(m, wanted) for m in model.modules()):
            raise RuntimeError(f"no {wanted.__name__} layer in the loaded model: bitsandbytes did not quantize it")

    def describe(self, model: Any) -> dict[str, Any]:
        return {**super().describe(model), "quantization_config": self.quantization_config().to_dict()}
