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


def as_float32(logits: Any) -> Any:
    """A numpy float32 array of `logits`: a torch tensor (on any device, in any dtype) or an array."""
    import numpy as np

    if hasattr(logits, "detach"):  # torch, without importing it: an engine's process may never load torch
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax of a 2-D array, computed in float64 and returned as float32."""
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)


def perplexity(logits: Callable[[list[int]], Any], ids: list[int], accuracy: AccuracyConfig,
               observers: Sequence[Any] = ()) -> Perplexity:
    """Score `ids` under the protocol above; `logits(window)` gives logits [len(window), vocab].

    Logits may be a torch tensor or a numpy array; the scoring is numpy, in float32, on the host, the same
    for every backend (and torch is never imported for an engine that does not use it). Each observer's
    `add(log_probs, nll)` receives every window's float32 log-probabilities and float64 token NLLs at its
    scored positions, in order (harness.measure.divergence collects and compares them).
    """
    import numpy as np

    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 evaluation tokens")
    spans = windows(len(ids), accuracy.context_tokens, accuracy.stride)
    nll_sum = 0.0
    nll_sq_sum = 0.0
    count = 0
    for begin, end, first_scored in spans:
        window_logits = logits(ids[begin:end])
        # logits at position p predict token p + 1
        targets = np.asarray(ids[first_scored:end], dtype=np.int64)
        log_probs = log_softmax(as_float32(window_logits[first_scored - begin - 1:end - begin - 1]))
        nll = -np.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0].astype(np.float64)
        for observer in observers:
            observer.add(log_probs, nll)
        nll_sum += float(nll.sum())
        nll_sq_sum += float((nll * nll).sum())
        count += nll.size
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
