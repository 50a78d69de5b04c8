"""Bootstrap intervals and paired comparisons against exact enumeration and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vlmscope.errors import InputError
from vlmscope.eval.stats import (
    CHAIR_METRICS,
    POPE_METRICS,
    bootstrap_intervals,
    group_counts,
    paired_bootstrap,
    pope_item_counts,
)

MEAN = {"mean": lambda c: 100 * np.asarray(c["x"]) / np.asarray(c["n"])}


def _exact_distribution(values, stat):
    """Every one of the n^n equally likely resamples (the bootstrap distribution, enumerated by hand)."""
    n = len(values)
    return np.array([stat([values[i] for i in pick]) for pick in itertools.product(range(n), repeat=n)])


def test_interval_matches_the_enumerated_bootstrap_distribution():
    x = [0, 0, 1, 1, 1, 0]
    exact = _exact_distribution(x, lambda v: 100 * sum(v) / len(v))
    # The resampled mean is 100·Binomial(6, 1/2)/6: its 2.5 % and 97.5 % quantiles, counted by hand from
    # the CDF (1/64, 7/64, 22/64, ...), are 100/6 and 500/6.
    assert np.quantile(exact, 0.025) == pytest.approx(100 / 6)
    assert np.quantile(exact, 0.975) == pytest.approx(500 / 6)
    ci = bootstrap_intervals({"x": x, "n": [1] * 6}, MEAN, draws=20000, seed=3)["mean"]
    assert ci.value == 50.0
    assert (ci.low, ci.high) == (pytest.approx(100 / 6), pytest.approx(500 / 6))


def test_ratio_of_sums_interval_matches_enumeration():
    # CHAIR_I-like pooled ratio: hallucinated mentions / mentions, with unequal mention counts per caption.
    hall, ment = [0, 1, 2, 0, 1], [2, 1, 3, 4, 1]
    exact = _exact_distribution(list(zip(hall, ment)), lambda v: 100 * sum(h for h, _ in v) / sum(m for _, m in v))
    ci = bootstrap_intervals(
        {"hallucinated_mentions": hall, "mentions": ment}, {"CHAIR_I": CHAIR_METRICS["CHAIR_I"]}, draws=40000, seed=1
    )["CHAIR_I"]
    assert ci.value == pytest.approx(100 * 4 / 11)
    assert ci.low == pytest.approx(np.quantile(exact, 0.025), abs=1.0)
    assert ci.high == pytest.approx(np.quantile(exact, 0.975), abs=1.0)
    assert np.std(exact) > 5  # the case is not degenerate


def test_binomial_standard_error():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.3).astype(float)
    p = x.mean()
    ci = bootstrap_intervals({"x": x, "n": np.ones(400)}, MEAN, draws=4000, seed=0)["mean"]
    half = 1.96 * 100 * math.sqrt(p * (1 - p) / 400)  # normal approximation of the binomial
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)


def test_seeded_and_degenerate():
    counts = {"x": [1, 0, 1, 1], "n": [1, 1, 1, 1]}
    a = bootstrap_intervals(counts, MEAN, draws=200, seed=7)["mean"]
    b = bootstrap_intervals(counts, MEAN, draws=200, seed=7)["mean"]
    c = bootstrap_intervals(counts, MEAN, draws=200, seed=8)["mean"]
    assert a == b and a != c
    const = bootstrap_intervals({"x": [1, 1, 1], "n": [1, 1, 1]}, MEAN, draws=50)["mean"]
    assert (const.value, const.low, const.high) == (100.0, 100.0, 100.0)


def test_paired_identical_runs():
    counts = {"x": [1, 0, 1, 0, 1], "n": [1] * 5}
    cmp = paired_bootstrap(counts, counts, MEAN, draws=500)["mean"]
    assert (cmp.diff, cmp.low, cmp.high, cmp.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_constant_difference_is_significant():
    # A hallucinates in every caption, B in none: every replicate differs by exactly 100 points.
    a = {"hallucinated_captions": [1] * 8, "captions": [1] * 8}
    b = {"hallucinated_captions": [0] * 8, "captions": [1] * 8}
    cmp = paired_bootstrap(a, b, {"CHAIR_S": CHAIR_METRICS["CHAIR_S"]}, draws=999)["CHAIR_S"]
    assert (cmp.a, cmp.b, cmp.diff, cmp.low, cmp.high) == (100.0, 0.0, 100.0, 100.0, 100.0)
    assert cmp.p_value == pytest.approx(1 / 1000)


def test_paired_matches_enumeration():
    # Differences d_i = a_i - b_i of a mean: the paired bootstrap is the bootstrap of d.
    a = [1, 1, 0, 1, 0, 1]
    b = [0, 1, 0, 0, 1, 0]
    d = [x - y for x, y in zip(a, b)]
    exact = _exact_distribution(d, lambda v: 100 * sum(v) / len(v))
    observed = 100 * sum(d) / len(d)
    exact_p = (np.sum(np.abs(exact - observed) >= abs(observed) - 1e-9)) / len(exact)
    cmp = paired_bootstrap({"x": a, "n": [1] * 6}, {"x": b, "n": [1] * 6}, MEAN, draws=40000, seed=2)["mean"]
    assert cmp.diff == pytest.approx(observed)
    assert cmp.low == pytest.approx(np.quantile(exact, 0.025), abs=1e-9)
    assert cmp.high == pytest.approx(np.quantile(exact, 0.975), abs=1e-9)
    assert cmp.p_value == pytest.approx(exact_p, abs=0.01)
    # Hand count: d = (1, 0, 0, 1, -1, 1), mean 1/3; the paired resample is shifted by -1/3 and must reach
    # |d* - 1/3| >= 1/3, i.e. sum(d*) <= 0 or >= 4.
    assert 0.05 < exact_p < 0.9


def test_pope_counts_and_image_grouping():
    preds = ["yes", "no", "yes", "no", None, "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    counts = pope_item_counts(preds, labels)
    totals = {k: v.sum() for k, v in counts.items()}
    assert totals == {"tp": 2, "fp": 1, "tn": 1, "fn": 1, "yes": 3, "n": 6}
    assert POPE_METRICS["Accuracy"](totals) == pytest.approx(50.0)
    assert POPE_METRICS["Precision"](totals) == pytest.approx(200 / 3)
    assert POPE_METRICS["F1"](totals) == pytest.approx(200 / 3)  # P = R = 2/3
    keys, grouped = group_counts(["i1", "i1", "i2", "i2", "i3", "i3"], counts)
    assert keys == ["i1", "i2", "i3"] and grouped["tp"].tolist() == [1, 0, 1] and grouped["n"].tolist() == [2, 2, 2]


def test_bad_input():
    with pytest.raises(InputError, match="draws"):
        bootstrap_intervals({"x": [1], "n": [1]}, MEAN, draws=0)
    with pytest.raises(InputError, match="same items"):
        paired_bootstrap({"x": [1], "n": [1]}, {"x": [1, 0], "n": [1, 1]}, MEAN)


def test_pope_intervals_resample_images_and_match_the_point_estimate():
    from vlmscope.eval.pope import pope_scores
    from vlmscope.eval.stats import pope_intervals

    questions, answers = [], []
    for split in ("random", "popular"):
        for img in range(20):
            for label in ("yes", "no"):
                questions.append({"question_id": len(questions), "image": f"im{img}", "text": "?", "label": label,
                                  "split": split})
                # wrong on every third image of "popular" only
                wrong = split == "popular" and img % 3 == 0
                answers.append(("no" if label == "yes" else "yes") if wrong else label)
    scores = pope_scores(answers, questions, rule="exact")
    ci = pope_intervals(scores["items"], draws=300, seed=0)
    assert ci["random/Accuracy"].value == 100.0 and (ci["random/Accuracy"].low, ci["random/Accuracy"].high) == (100, 100)
    assert ci["popular/Accuracy"].value == pytest.approx(scores["splits"]["popular"]["Accuracy"])
    assert ci["Accuracy"].value == pytest.approx(scores["mean"]["Accuracy"])
    assert ci["F1"].value == pytest.approx(scores["mean"]["F1"])
    # 7 of 20 images wrong (both questions): the popular accuracy is a mean over images of 0/1 outcomes, so
    # its interval is that of a binomial proportion 13/20, far wider than over 40 independent questions.
    assert ci["popular/Accuracy"].low < 50 < 80 < ci["popular/Accuracy"].high
