"""The perplexity protocol: every token after the first is scored once; a uniform model scores its vocab."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.config import AccuracyConfig
from harness.measure.accuracy import perplexity, windows


@given(n=st.integers(2, 3000), context=st.integers(2, 600), data=st.data())
def test_windows_score_every_token_after_the_first_exactly_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert begin < first <= end and end - begin <= context
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


class _Uniform:
    """A model whose logits are all equal: its perplexity is exactly its vocabulary size."""

    def __init__(self, vocab):
        import torch

        self.vocab = vocab
        self.device = torch.device("cpu")

    def __call__(self, ids, use_cache=False):
        import torch

        class Out:
            logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)

        return Out()


@pytest.mark.parametrize(("context", "stride"), [(16, 16), (16, 4)])
def test_a_uniform_model_has_perplexity_equal_to_its_vocabulary(context, stride):
    model = _Uniform(50)
    result = perplexity(lambda ids: model(torch.tensor([ids])).logits[0], list(range(3, 40)),
                        AccuracyConfig(context, stride, 37))
    assert result.ppl == pytest.approx(50)
    assert result.stderr == pytest.approx(0, abs=1e-9)
    assert result.scored_tokens == 36
    assert result.protocol == {"context_tokens": context, "stride": stride, "eval_tokens": 37, "scored_tokens": 36,
                               "logits_dtype": "float32"}
    assert result.nll_mean == pytest.approx(math.log(50), rel=1e-6)
