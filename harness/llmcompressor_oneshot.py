"""Write a compressed-tensors checkpoint of a Hugging Face folder with llmcompressor's `oneshot`, data-free.

Run by harness/compressed.py with the interpreter of an environment that has llmcompressor (it pins another
compressed-tensors than vLLM does, so it cannot share vLLM's environment):

    python harness/llmcompressor_oneshot.py SOURCE OUT SCHEME GROUP_SIZE

It imports nothing from quantbench. SCHEME is one of SCHEMES below; every Linear layer but the output head is
quantized. Data-free: weights are rounded to nearest with min-max scales (no calibration set), and W8A8's
activations are quantized per token at run time, which needs no calibration either. On stdout, the last line
is a JSON record of what was built.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version


def scheme(name: str, group_size: int) -> dict:
    """llmcompressor's config groups for `name`: int weights (and for w8a8 int activations) on every Linear."""
    if name == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
        return {"group_0": {"targets": ["Linear"], "weights": weights}}
    if name == "w8a16":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        return {"group_0": {"targets": ["Linear"], "weights": weights}}
    if name == "w8a8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}}
    raise SystemExit(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")


SCHEMES = ("w4a16", "w8a16", "w8a8")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    source, out, name, group_size = argv[0], argv[1], argv[2], int(argv[3])
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    started = time.perf_counter()
    recipe = QuantizationModifier(config_groups=scheme(name, group_size), ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    record = {"scheme": name, "group_size": group_size if name == "w4a16" else None,
              "quantize_s": time.perf_counter() - started, "llmcompressor": version("llmcompressor"),
              "compressed_tensors": version("compressed-tensors"), "torch": torch.__version__,
              "transformers": version("transformers")}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
