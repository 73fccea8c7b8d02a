"""Divergence from the reference: zero against itself, grouped KL never above the full KL, keys checked."""

import math

import numpy as np
import pytest
import torch

from harness.config import AccuracyConfig
from harness.measure.accuracy import perplexity
from harness.measure.divergence import Collector, Comparer, Reference, ReferenceError, reference_key

VOCAB = 40
IDS = [int(i) for i in torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(0))]
PROTOCOL = AccuracyConfig(context_tokens=32, stride=16, max_eval_tokens=90)


def logits_of(seed, scale=1.0):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    return lambda window: table[torch.tensor(window)]


def reference_for(logits, top_k):
    collector = Collector(top_k)
    perplexity(logits, IDS, PROTOCOL, [collector])
    return collector.reference({"k": top_k})


def full_kl(reference_logits, logits):
    """KL(ref || q) over the whole vocabulary, at the same scored positions."""
    ref, q = Collector(VOCAB), Collector(VOCAB)
    perplexity(reference_logits, IDS, PROTOCOL, [ref])
    perplexity(logits, IDS, PROTOCOL, [q])
    order = ref.reference({}).top_ids
    p_lp = ref.reference({}).top_logprobs.astype(np.float64)
    q_lp = q.reference({}).top_logprobs.astype(np.float64)
    q_at = np.empty_like(p_lp)
    for row in range(order.shape[0]):
        q_at[row] = q_lp[row][q.reference({}).top_ids[row].argsort()][order[row]]
    return (np.exp(p_lp) * (p_lp - q_at)).sum(axis=1)


def test_a_method_compared_with_itself_has_no_divergence():
    base = logits_of(1)
    comparer = Comparer(reference_for(base, 8))
    perplexity(base, IDS, PROTOCOL, [comparer])
    figures = comparer.figures()
    assert figures["kld_mean"] == pytest.approx(0, abs=1e-9)
    assert figures["kld_max"] == pytest.approx(0, abs=1e-9)
    assert figures["top1_agreement"] == 1.0
    assert figures["ppl_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 4, 16, VOCAB])
def test_grouped_kl_never_exceeds_the_full_kl_and_equals_it_at_full_k(top_k):
    base, other = logits_of(1), logits_of(2, scale=0.7)
    comparer = Comparer(reference_for(base, top_k))
    perplexity(other, IDS, PROTOCOL, [comparer])
    grouped = np.concatenate(comparer.kld)
    full = full_kl(base, other)
    assert np.all(grouped <= full + 1e-6)
    if top_k == VOCAB:
        assert np.allclose(grouped, full, atol=1e-6)
    figures = comparer.figures()
    assert 0 < figures["kld_mean"] <= figures["kld_p99"] <= figures["kld_max"]
    assert 0 <= figures["top1_agreement"] < 1


def test_the_perplexity_ratio_matches_the_two_perplexities():
    base, other = logits_of(1), logits_of(2)
    comparer = Comparer(reference_for(base, 4))
    ratio_of = perplexity(other, IDS, PROTOCOL, [comparer]).ppl / perplexity(base, IDS, PROTOCOL).ppl
    figures = comparer.figures()
    assert figures["ppl_ratio"] == pytest.approx(ratio_of)
    assert figures["ppl_ratio_stderr"] > 0


def test_a_reference_for_another_model_or_protocol_is_never_used(tmp_path):
    key = reference_key({"source": "embedded", "recipe_key": "abc"}, {"name": "fp32"}, {"stride": 16}, "d1")
    reference_for(logits_of(1), 4).__class__(key, *[np.zeros(1)] * 3).save(tmp_path / "ref")
    assert Reference.load(tmp_path / "ref", key).key == key
    other = reference_key({"source": "embedded", "recipe_key": "abc"}, {"name": "fp32"}, {"stride": 8}, "d1")
    with pytest.raises(ReferenceError, match="reference made for another protocol; it is not used"):
        Reference.load(tmp_path / "ref", other)


def test_a_run_that_scores_other_positions_than_the_reference_is_refused():
    comparer = Comparer(reference_for(logits_of(1), 4))
    perplexity(logits_of(1), IDS[:50], PROTOCOL, [comparer])
    with pytest.raises(ReferenceError, match="scored"):
        comparer.figures()
    assert math.isfinite(float(np.concatenate(comparer.kld).sum()))


def test_torch_and_numpy_logits_score_the_same():
    """The scoring is numpy on the host for every backend: torch logits (any dtype) and arrays agree."""
    base = logits_of(1)
    as_array = lambda window: base(window).numpy()  # noqa: E731
    as_half = lambda window: base(window).half()  # noqa: E731
    assert perplexity(base, IDS, PROTOCOL).ppl == perplexity(as_array, IDS, PROTOCOL).ppl
    half = perplexity(as_half, IDS, PROTOCOL).ppl
    assert half == pytest.approx(perplexity(base, IDS, PROTOCOL).ppl, rel=1e-2) and math.isfinite(half)
    reference = reference_for(base, 4)
    comparer = Comparer(reference)
    perplexity(as_array, IDS, PROTOCOL, [comparer])
    assert comparer.figures()["kld_max"] == pytest.approx(0, abs=1e-9)
    assert reference.top_ids.dtype == np.int64 and reference.top_logprobs.dtype == np.float32
    assert (np.diff(reference.top_logprobs, axis=1) <= 0).all()  # most likely first: column 0 is the top-1
