"""Roofline efficiency of decode: the weight bytes a step reads over what the GPU's memory can deliver.

Batch-B decode reads every weight once per step and makes B tokens, so a cell achieves
`decode / B * weights_bytes` bytes per second of weight traffic, where `decode` is the device's own figure
(`decode_device_tokens_per_s`: what the kernels cost) when the cell has one, else generate()'s (which holds
the host's loop as well, so its share is lower than the kernels reach). Over the card's memory bandwidth
that is the share of the bandwidth bound reached. KV-cache reads are not counted (at 128 + 64 tokens they are
a few percent of a 7B model's weights at batch 1, more at batch 32), so the figure is a lower bound there.
"""

from __future__ import annotations

from typing import Any

# Memory bandwidth from the vendors' data sheets, GB/s (1e9 bytes/s); matched in order against the GPU name.
BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("RTX 3070", 448.0),
)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def bandwidth(gpu: dict[str, Any] | None) -> tuple[float, str] | None:
    """The GPU's memory bandwidth in bytes/s and where it comes from: the data-sheet table, else NVML's
    maximum memory clock and bus width (double data rate), else None."""
    if not gpu:
        return None
    name = gpu.get("name", "")
    for pattern, gbps in BANDWIDTH_GBPS:
        if pattern.lower() in name.lower():
            return gbps * 1e9, f"data sheet ({pattern}: {gbps:.0f} GB/s)"
    clock, width = gpu.get("max_memory_clock_mhz"), gpu.get("memory_bus_width_bits")
    if clock and width:
        value = clock * 1e6 * 2 * width / 8
        return value, f"NVML: {clock} MHz x 2 x {width} bit = {value / 1e9:.0f} GB/s"
    return None


def dense_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama-family model from its config (embeddings, attention, MLP, norms, head)."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    mlp = 3 * hidden * config["intermediate_size"]
    head = 0 if config.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden + head


def weights_bytes(model_cell: Any) -> tuple[float, str] | None:
    """The bytes of weights one decode step reads: as the worker measured them after loading, or, for
    unquantized torch weights of a shipped architecture, its parameter count times the dtype's size."""
    if model_cell is None:
        return None
    measured = model_cell.details.get("weights_bytes")
    if measured:
        return float(measured), "measured after loading"
    method = (model_cell.config.get("method") or {})
    params = method.get("params") or {}
    arch = (model_cell.details.get("model") or {}).get("arch")
    if method.get("backend") == "torch" and arch and params.get("dtype") in DTYPE_BYTES:
        from harness.models import ModelError, arch_config

        try:
            count = dense_parameters(arch_config(arch))
        except (ModelError, KeyError):
            return None
        return float(count * DTYPE_BYTES[params["dtype"]]), f"{count / 1e9:.2f}B parameters x {params['dtype']}"
    return None


def efficiency(cell: Any, model_cell: Any, measured: tuple[float, str] | None = None,
               figure: str | None = None) -> float | None:
    """Achieved weight bytes/s of a batch size's decode over the GPU's bandwidth (None: not computable).

    `measured`: the bandwidth measured on this hardware (harness/measure/bandwidth.py), used instead of the
    data sheet's. `figure`: the decode figure to use (default: `decode_figure(cell)`).
    """
    name = figure or decode_figure(cell)
    if name is None or cell is None or name not in cell.figures or not cell.batch_size:
        return None
    size = weights_bytes(model_cell)
    limit = measured or bandwidth((cell.hardware or {}).get("gpu"))
    if size is None or limit is None:
        return None
    steps_per_s = cell.figures[name].value / cell.batch_size
    return steps_per_s * size[0] / limit[0]


def decode_figure(cell: Any) -> str | None:
    """The decode figure a roofline share is computed from: the device's own where the cell has it, else
    generate()'s end-to-end figure, else None."""
    for name in ("decode_device_tokens_per_s", "decode_tokens_per_s"):
        if cell is not None and name in cell.figures:
            return name
    return None
