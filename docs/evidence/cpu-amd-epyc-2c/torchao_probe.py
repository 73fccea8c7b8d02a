"""Which torchao 0.18 / optimum-quanto 0.2.7 settings and quantized KV caches run on this CPU, through transformers.

Run: PYTHONPATH=<checkout>:<torchao and quanto> python docs/evidence/cpu-amd-epyc-2c/torchao_probe.py
Loads the embedded model with each config, generates 8 greedy tokens, prints what ran or the first line of the error.
"""

import time
import traceback

import torch
from transformers import AutoModelForCausalLM, QuantoConfig, TorchAoConfig

from harness.config import ModelSpec
from harness.models import resolve


def attempt(name, load, **generate):
    started = time.perf_counter()
    try:
        model = load().eval()
        ids = torch.arange(1, 65).view(1, -1)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False, pad_token_id=0, **generate)
        types = sorted({type(p).__name__ for p in model.parameters()})
        print(f"OK   {name}: {out.shape[1] - 64} tokens, weights {types}, {time.perf_counter() - started:.1f} s",
              flush=True)
    except Exception as exc:  # the probe reports every failure and goes on
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        traceback.print_exc(limit=-3)


def main():
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

    folder = resolve(ModelSpec(name="embedded", source="embedded"), log=lambda m: None).pretrained
    print(f"torch {torch.__version__}", flush=True)
    configs = {
        "torchao Int8WeightOnlyConfig": Int8WeightOnlyConfig(),
        "torchao Int8DynamicActivationInt8WeightConfig": Int8DynamicActivationInt8WeightConfig(),
        "torchao Int4WeightOnlyConfig(group_size=64) default packing": Int4WeightOnlyConfig(group_size=64),
        "torchao Int4WeightOnlyConfig(group_size=64, tile_packed_to_4d)":
            Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"),
        "torchao IntxWeightOnlyConfig(int4, PerGroup(64))":
            IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
        "torchao Float8WeightOnlyConfig": Float8WeightOnlyConfig(),
        "torchao Float8DynamicActivationFloat8WeightConfig(PerRow)":
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }
    for dtype in (torch.float32, torch.bfloat16):
        for name, config in configs.items():
            attempt(f"{name} {dtype}", lambda c=config, d=dtype: AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=TorchAoConfig(quant_type=c), dtype=d, device_map="cpu"))
    for weights in ("int8", "int4", "int2"):
        attempt(f"quanto weights={weights} float32", lambda w=weights: AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=QuantoConfig(weights=w), dtype=torch.float32, device_map="cpu"))
    attempt("quanto activations=int8", lambda: AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=QuantoConfig(weights="int8", activations="int8"), dtype=torch.float32,
        device_map="cpu"))
    for backend, bits in (("quanto", 4), ("quanto", 2), ("hqq", 8), ("hqq", 4)):
        attempt(f"quantized KV cache {backend} {bits} bit float32",
                lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu"),
                cache_implementation="quantized",
                cache_config={"backend": backend, "nbits": bits, "q_group_size": 64, "residual_length": 32})


if __name__ == "__main__":
    main()
