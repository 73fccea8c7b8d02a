"""torchao: int8 / int4 / float8 weights (and dynamic int8 / float8 activations) through transformers' TorchAoConfig."""

from __future__ import annotations

from typing import Any

from harness.config import MatrixError
from harness.methods.base import DTYPES, MODE, CompilableMethod, MethodUnavailable, Param
from harness.methods.kvcache import KV_PARAMS, KVCacheMixin

# quant -> (what it is, minimum CUDA compute capability, runs on a CPU)
QUANTS: dict[str, tuple[str, tuple[int, int], bool]] = {
    "int8-weight": ("Int8WeightOnlyConfig: int8 weights per row, activations in `dtype`", (7, 0), True),
    "int8-dynamic": ("Int8DynamicActivationInt8WeightConfig: int8 weights per row, activations quantized to "
                     "int8 per token at run time", (7, 0), True),
    "int4-weight": ("Int4WeightOnlyConfig(int4_packing_format='tile_packed_to_4d'): int4 weights in groups, "
                    "tinygemm kernel", (8, 0), False),
    "intx4-weight": ("IntxWeightOnlyConfig(weight_dtype=torch.int4, PerGroup): int4 weights in groups, "
                     "unpacked to int8, dequantized in the matmul", (7, 0), True),
    "float8-weight": ("Float8WeightOnlyConfig: float8 e4m3 weights per row", (8, 9), True),
    "float8-dynamic": ("Float8DynamicActivationFloat8WeightConfig(PerRow): float8 weights and activations "
                       "per row, float8 matmul", (8, 9), False),
}
# What torchao 0.18 answered on a CPU (docs/evidence/cpu-amd-epyc-2c/torchao-probe.log)
INT4_CPU = ("torchao 0.18's Int4WeightOnlyConfig does not run on a CPU: its tile_packed_to_4d layout is tinygemm on "
            "CUDA ('Torch not compiled with CUDA enabled'), its default layout needs the mslk package ('Requires "
            "mslk >= 1.0.0'; PyPI has a 0.0.0 placeholder); quant = 'intx4-weight' is int4 on a CPU")
FLOAT8_DYNAMIC_CPU = ("torchao 0.18's float8 dynamic activation quantization refuses a CPU ('Float8 dynamic "
                      "quantization requires CUDA compute capability >=8.9 or MI300+ or XPU')")


class TorchAoMethod(KVCacheMixin, CompilableMethod):
    """Weights quantized on load by torchao's tensor subclasses; eager or compiled (`mode`), CPU or CUDA."""

    NAME = "torchao"
    MARKER = "torchao"
    PARAMS = {
        "quant": Param(str, "int8-weight", "int8-weight, int8-dynamic, int4-weight (CUDA), intx4-weight, "
                       "float8-weight, float8-dynamic (CUDA)", tuple(QUANTS)),
        "group_size": Param(int, 128, "int4-weight, intx4-weight: weights per quantization group"),
        "dtype": Param(str, "bfloat16", "dtype of the activations and of the modules left unquantized", DTYPES),
        "mode": MODE,
        **KV_PARAMS,
    }

    @classmethod
    def requires(cls) -> tuple[str, ...]:
        return ("torchao",)

    @classmethod
    def validate(cls, params: dict[str, Any], where: str) -> None:
        super().validate(params, where)
        if params.get("quant") == "int4-weight" and params.get("dtype", "bfloat16") != "bfloat16":
            raise MatrixError(f"{where}.dtype: int4-weight (Int4TilePackedTo4dTensor) runs in bfloat16 only, "
                              f"got {params.get('dtype')!r}")

    def check_available(self) -> None:
        super().check_available()
        quant = self.params["quant"]
        if self.device == "cpu":
            if quant == "int4-weight":
                raise MethodUnavailable(INT4_CPU)
            if quant == "float8-dynamic":
                raise MethodUnavailable(FLOAT8_DYNAMIC_CPU)
            return
        import torch

        need = QUANTS[quant][1]
        have = torch.cuda.get_device_capability()
        if have < need:
            raise MethodUnavailable(f"torchao {quant} needs CUDA compute capability {need[0]}.{need[1]} or "
                                    f"newer; this GPU has {have[0]}.{have[1]}")

    def ao_config(self) -> Any:
        """The torchao config object of `quant` (TorchAoConfig refuses strings)."""
        import torch
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            PerRow,
        )

        quant, group = self.params["quant"], self.params["group_size"]
        if quant == "int8-weight":
            return Int8WeightOnlyConfig()
        if quant == "int8-dynamic":
            return Int8DynamicActivationInt8WeightConfig()
        if quant == "int4-weight":
            return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        if quant == "intx4-weight":
            return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
        if quant == "float8-weight":
            return Float8WeightOnlyConfig()
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    def load(self, pretrained: str) -> Any:
        from transformers import TorchAoConfig

        return self.load_transformers(pretrained, TorchAoConfig(quant_type=self.ao_config()))

    def verify(self, model: Any, generated: bool) -> None:
        """Every linear layer of the decoder holds a torchao tensor: torchao leaves a weight whose width the
        group size does not divide in full precision, with only a log line."""
        super().verify(model, generated)
        import torch
        from torchao.utils import TorchAOBaseTensor

        head = model.get_output_embeddings()
        plain = [name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and module is not head
                 and not isinstance(module.weight, TorchAOBaseTensor)]
        if plain:
            raise RuntimeError(f"torchao left {len(plain)} linear layer(s) unquantized ({plain[0]}, ...): "
                               f"for {self.params['quant']}, group_size {self.params['group_size']} must divide "
                               "every layer's input width")

    def weights_bytes(self, model: Any) -> int | None:
        """Bytes of the loaded weights, a torchao tensor counted as its inner tensors (qdata, scales, zeros)."""
        from harness.methods.kvcache import _tensor_bytes

        return _tensor_bytes([*model.parameters(), *model.buffers()], set())

    def describe(self, model: Any) -> dict[str, Any]:
        import torchao

        weight_types = sorted({type(p).__name__ for p in model.parameters()})
        return {**super().describe(model), "torchao": torchao.__version__, "config": QUANTS[self.params["quant"]][0],
                "weight_tensor_types": weight_types}
