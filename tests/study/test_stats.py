"""The study's statistics: RSUM from ranks, the paired cluster bootstrap, the paired t-test over seeds, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from gapclip.study.stats import (
    cluster_bootstrap_rsum, holm, mean_std, paired_seed_test, rsum_from_ranks, verdict,
)


def test_rsum_from_ranks_by_hand():
    i2t = np.array([0, 3, 12, 7])  # R@1 25, R@5 50, R@10 75
    t2i = np.array([0, 0, 5, 9, 10, 2, 1, 30])  # R@1 25, R@5 50, R@10 75
    assert rsum_from_ranks(i2t, t2i) == pytest.approx(25 + 50 + 75 + 25 + 50 + 75)


def _runs(rng, num_images=30, captions=3, seeds=3, shift=0):
    return [
        (rng.integers(0, 20, num_images) - shift, rng.integers(0, 20, num_images * captions) - shift)
        for _ in range(seeds)
    ]


def _loop_bootstrap(method, baseline, text_to_image, weights):
    """The bootstrap statistic written out with loops: images drawn with their captions."""
    num_images = len(method[0][0])
    out = []
    for counts in weights:
        images = [i for i in range(num_images) for _ in range(int(counts[i]))]
        captions = [m for i in images for m in np.flatnonzero(text_to_image == i)]
        total = 0.0
        for k in (1, 5, 10):
            for (mi, mt), (bi, bt) in zip(method, baseline):
                total += 100 * (np.mean([mi[i] < k for i in images]) - np.mean([bi[i] < k for i in images]))
                total += 100 * (np.mean([mt[m] < k for m in captions]) - np.mean([bt[m] < k for m in captions]))
        out.append(total / len(method))
    return np.array(out)


def test_bootstrap_point_estimate_is_the_mean_per_seed_difference_and_matches_a_loop():
    rng = np.random.default_rng(0)
    text_to_image = np.repeat(np.arange(30), 3)
    method, baseline = _runs(rng, shift=2), _runs(rng)
    result = cluster_bootstrap_rsum(method, baseline, text_to_image, num_resamples=50, seed=7)
    per_seed = [rsum_from_ranks(*m) - rsum_from_ranks(*b) for m, b in zip(method, baseline)]
    assert result["diff"] == pytest.approx(np.mean(per_seed))
    weights = np.random.default_rng(7).multinomial(30, np.full(30, 1 / 30), size=50)
    replicates = _loop_bootstrap(method, baseline, text_to_image, weights)
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert result["ci_low"] <= result["diff"] <= result["ci_high"]


def test_bootstrap_of_identical_runs_is_exactly_zero_and_uniform_gains_are_certain():
    rng = np.random.default_rng(1)
    text_to_image = np.repeat(np.arange(40), 5)
    runs = _runs(rng, num_images=40, captions=5)
    same = cluster_bootstrap_rsum(runs, runs, text_to_image, num_resamples=100)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0 and same["p"] == 1.0
    worse = [(np.full(40, 50), np.full(200, 50)) for _ in range(3)]
    perfect = [(np.zeros(40, int), np.zeros(200, int)) for _ in range(3)]
    gain = cluster_bootstrap_rsum(perfect, worse, text_to_image, num_resamples=100)
    assert gain["diff"] == gain["ci_low"] == gain["ci_high"] == pytest.approx(600.0) and gain["p"] == 0.0


def test_bootstrap_is_invariant_to_the_order_of_images():
    rng = np.random.default_rng(2)
    text_to_image = np.repeat(np.arange(25), 2)
    method, baseline = _runs(rng, 25, 2, shift=3), _runs(rng, 25, 2)
    order = rng.permutation(25)
    inverse = np.argsort(order)
    caption_order = np.concatenate([np.flatnonzero(text_to_image == i) for i in order])

    def permute(runs):
        return [(i2t[order], t2i[caption_order]) for i2t, t2i in runs]

    permuted_map = inverse[text_to_image[caption_order]]
    a = cluster_bootstrap_rsum(method, baseline, text_to_image, num_resamples=10)
    b = cluster_bootstrap_rsum(permute(method), permute(baseline), permuted_map, num_resamples=10)
    assert a["diff"] == pytest.approx(b["diff"])


def test_bootstrap_needs_paired_runs():
    runs = [(np.zeros(3, int), np.zeros(3, int))]
    with pytest.raises(ValueError, match="same, non-zero number of paired runs"):
        cluster_bootstrap_rsum(runs, runs * 2, np.arange(3))


def test_paired_seed_test_against_scipy_and_by_hand():
    method, baseline = {0: 11.0, 1: 12.0, 2: 16.0}, {0: 10.0, 1: 10.0, 2: 13.0}  # diffs 1, 2, 3
    result = paired_seed_test(method, baseline)
    assert result["diff"] == pytest.approx(2.0) and result["n"] == 3 and result["same_sign"]
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of (1, 2, 3) is 1
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert result["p"] == pytest.approx(scipy_stats.ttest_rel([11, 12, 16], [10, 10, 13]).pvalue)
    one = paired_seed_test({0: 5.0, 3: 1.0}, {0: 4.0})  # only seed 0 is shared
    assert one["n"] == 1 and one["diff"] == 1.0 and one["p"] is None and one["ci_low"] is None
    constant = paired_seed_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert constant["p"] == 0.0 and constant["ci_low"] == constant["ci_high"] == 1.0
    mixed = paired_seed_test({0: 2.0, 1: 0.0}, {0: 1.0, 1: 1.0})
    assert not mixed["same_sign"]
    with pytest.raises(ValueError, match="no seed in common"):
        paired_seed_test({0: 1.0}, {1: 1.0})


def test_verdict_needs_the_interval_and_the_seeds_to_agree():
    consistent = {"n": 3, "same_sign": True}
    mixed = {"n": 3, "same_sign": False}
    assert verdict({"ci_low": 1.0, "ci_high": 5.0}, consistent) == "gain"
    assert verdict({"ci_low": -5.0, "ci_high": -1.0}, consistent) == "loss"
    assert verdict({"ci_low": -1.0, "ci_high": 5.0}, consistent) == "no measurable difference"
    assert verdict({"ci_low": 1.0, "ci_high": 5.0}, mixed) == "no measurable difference"
    assert verdict({"ci_low": 1.0, "ci_high": 5.0}, {"n": 1, "same_sign": True}) == "gain"


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


def test_holm_by_hand_and_its_invariants():
    # sorted: b 0.01 (×4 = 0.04), d 0.02 (×3 = 0.06), a 0.03 (×2 = 0.06), c 0.04 (×1, but never below the last: 0.06)
    adjusted = holm({"a": 0.03, "b": 0.01, "c": 0.04, "d": 0.02})
    assert adjusted == pytest.approx({"a": 0.06, "b": 0.04, "c": 0.06, "d": 0.06})
    assert holm({"a": 0.3, "b": 0.5}) == pytest.approx({"a": 0.6, "b": 0.6})  # capped by the running maximum
    assert holm({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}  # and at 1
    assert holm({"only": 0.02}) == {"only": 0.02} and holm({}) == {}
    rng = np.random.default_rng(0)
    p = dict(zip("abcdefgh", rng.uniform(0, 0.2, 8)))
    adjusted = holm(p)
    assert all(adjusted[k] >= p[k] for k in p)  # never below the raw p
    order = sorted(p, key=p.get)
    assert [adjusted[k] for k in order] == sorted(adjusted.values())  # monotone in the raw p
    assert holm(dict(reversed(list(p.items())))) == adjusted  # independent of the input order
    # Holm is uniformly more powerful than Bonferroni: it rejects everything Bonferroni rejects
    assert {k for k in p if p[k] * len(p) < 0.05} <= {k for k in p if adjusted[k] < 0.05}


def test_the_report_prints_a_holm_p_of_zero_as_the_bootstraps_resolution():
    from gapclip.study.report import _holm_cell

    assert _holm_cell({"p": 0.0, "family_size": 12}, 2000) == "<0.012"  # 12 × 2/2000: p = 0 means below 2/2000
    assert _holm_cell({"p": 0.0, "family_size": 1}, 200) == "<0.010"
    assert _holm_cell({"p": 0.0301, "family_size": 12}, 2000) == "0.030"
    assert _holm_cell(None, 2000) == ""  # a comparison saved before the column existed
