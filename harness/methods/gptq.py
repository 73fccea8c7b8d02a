"""GPTQ and AWQ through GPTQModel: quantized in the suite (or packed, or a user's checkpoint), one kernel each.

The checkpoint is built in the prepare step (its own process, see harness.worker), so the quantization's
wall time and peak memory are figures of their own and never part of the measured load. The inference kernel
is a parameter; the kernel every quantized layer actually runs is recorded, and a layer that fell back to
another kernel fails the cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.methods.base import DTYPES, Method, MethodUnavailable, Param, torch_dtype
from harness.quant import QuantError, QuantSpec, check_checkpoint, gptqmodel_environment, quantized_folder

CUDA_KERNELS = ("marlin", "exllama_v2", "triton", "machete", "gemm", "gemv", "gemv_fast", "gemm_triton")


class GPTQMethod(Method):
    """A GPTQ or AWQ checkpoint loaded through GPTQModel with a pinned inference kernel."""

    NAME = "gptq"
    MARKER = "gptq"
    PARAMS = {
        "format": Param(str, "gptq", "gptq or awq", ("gptq", "awq")),
        "quantizer": Param(str, "gptqmodel", "gptqmodel: the GPTQ/AWQ algorithm with calibration data; rtn: "
                           "round-to-nearest packed in the AutoGPTQ/AutoAWQ layout (speed cells, old formats)",
                           ("gptqmodel", "rtn")),
        "checkpoint": Param(str, "", "an existing GPTQ/AWQ folder to benchmark as is (the model gives the "
                            "tokenizer and evaluation ids)"),
        "bits": Param(int, 4, "bits per weight", (2, 3, 4, 8)),
        "group_size": Param(int, 128, "inputs per quantization group (-1: one per output channel)"),
        "desc_act": Param(bool, False, "GPTQ act-order: quantize columns by decreasing activation"),
        "true_sequential": Param(bool, True, "GPTQ: quantize a layer's linears one after another"),
        "damp": Param(float, 0.01, "GPTQ dampening of the Hessian (fraction of its mean diagonal)"),
        "sym": Param(bool, True, "symmetric quantization (AWQ: false means zero points)"),
        "awq_version": Param(str, "gemm", "AWQ packing: gemm or gemv", ("gemm", "gemv")),
        "calibration": Param(str, "auto", "auto (corpus text, or random ids for a model without tokenizer), "
                             "corpus, random, a text file, or datasets:NAME[:CONFIG]"),
        "calibration_samples": Param(int, 128, "calibration sequences"),
        "calibration_tokens": Param(int, 512, "tokens per calibration sequence"),
        "kernel": Param(str, "auto", "GPTQModel BACKEND that runs inference (torch, marlin, exllama_v2, triton, "
                        "machete, gemm, gemv, ...); auto records what GPTQModel picked"),
        "dtype": Param(str, "float16", "dtype of activations and unquantized modules", DTYPES),
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("gptqmodel",)

    def check_available(self) -> None:
        super().check_available()
        if self.device == "cpu" and self.params["kernel"] in CUDA_KERNELS:
            raise MethodUnavailable(f"kernel {self.params['kernel']!r} needs a CUDA GPU")

    def spec(self) -> QuantSpec:
        fields = QuantSpec.__dataclass_fields__
        return QuantSpec(**{name: value for name, value in self.params.items() if name in fields})

    # ---- the checkpoint ------------------------------------------------------------------------------

    def prepare(self, resolved: Any, seed: int, log: Any) -> dict[str, Any]:
        """Build (or find) the checkpoint; return what the quantization cost when it was built."""
        if self.params["checkpoint"]:
            folder = Path(self.params["checkpoint"]).expanduser()
            check_checkpoint(folder)
            return {"checkpoint": str(folder), "fresh": False, "user_checkpoint": True}
        folder, sidecar = self._build(resolved, seed, log)
        return {"checkpoint": str(folder), **{k: v for k, v in sidecar.items() if k != "key"}}

    def _build(self, resolved: Any, seed: int, log: Any) -> tuple[Path, dict[str, Any]]:
        spec = self.spec()
        windows = None
        if spec.quantizer == "gptqmodel":
            from harness.quant import calibration_ids

            tokenizer = None
            if resolved.has_tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(resolved.pretrained)
            windows, label = calibration_ids(spec, tokenizer, resolved.vocab_size, seed)
            log(f"calibration: {len(windows)} x {spec.calibration_tokens} ids from {label}")
        return quantized_folder(Path(resolved.pretrained), spec, windows, self.device, log)

    def checkpoint(self, pretrained: str) -> Path:
        """The folder `load` reads: the user's checkpoint, or the one `prepare` cached for this model."""
        if self.params["checkpoint"]:
            return Path(self.params["checkpoint"]).expanduser()
        if self.prepared is None:
            raise QuantError("the checkpoint was not prepared: run the method's prepare step first")
        return Path(self.prepared["checkpoint"])

    # ---- loading and running -----------------------------------------------------------------------

    def load(self, pretrained: str) -> Any:
        gptqmodel_environment()
        from gptqmodel import BACKEND, GPTQModel

        folder = self.checkpoint(pretrained)
        quant = check_checkpoint(folder)
        self.quantization_config = quant
        wrapped = GPTQModel.load(str(folder), backend=BACKEND(self.params["kernel"]), device=self.device,
                                 dtype=torch_dtype(self.params["dtype"]))
        model = wrapped.model
        model.eval()
        return model

    def warm_up(self, model: Any) -> None:
        """One forward pass, so kernels that compile on first use (Marlin, ExLlama v2, Triton) do it now."""
        import torch

        ids = torch.ones(1, 8, dtype=torch.long, device=model.device)
        with torch.inference_mode():
            model(ids)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def kernels(self, model: Any) -> list[str]:
        """Class names of the quantized linear layers as loaded."""
        return sorted({type(m).__name__ for m in model.modules()
                       if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")})

    def verify(self, model: Any, generated: bool) -> None:
        from gptqmodel import BACKEND
        from gptqmodel.utils.backend import normalize_backend
        from gptqmodel.utils.importer import get_kernel_backends

        layers = [m for m in model.modules() if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")]
        if not layers:
            raise RuntimeError("no GPTQModel quantized layer in the loaded model: it was not loaded quantized")
        if self.params["kernel"] == "auto":
            return
        wanted = normalize_backend(BACKEND(self.params["kernel"]), quant_method=self.params["format"])
        fallen = sorted({type(m).__name__ for m in layers if wanted not in get_kernel_backends(type(m))})
        if fallen:
            raise RuntimeError(f"kernel {self.params['kernel']!r} was asked for, but layers run {', '.join(fallen)}")

    def describe(self, model: Any) -> dict[str, Any]:
        from importlib.metadata import version

        described = {**super().describe(model), "kernels": self.kernels(model), "gptqmodel": version("gptqmodel"),
                     "quantization_config": getattr(self, "quantization_config", None)}
        if self.prepared:
            described["checkpoint"] = {k: v for k, v in self.prepared.items() if k != "fresh"}
        return described
