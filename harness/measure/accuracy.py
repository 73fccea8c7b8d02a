"""Token-level perplexity with a fixed, recorded protocol (the one GPTQ/AWQ papers and llama.cpp use).

Windows of up to `context_tokens` ids advance by `stride`; each window scores only the tokens no earlier
window scored. Consecutive windows overlap by max(context - stride, 1) ids, so every evaluation token after
the first is predicted exactly once, and all but the first window's tokens see at least that much context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.config import AccuracyConfig


@dataclass(frozen=True)
class Perplexity:
    """A perplexity figure with its standard error and the protocol that produced it."""

    ppl: float
    stderr: float  # delta method: ppl x standard error of the mean token NLL
    nll_mean: float
    scored_tokens: int
    windows: int
    protocol: dict[str, Any]


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `n_tokens` ids."""
    spans = []
    overlap = max(context - stride, 1)
    begin, scored_until = 0, 1  # the first token has no context and is never scored
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        spans.append((begin, end, scored_until))
        scored_until = end
        begin = end - overlap
    return spans


def perplexity(logits: Callable[[list[int]], Any], ids: list[int], accuracy: AccuracyConfig,
               observers: Sequence[Any] = ()) -> Perplexity:
    """Score `ids` under the protocol above; `logits(window)` gives float32 logits [len(window), vocab].

    Each observer's `add(log_probs, nll)` receives every window's log-probabilities and token NLLs at
    its scored positions, in order (harness.measure.divergence collects and compares them).
    """
    import torch

    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 evaluation tokens")
    spans = windows(len(ids), accuracy.context_tokens, accuracy.stride)
    nll_sum = 0.0
    nll_sq_sum = 0.0
    count = 0
    for begin, end, first_scored in spans:
        window_logits = logits(ids[begin:end])
        # logits at position p predict token p + 1
        targets = torch.tensor(ids[first_scored:end], dtype=torch.long, device=window_logits.device)
        log_probs = torch.log_softmax(window_logits[first_scored - begin - 1:end - begin - 1].float(), dim=-1)
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).double()
        for observer in observers:
            observer.add(log_probs, nll)
        nll_sum += nll.sum().item()
        nll_sq_sum += (nll * nll).sum().item()
        count += nll.numel()
    mean = nll_sum / count
    variance = max(nll_sq_sum / count - mean * mean, 0.0) * count / max(count - 1, 1)
    ppl = math.exp(mean)
    return Perplexity(
        ppl=ppl,
        stderr=ppl * math.sqrt(variance / count),
        nll_mean=mean,
        scored_tokens=count,
        windows=len(spans),
        protocol={"context_tokens": accuracy.context_tokens, "stride": accuracy.stride,
                  "eval_tokens": len(ids), "scored_tokens": count, "logits_dtype": "float32"},
    )
