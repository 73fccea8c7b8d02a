"""GPTQ and AWQ through GPTQModel: quantized in the suite (or packed, or a user's checkpoint), one kernel each.

The checkpoint is built in the prepare step (its own process, see harness.worker), so the quantization's
wall time and peak memory are figures of their own and never part of the measured load. The inference kernel
is a parameter; the kernel every quantized layer actually runs is recorded, and a layer that fell back to
another kernel fails the cell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.methods.base import DTYPES, MODE, CompilableMethod, MethodUnavailable, Param, torch_dtype
from harness.quant import QuantError, QuantSpec, check_checkpoint, gptqmodel_environment, quantized_folder

CUDA_KERNELS = ("marlin", "exllama_v2", "triton", "machete", "gemm", "gemv", "gemv_fast", "gemm_triton")
# The archived engines: module to import, package name, and the module prefix of their quantized layers.
LEGACY_ENGINES = {
    "auto-gptq": ("auto_gptq", "auto-gptq", "auto_gptq.nn_modules.qlinear"),
    "autoawq": ("awq", "autoawq", "awq.modules"),
}


class GPTQMethod(CompilableMethod):
    """A GPTQ or AWQ checkpoint loaded through GPTQModel with a pinned inference kernel."""

    NAME = "gptq"
    MARKER = "gptq"
    ACCURACY_PACKAGES = (*CompilableMethod.ACCURACY_PACKAGES, "gptqmodel")  # the quantizer and its kernels
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
        "engine": Param(str, "gptqmodel", "what loads and runs the checkpoint: gptqmodel, or the archived "
                        "auto-gptq / autoawq where a legacy environment has them", ("gptqmodel", *LEGACY_ENGINES)),
        "mode": MODE,
    }

    def check_available(self) -> None:
        super().check_available()
        import importlib.util

        engine = self.params["engine"]
        needed = ["gptqmodel"] if engine == "gptqmodel" or self.params["quantizer"] == "gptqmodel" else []
        if engine in LEGACY_ENGINES:
            needed.append(LEGACY_ENGINES[engine][0])
        for module in needed:
            if importlib.util.find_spec(module) is None:
                if module == "gptqmodel":
                    raise MethodUnavailable("gptqmodel is not installed (install quantbench's 'gptq' extra)")
                raise MethodUnavailable(
                    f"{LEGACY_ENGINES[engine][1]} is not installed: it is archived upstream and does not import "
                    "under transformers 5; run these cells in an environment that satisfies its pins")
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
        unfit = self.ungroupable(resolved.pretrained)
        if unfit:
            raise MethodUnavailable(unfit)
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

    def ungroupable(self, pretrained: str) -> str | None:
        """Why the pinned kernel cannot run this model's layers in groups of `group_size`, or None.

        GPTQModel's contract: a kernel that does not declare SUPPORTS_AUTO_PADDING needs every layer's input
        width divisible by the group size (SmolLM2's 576 is not by 128, for Marlin); found before quantizing.
        """
        group, kernel = self.params["group_size"], self.params["kernel"]
        config_path = Path(pretrained) / "config.json"
        if group <= 0 or kernel == "auto" or self.params["engine"] != "gptqmodel" or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        heads = config["num_attention_heads"]
        widths = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"],
                  "attention width": heads * (config.get("head_dim") or config["hidden_size"] // heads)}
        unfit = {name: width for name, width in widths.items() if width % group}
        if not unfit:
            return None
        from gptqmodel import BACKEND
        from gptqmodel.quantization import FORMAT, METHOD
        from gptqmodel.utils.importer import get_kernel_for_backend

        fmt = FORMAT.GPTQ if self.params["format"] == "gptq" else FORMAT(self.params["awq_version"])
        try:
            linear = get_kernel_for_backend(BACKEND(kernel), METHOD(self.params["format"]), fmt)
        except (ValueError, KeyError):  # GPTQModel names no such kernel for this format: loading says why
            return None
        if linear.SUPPORTS_AUTO_PADDING:
            return None
        widths_text = ", ".join(f"{name} {width}" for name, width in unfit.items())
        return (f"kernel {kernel!r} ({linear.__name__}) needs layer widths divisible by group_size {group} and does "
                f"not pad; this model's {widths_text} {'is' if len(unfit) == 1 else 'are'} not (a smaller group_size "
                "fits)")

    def checkpoint(self, pretrained: str) -> Path:
        """The folder `load` reads: the user's checkpoint, or the one `prepare` cached for this model."""
        if self.params["checkpoint"]:
            return Path(self.params["checkpoint"]).expanduser()
        if self.prepared is None:
            raise QuantError("the checkpoint was not prepared: run the method's prepare step first")
        return Path(self.prepared["checkpoint"])

    # ---- loading and running -----------------------------------------------------------------------

    def load(self, pretrained: str) -> Any:
        folder = self.checkpoint(pretrained)
        self.quantization_config = check_checkpoint(folder)
        if self.params["engine"] != "gptqmodel":
            return self._load_legacy(folder).eval()
        gptqmodel_environment()
        from gptqmodel import BACKEND, GPTQModel

        wrapped = GPTQModel.load(str(folder), backend=BACKEND(self.params["kernel"]), device=self.device,
                                 dtype=torch_dtype(self.params["dtype"]))
        model = wrapped.model
        model.eval()
        return model

    def _load_legacy(self, folder: Path) -> Any:
        """Load through the archived auto-gptq or autoawq with their own loaders (the kernel as they name it)."""
        kernel = self.params["kernel"]
        if self.params["engine"] == "auto-gptq":
            from auto_gptq import AutoGPTQForCausalLM

            wrapped = AutoGPTQForCausalLM.from_quantized(
                str(folder), device=self.device if self.device == "cpu" else "cuda:0", use_safetensors=True,
                use_triton=kernel == "triton", use_marlin=kernel == "marlin",
                disable_exllama=kernel != "exllama", disable_exllamav2=kernel != "exllama_v2")
        else:
            from awq import AutoAWQForCausalLM

            wrapped = AutoAWQForCausalLM.from_quantized(str(folder), fuse_layers=False, safetensors=True)
            wrapped.model.to(self.device)
        return wrapped.model

    def _layer_prefix(self) -> str:
        engine = self.params["engine"]
        return LEGACY_ENGINES[engine][2] if engine in LEGACY_ENGINES else "gptqmodel.nn_modules.qlinear"

    def warm_up(self, model: Any) -> None:
        """One forward pass, so kernels that compile on first use (Marlin, ExLlama v2, Triton) do it now."""
        import torch

        ids = torch.ones(1, 8, dtype=torch.long, device=model.device)
        with torch.inference_mode():
            model(ids)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def compile_kernels(self, pretrained: str, log: Any) -> dict[str, Any] | None:
        """GPTQModel JIT-compiles its CUDA kernels (Marlin ~2 min) into an on-disk cache at first use: load the
        prepared checkpoint once and run a forward here, so that no measured load time holds a compile."""
        if self.device != "cuda":
            return None
        import time

        import torch

        start = time.perf_counter()
        model = self.load(pretrained)
        self.warm_up(model)
        seconds = time.perf_counter() - start
        del model
        torch.cuda.empty_cache()
        log(f"kernel {self.params['kernel']}: loaded and ran once in {seconds:.1f} s (compiled on first use)")
        return {"kernel_warm_s": seconds}

    def kernels(self, model: Any) -> list[str]:
        """Class names of the quantized linear layers as loaded."""
        prefix = self._layer_prefix()
        return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith(prefix)})

    def verify(self, model: Any, generated: bool) -> None:
        super().verify(model, generated)
        layers = [m for m in model.modules() if type(m).__module__.startswith(self._layer_prefix())]
        if not layers:
            raise RuntimeError(f"no {self.params['engine']} quantized layer in the loaded model: "
                               "it was not loaded quantized")
        if self.params["kernel"] == "auto" or self.params["engine"] != "gptqmodel":
            return  # the legacy engines name kernels by module class only: `kernels` records which ran
        from gptqmodel import BACKEND
        from gptqmodel.utils.backend import normalize_backend
        from gptqmodel.utils.importer import get_kernel_backends

        wanted = normalize_backend(BACKEND(self.params["kernel"]), quant_method=self.params["format"])
        fallen = sorted({type(m).__name__ for m in layers if wanted not in get_kernel_backends(type(m))})
        if fallen:
            raise RuntimeError(f"kernel {self.params['kernel']!r} was asked for, but layers run {', '.join(fallen)}")

    def describe(self, model: Any) -> dict[str, Any]:
        # the engines' versions are in every result's environment (hardware.TRACKED_PACKAGES)
        described = {**super().describe(model), "kernels": self.kernels(model),
                     "quantization_config": getattr(self, "quantization_config", None)}
        if self.prepared:
            described["checkpoint"] = {k: v for k, v in self.prepared.items() if k != "fresh"}
        return described
