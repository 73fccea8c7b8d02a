"""Batch consistency: a left-padding bug is caught at its first diverging token; near ties are not bugs."""

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
