"""Batch consistency: a left-padding bug is caught at its first diverging token; near ties are not bugs."""

import pytest
import torch

from harness.measure.consistency import check, describe_failure, prompt_lengths

VOCAB = 10


def scores_for(tokens, margin=5.0):
    """Per-step scores whose argmax is each token, the runner-up `margin` below it."""
    out = torch.zeros(len(tokens), VOCAB)
    for step, token in enumerate(tokens):
        out[step, token] = margin
        out[step, (token + 1) % VOCAB] = 0.0
    return out


def model(left_padding_bug=False, tie_at=None):
    """A fake greedy: each prompt continues with (sum of prompt + step) % VOCAB; batching can garble it."""

    def greedy(rows, n):
        width = max(len(r) for r in rows)
        tokens, scores = [], []
        for row in rows:
            seq = [(sum(row) + step) % VOCAB for step in range(n)]
            if left_padding_bug and len(rows) > 1 and len(row) < width:
                seq = seq[:3] + [(t + 1) % VOCAB for t in seq[3:]]  # padding leaks in after 3 tokens
            margin = 0.01 if tie_at is not None else 5.0
            tokens.append(seq)
            scores.append(scores_for(seq, margin))
        if tie_at is not None and len(rows) > 1:
            tokens[1] = tokens[1][:tie_at] + [(tokens[1][tie_at] + 1) % VOCAB] + tokens[1][tie_at + 1:]
        return tokens, torch.stack(scores)

    return greedy


PROMPTS = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5], [2, 3, 4], [5, 6]]


def test_prompt_lengths_differ_so_every_row_but_one_is_padded():
    lengths = prompt_lengths(128)
    assert len(set(lengths)) == 4 and lengths[0] == 128 and min(lengths) >= 2


def test_a_consistent_backend_passes():
    report = check(model(), PROMPTS, 8)
    assert report["consistent"] and all(row["consistent"] for row in report["rows"])


def test_a_left_padding_bug_fails_at_the_first_diverging_position():
    report = check(model(left_padding_bug=True), PROMPTS, 8)
    assert not report["consistent"]
    row = report["rows"][1]
    assert row["first_divergence"] == 3 and not row["consistent"]
    assert report["rows"][0]["consistent"]  # the longest row has no padding
    assert "row 1 (5 prompt tokens) diverges at new token 3" in describe_failure(report)


def test_a_near_tie_flipped_by_batching_is_not_a_failure():
    report = check(model(tie_at=2), PROMPTS, 8)
    assert report["consistent"]
    assert report["rows"][1]["tie"] and report["rows"][1]["first_divergence"] == 2


def test_masked_logits_leave_a_finite_gap_or_none():
    def greedy(rows, n):
        tokens = [[1] * n if len(rows) == 1 else [2] * n for _ in rows]
        scores = torch.full((len(rows), n, VOCAB), float("-inf"))  # a processor masked all but two tokens
        scores[:, :, 1] = 1.0
        scores[:, :, 2] = 0.99
        return tokens, scores

    report = check(greedy, [[1, 2], [3]], 4)
    row = report["rows"][0]
    assert row["first_divergence"] == 0 and row["tie"]
    assert row["batched_logit_gap"] == 0.0  # the -inf - -inf entries are left out, not NaN


def one_flip(margin, top, gap):
    """Alone prefers token 1 by `margin` at logit `top`; batched prefers token 2 and moved by `gap`."""
    def greedy(rows, n):
        scores = torch.linspace(-3, 3, VOCAB).repeat(len(rows), n, 1)
        scores[:, :, 1], scores[:, :, 2] = top, top - margin
        if len(rows) > 1:
            scores[:, 0, 1], scores[:, 0, 2] = top - margin, top
            scores[:, 0, 5] += gap
        return [[1] * n if len(rows) == 1 else [2] * n for _ in rows], scores
    return greedy


def test_a_flip_within_two_units_of_the_logits_dtype_is_a_tie():
    greedy = one_flip(margin=0.0625, top=10.0, gap=1.0)  # one bf16 step at 10, but a large move elsewhere
    bf16 = check(greedy, [[1, 2], [3]], 3, logits_dtype=torch.bfloat16)
    assert bf16["consistent"] and bf16["rows"][0]["tie"] and bf16["rows"][0]["tie_threshold"] == 0.125
    fp32 = check(greedy, [[1, 2], [3]], 3)
    assert not fp32["consistent"] and "tie threshold 0.050" in describe_failure(fp32)


def test_batch_variant_numerics_pass_and_a_changed_distribution_fails():
    small = check(one_flip(margin=0.1, top=5.0, gap=0.0), [[1, 2], [3]], 3)  # only the two candidates moved
    assert small["consistent"] and small["rows"][0]["close"] and not small["rows"][0]["tie"]
    large = check(one_flip(margin=0.1, top=5.0, gap=4.0), [[1, 2], [3]], 3)
    row = large["rows"][0]
    assert not large["consistent"] and row["relative_gap"] > 1
    assert "standard deviations > 0.1" in describe_failure(large)


def test_a_few_units_of_a_coarse_dtype_are_numerics_but_not_of_a_fine_one():
    # top logit 9: a bf16 step is 2**-4; the batched logits moved by 0.4 (6.4 bf16 steps, over 0.1 standard
    # deviations), and the alone margin 0.2 is no tie
    greedy = one_flip(margin=0.2, top=9.0, gap=0.4)
    bf16 = check(greedy, [[1, 2], [3]], 3, logits_dtype=torch.bfloat16)
    row = bf16["rows"][0]
    assert bf16["consistent"] and row["close"] and not row["tie"] and row["relative_gap"] > 0.1
    assert row["gap_ulps"] == pytest.approx(0.4 / 2**-4, rel=1e-3)
    fp32 = check(greedy, [[1, 2], [3]], 3)
    assert not fp32["consistent"] and "units of float32 > 8" in describe_failure(fp32)
    padding_bug = check(one_flip(margin=0.2, top=9.0, gap=4.0), [[1, 2], [3]], 3, logits_dtype=torch.bfloat16)
    assert not padding_bug["consistent"]


def test_a_batch_variant_algorithm_declares_a_larger_tolerance_that_still_catches_a_padding_bug():
    from harness.methods.bnb import BitsAndBytesMethod

    int8 = BitsAndBytesMethod({"quant": "int8"}, "cpu").consistency_tolerance()
    assert int8 == 0.75 and BitsAndBytesMethod({"quant": "nf4"}, "cpu").consistency_tolerance() == 0.1
    variant = check(one_flip(margin=0.3, top=5.0, gap=1.0), [[1, 2], [3]], 3, logit_tolerance=int8)
    assert variant["consistent"] and 0.1 < variant["rows"][0]["relative_gap"] <= int8
    assert not check(one_flip(margin=0.3, top=5.0, gap=1.0), [[1, 2], [3]], 3)["consistent"]
    assert not check(one_flip(margin=0.3, top=5.0, gap=4.0), [[1, 2], [3]], 3, logit_tolerance=int8)["consistent"]
