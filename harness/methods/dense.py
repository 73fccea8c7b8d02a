"""Unquantized weights in fp32, fp16 or bf16, run either eagerly or compiled with a static KV cache."""

from __future__ import annotations

from typing import Any

from harness.methods.base import DTYPES, Method, MethodUnavailable, Param, torch_dtype


class DenseMethod(Method):
    """torch weights in one dtype; `eager` is plain `generate()`, `compiled` adds a static cache + compile.

    Eager decode at small batch mostly measures Python and kernel-launch overhead; compiled decode
    (static cache, torch.compile with CUDA graphs on GPU) is what a user who cares about speed runs.
    """

    NAME = "torch"
    MARKER = "torch"
    PARAMS = {
        "dtype": Param(str, "float16", "weight and activation dtype", DTYPES),
        "mode": Param(str, "eager", "eager: HF generate as most users call it; compiled: static cache + "
                      "torch.compile", ("eager", "compiled")),
    }

    def load(self, pretrained: str) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype(self.params["dtype"]),
                                                     device_map=self.device)
        return model.eval()

    def check_available(self) -> None:
        super().check_available()
        if self.params["mode"] == "compiled" and self.device == "cpu":
            import shutil

            if shutil.which("cc") is None and shutil.which("gcc") is None:
                raise MethodUnavailable("torch.compile on CPU needs a C compiler, and none is on PATH")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.params["mode"] != "compiled":
            return {}
        from transformers import CompileConfig

        compile_config = CompileConfig()
        # generate() only auto-compiles on accelerators; the CPU suite asks for it explicitly.
        compile_config._compile_all_devices = self.device == "cpu"
        return {"cache_implementation": "static", "compile_config": compile_config}

    def verify(self, model: Any, generated: bool) -> None:
        if generated and self.params["mode"] == "compiled" and not hasattr(model, "_compiled_call"):
            raise RuntimeError("mode 'compiled' was asked for, but generate() ran the model uncompiled")

    def describe(self, model: Any) -> dict[str, Any]:
        return {**super().describe(model), "compiled": hasattr(model, "_compiled_call"),
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
