"""Batch consistency: a prompt gives the same greedy tokens in a left-padded batch as alone.

Batched decoding bugs (GPTQ-for-LLaMa's left-padding bug garbled batched output) show here in any backend.
Prompts of different lengths run alone and together; the first step where a row's tokens differ is a
failure unless the lone run's two candidates were a near tie there (their logits within `tie_margin`),
since kernels may legitimately reduce in another order at another batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TIE_MARGIN = 0.05  # logits this close are a tie whose order batching may flip


def prompt_lengths(longest: int, rows: int = 4) -> list[int]:
    """Distinct prompt lengths from `longest` down, so a batch needs padding on every row but one."""
    step = max(longest // (2 * rows), 1)
    return [max(longest - i * step, 2) for i in range(rows)]


def check(greedy: Callable[[list[list[int]], int], tuple[list[list[int]], Any]], prompts: list[list[int]],
          new_tokens: int, tie_margin: float = TIE_MARGIN) -> dict[str, Any]:
    """Run each prompt alone and all together; report the first real divergence, if any."""
    batched, batched_scores = greedy(prompts, new_tokens)
    rows = []
    for index, prompt in enumerate(prompts):
        alone, alone_scores = greedy([prompt], new_tokens)
        alone, alone_scores = alone[0], alone_scores[0]
        row = {"row": index, "prompt_tokens": len(prompt), "consistent": True, "steps": new_tokens}
        for step, (a, b) in enumerate(zip(alone, batched[index], strict=True)):
            if a == b:
                continue
            margin = float(alone_scores[step, a] - alone_scores[step, b])
            row.update(first_divergence=step, alone_token=a, batched_token=b, logit_margin=margin,
                       batched_logit_gap=float((batched_scores[index, step] - alone_scores[step]).abs().max()))
            row["consistent"] = margin <= tie_margin
            row["tie"] = row["consistent"]
            break
        rows.append(row)
    return {"consistent": all(r["consistent"] for r in rows), "new_tokens": new_tokens,
            "tie_margin": tie_margin, "rows": rows}


def describe_failure(report: dict[str, Any]) -> str:
    """One line per inconsistent row: where it diverged and by how much."""
    lines = []
    for row in report["rows"]:
        if not row["consistent"]:
            lines.append(f"row {row['row']} ({row['prompt_tokens']} prompt tokens) diverges at new token "
                         f"{row['first_divergence']}: alone {row['alone_token']}, batched {row['batched_token']} "
                         f"(alone's logit margin {row['logit_margin']:.3f} > tie margin {report['tie_margin']})")
    return "; ".join(lines)
