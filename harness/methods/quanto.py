"""optimum-quanto: int8, int4 and int2 weights through transformers' QuantoConfig (activations stay in `dtype`)."""

from __future__ import annotations

from typing import Any

from harness.methods.base import DTYPES, Method, Param
from harness.methods.kvcache import KV_PARAMS, KVCacheMixin, _tensor_bytes


class QuantoMethod(KVCacheMixin, Method):
    """Weights quantized on load by optimum-quanto's QLinear (per-row int8; int4 / int2 in groups that quanto
    sizes from each layer's width, 128 down to 32); run eagerly, on a CPU or CUDA."""

    NAME = "quanto"
    MARKER = "quanto"
    PARAMS = {
        # transformers 5.17 refuses quanto's activation quantization ("We don't support quantizing the
        # activations with transformers library"), so there is no activations parameter
        "weights": Param(str, "int8", "weight type: int8, int4 or int2", ("int8", "int4", "int2")),
        "dtype": Param(str, "bfloat16", "dtype of the activations and of the modules left unquantized", DTYPES),
        **KV_PARAMS,
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("optimum.quanto",)

    def no_autograd(self) -> Any:
        """`torch.no_grad()`: under `torch.inference_mode()` quanto's int4 and int2 weights fail at their first
        matmul ("Cannot set version_counter for inference tensor", the transpose of a QBitsTensor)."""
        import torch

        return torch.no_grad()

    def device_timing_unavailable(self) -> str | None:
        if self.params["weights"] != "int8":
            return ("the device timer runs in torch.inference_mode(), where optimum-quanto's int4 and int2 "
                    "weights fail ('Cannot set version_counter for inference tensor')")
        return super().device_timing_unavailable()

    def warm_up(self, model: Any) -> None:
        """Build quanto's extension for this device (C++ on a CPU, CUDA on a GPU) before the first forward:
        torch compiles it with ninja at first use, into the package's folder, and loads it from there later."""
        from optimum.quanto.library.extensions import get_extension, is_extension_available

        name = "quanto_cuda" if self.device == "cuda" else "quanto_cpp"
        if is_extension_available(name):
            get_extension(name).lib  # noqa: B018 - the property builds or loads the extension

    def quantization_config(self) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig(weights=self.params["weights"])

    def load(self, pretrained: str) -> Any:
        return self.load_transformers(pretrained, self.quantization_config())

    def verify(self, model: Any, generated: bool) -> None:
        """Every linear layer of the decoder is a quanto QLinear frozen to quantized weights of the asked type."""
        super().verify(model, generated)
        import torch
        from optimum.quanto import QModuleMixin, QTensor

        head = model.get_output_embeddings()
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
        plain = [name for name, m in linears if not isinstance(m, QModuleMixin)]
        if plain:
            raise RuntimeError(f"optimum-quanto left {len(plain)} linear layer(s) unquantized ({plain[0]}, ...)")
        unfrozen = [name for name, m in linears if not isinstance(m.weight, QTensor)]
        if unfrozen:  # an unfrozen QLinear quantizes its float weight again at every forward
            raise RuntimeError(f"optimum-quanto left {unfrozen[0]} (and {len(unfrozen) - 1} more) unfrozen")
        wrong = [name for name, m in linears if m.weight_qtype.name != f"q{self.params['weights']}"]
        if wrong:
            raise RuntimeError(f"{wrong[0]} holds {dict(linears)[wrong[0]].weight_qtype.name} weights, "
                               f"asked for q{self.params['weights']}")

    def weights_bytes(self, model: Any) -> int | None:
        """Bytes of the loaded weights as stored: a frozen quanto weight counts its packed data and scales."""
        return _tensor_bytes([*model.parameters(), *model.buffers()], set())

    def describe(self, model: Any) -> dict[str, Any]:
        from importlib.metadata import version

        from optimum.quanto import QModuleMixin

        groups = sorted({m.weight_group_size for m in model.modules()
                         if isinstance(m, QModuleMixin) and m.weight_group_size is not None})
        return {**super().describe(model), "optimum_quanto": version("optimum-quanto"),
                "quantization_config": self.quantization_config().to_dict(), "weight_group_sizes": groups}
