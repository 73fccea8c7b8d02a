"""Batch consistency: a prompt gives the same greedy tokens in a left-padded batch as alone.

Batched decoding bugs (GPTQ-for-LLaMa's left-padding bug garbled batched output) show here in any backend.
Prompts of different lengths run alone and together; the first step where a row's tokens differ is a
failure unless it is explained by arithmetic rather than by a bug:
- a near tie: the lone run's two candidates were within `tie_margin`, or within two units of the last place
  of the dtype the logits were computed in (a bf16 logit near 10 moves in steps of 0.0625), so a kernel that
  reduces in another order at another batch size may flip them;
- batch-variant numerics: the batched logits at that step differ from the lone ones by at most
  `logit_tolerance` of the logits' standard deviation, or by at most `VARIANT_ULPS` units in the last place
  of the logits' dtype at the step's largest logit (a bf16 kernel picked for another batch shape rounds
  differently, and after a dozen steps that shows as a few bf16 steps, which on the flat logits of random
  synthetic weights is over a tenth of their spread). A padding bug changes the whole distribution, by about
  its standard deviation or more. A method whose algorithm is batch-variant declares a larger
  `logit_tolerance` (Method.consistency_tolerance: LLM.int8 picks its fp16 outlier columns from the whole
  batch, so a row's arithmetic depends on its neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

TIE_MARGIN = 0.05  # logits this close are a tie whose order batching may flip
LOGIT_TOLERANCE = 0.1  # largest batched-vs-alone logit change, in standard deviations of the logits
VARIANT_ULPS = 8  # or in units in the last place of the logits' dtype


# machine epsilon and smallest normal number of the dtypes logits are computed in (torch.finfo's values)
FLOAT_FORMATS = {"float32": (2.0**-23, 2.0**-126), "float16": (2.0**-10, 2.0**-14), "bfloat16": (2.0**-7, 2.0**-126),
                 "float64": (2.0**-52, 2.0**-1022)}


def dtype_name(dtype: Any) -> str:
    """"float16" for torch.float16, numpy's float16 or "float16"; float32 when None."""
    name = "float32" if dtype is None else str(getattr(dtype, "name", dtype)).removeprefix("torch.")
    if name not in FLOAT_FORMATS:
        raise ValueError(f"unknown logits dtype {dtype!r}; known: {', '.join(FLOAT_FORMATS)}")
    return name


def spacing(dtype: Any, value: float) -> float:
    """The distance between `value` and the next number representable in `dtype` (one unit in the last place)."""
    eps, tiny = FLOAT_FORMATS[dtype_name(dtype)]
    magnitude = max(abs(value), tiny)
    return eps * 2.0 ** math.floor(math.log2(magnitude))


def prompt_lengths(longest: int, rows: int = 4) -> list[int]:
    """Distinct prompt lengths from `longest` down, so a batch needs padding on every row but one."""
    step = max(longest // (2 * rows), 1)
    return [max(longest - i * step, 2) for i in range(rows)]


def check(greedy: Callable[[list[list[int]], int], tuple[list[list[int]], Any]], prompts: list[list[int]],
          new_tokens: int, tie_margin: float = TIE_MARGIN, logits_dtype: Any = None,
          logit_tolerance: float = LOGIT_TOLERANCE) -> dict[str, Any]:
    """Run each prompt alone and all together; report the first real divergence, if any.

    `logits_dtype` is the dtype the model computed its logits in (float32 when None). Scores may be torch
    tensors or numpy arrays; they are compared as float32 numpy arrays.
    """
    import numpy as np

    from harness.measure.accuracy import as_float32

    dtype = dtype_name(logits_dtype)
    batched, batched_scores = greedy(prompts, new_tokens)
    batched_scores = as_float32(batched_scores)
    rows = []
    for index, prompt in enumerate(prompts):
        alone, alone_scores = greedy([prompt], new_tokens)
        alone, alone_scores = alone[0], as_float32(alone_scores)[0]
        row = {"row": index, "prompt_tokens": len(prompt), "consistent": True, "steps": new_tokens}
        for step, (a, b) in enumerate(zip(alone, batched[index], strict=True)):
            if a == b:
                continue
            margin = float(alone_scores[step, a] - alone_scores[step, b])
            threshold = max(tie_margin, 2 * spacing(dtype, float(alone_scores[step, a])))
            # min_new_tokens masks EOS with -inf
            both = np.isfinite(alone_scores[step]) & np.isfinite(batched_scores[index, step])
            gap = float(np.abs(batched_scores[index, step][both] - alone_scores[step][both]).max()) if both.any() \
                else None
            scale = float(alone_scores[step][both].std(ddof=1)) if int(both.sum()) > 1 else 0.0
            relative = gap / scale if gap is not None and scale > 0 else None
            top = float(np.abs(alone_scores[step][both]).max()) if both.any() else 0.0
            ulps = gap / spacing(dtype, top) if gap is not None else None
            row.update(first_divergence=step, alone_token=a, batched_token=b, logit_margin=margin,
                       tie_threshold=threshold, batched_logit_gap=gap, relative_gap=relative, gap_ulps=ulps)
            row["tie"] = margin <= threshold
            row["close"] = (relative is not None and relative <= logit_tolerance) or \
                (ulps is not None and ulps <= VARIANT_ULPS)
            row["consistent"] = row["tie"] or row["close"]
            break
        rows.append(row)
    return {"consistent": all(r["consistent"] for r in rows), "new_tokens": new_tokens,
            "tie_margin": tie_margin, "logit_tolerance": logit_tolerance, "variant_ulps": VARIANT_ULPS,
            "logits_dtype": dtype, "rows": rows}


def describe_failure(report: dict[str, Any]) -> str:
    """One line per inconsistent row: where it diverged and by how much."""
    lines = []
    for row in report["rows"]:
        if not row["consistent"]:
            lines.append(f"row {row['row']} ({row['prompt_tokens']} prompt tokens) diverges at new token "
                         f"{row['first_divergence']}: alone {row['alone_token']}, batched {row['batched_token']} "
                         f"(alone's logit margin {row['logit_margin']:.3f} > tie threshold "
                         f"{row.get('tie_threshold', report['tie_margin']):.3f}; batched logits moved "
                         f"{_relative(row)} standard deviations > {report.get('logit_tolerance', LOGIT_TOLERANCE)}"
                         f"{_ulps(row, report)})")
    return "; ".join(lines)


def _relative(row: dict[str, Any]) -> str:
    value = row.get("relative_gap")
    return "an unknown number of" if value is None else f"{value:.3f}"


def _ulps(row: dict[str, Any], report: dict[str, Any]) -> str:
    value = row.get("gap_ulps")
    return "" if value is None else f", {value:.1f} units of {report['logits_dtype']} > {report['variant_ulps']}"
