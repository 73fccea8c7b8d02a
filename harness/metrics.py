"""The figures the suite records: their units, directions and default tolerances.

Every metric declares whether higher or lower is better, so the gate knows which way a change is a
regression. Tolerances are relative (0.05 = 5 %) and can be overridden per metric and method in the
matrix file or on the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    """What one metric is: its unit, its direction, its default relative tolerance and its valid range.

    Every figure is a count, a rate, a size, a time or a fraction: none is negative, fractions do not exceed
    1 and a perplexity is at least 1. A value outside [minimum, maximum], or not finite, is no measurement.
    """

    name: str
    unit: str
    higher_is_better: bool
    tolerance: float
    help: str
    floor: float = 0.0  # changes smaller than this (in the metric's unit) are below what one measurement resolves
    exact: bool = False  # a count that is deterministic: any change either way fails (tolerance unused)
    # decided by the weights and the library versions, not by the machine: a CPU cell's figure is compared
    # with another CPU key's baseline where those match (harness/baselines.py: BaselineStore.gate_baseline)
    accuracy: bool = False
    minimum: float = 0.0
    maximum: float = math.inf

    def range_problem(self, value: float) -> str | None:
        """Why `value` cannot be a figure of this metric (not finite, or outside its range); None when it can."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if not self.minimum <= value <= self.maximum:
            upper = "" if math.isinf(self.maximum) else f" to {self.maximum:g}"
            return f"{value!r} is outside the range of {self.name} ({self.minimum:g}{upper})"
        return None


TASK_PREFIX = "task:"  # lm-eval figures: task:<task>:<metric>, e.g. task:quantbench_word_order:acc


class _Metrics(dict):
    """The known metrics; names `task:<task>:<metric>` (lm-eval results) are known too, higher is better."""

    def __missing__(self, name: str) -> MetricSpec:
        if isinstance(name, str) and name.startswith(TASK_PREFIX) and name.count(":") == 2 \
                and all(name.split(":")[1:]):
            # a task metric may be an accuracy or a perplexity: only its sign is known
            return MetricSpec(name, "", True, 0.02, "lm-eval task metric on the loaded model", floor=0.01,
                              accuracy=True)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        if super().__contains__(name):
            return True
        try:
            self[name]
        except KeyError:
            return False
        return True


METRICS: dict[str, MetricSpec] = _Metrics({
    m.name: m
    for m in (
        MetricSpec("prefill_tokens_per_s", "tokens/s", True, 0.05,
                   "batch x prompt tokens over the time to first token"),
        MetricSpec("decode_tokens_per_s", "tokens/s", True, 0.05,
                   "batch x (new tokens - 1) over the time from the first new token to the last"),
        MetricSpec("ttft_ms", "ms", False, 0.10, "from the generate() call to the first new token on the host"),
        # device time (harness/measure/device.py): what the kernels cost, without the host's loop; between
        # processes and cards of one GPU model it moves by tenths of a percent where generate() moves 15-25 %
        MetricSpec("decode_device_tokens_per_s", "tokens/s", True, 0.02,
                   "batch x steps over the device time of a burst of captured decode steps (CUDA events)"),
        MetricSpec("prefill_device_tokens_per_s", "tokens/s", True, 0.02,
                   "batch x prompt tokens over the device time of the captured prefill forward"),
        MetricSpec("decode_kernels_per_step", "kernels", False, 0.0,
                   "kernels one decode step launches (one profiled step); a fallback kernel changes it", exact=True),
        # generate()'s decode step less the device's: the host's share, which a transformers release can move
        # a difference of two timings: where generate() runs the same graph as fast, noise can make it negative
        MetricSpec("host_overhead_ms_per_token", "ms", False, 0.50,
                   "generate()'s time per decode step (one new token per row) minus the device's step time",
                   floor=0.05, minimum=-math.inf),
        MetricSpec("peak_vram_mib", "MiB", False, 0.05,
                   "torch max allocated on the device while the batch ran (weights, KV cache, activations)"),
        MetricSpec("peak_nvml_mib", "MiB", False, 0.05,
                   "the process's device memory as the driver (NVML) sees it, peak while the batch ran"),
        # RSS counts file-backed pages (libraries, mapped weights) as far as the page cache holds them: the same
        # run reads ~70 MiB more in a freshly installed environment, so only gross changes fail
        MetricSpec("peak_rss_mib", "MiB", False, 0.50, "peak resident set size of the worker process", floor=32.0),
        MetricSpec("peak_anon_rss_mib", "MiB", False, 0.10,
                   "peak anonymous resident memory of the worker (heap, tensors; no file-backed pages)", floor=16.0),
        # load time swings with the OS page cache (cold disk vs cached weights): only gross changes fail
        MetricSpec("load_s", "s", False, 3.0, "wall time to load (and quantize) the model onto the device",
                   floor=2.0),
        # quantization cost: measured when the checkpoint is built (a cached checkpoint reports none)
        MetricSpec("quantize_s", "s", False, 0.50, "wall time of the quantization (GPTQ/AWQ with calibration)",
                   floor=5.0),
        MetricSpec("quantize_peak_vram_mib", "MiB", False, 0.10, "torch peak device memory while quantizing",
                   floor=64.0),
        MetricSpec("quantize_peak_anon_rss_mib", "MiB", False, 0.25,
                   "peak anonymous resident memory while quantizing on the CPU", floor=64.0),
        MetricSpec("ppl", "", False, 0.01, "token-level perplexity on the held-out evaluation tokens", minimum=1.0,
                   accuracy=True),
        MetricSpec("ppl_ratio", "", False, 0.01, "PPL(method) / PPL(reference) on the same ids", accuracy=True),
        MetricSpec("kld_mean", "nats", False, 0.10,
                   "mean KL(reference || method) per scored token (top-k + rest bucket)", floor=1e-4, accuracy=True),
        MetricSpec("kld_p99", "nats", False, 0.10, "99th percentile of the per-token KL divergence", floor=1e-3,
                   accuracy=True),
        MetricSpec("kld_max", "nats", False, 0.25, "largest per-token KL divergence", floor=1e-2, accuracy=True),
        MetricSpec("top1_agreement", "", True, 0.01,
                   "share of positions where method and reference pick the same top token", maximum=1.0,
                   accuracy=True),
    )
})


# the figures harness/measure/device.py makes: read under one device-timing protocol (harness/baselines.py)
DEVICE_METRICS = ("decode_device_tokens_per_s", "prefill_device_tokens_per_s", "decode_kernels_per_step",
                  "host_overhead_ms_per_token")


def metric(name: str) -> MetricSpec:
    """Return the spec of `name`, or raise a KeyError that lists the known metrics."""
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(sorted(METRICS))
        raise KeyError(f"unknown metric {name!r}; known metrics: {known}") from None
