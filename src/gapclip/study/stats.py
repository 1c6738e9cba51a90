"""Paired comparisons of a method with its baseline on the same test queries and seeds.

Two sources of noise separate a measured difference from a real one, and the study reports both:

- **Test-set sampling** (which 1,000 images happen to be in the test split): a *paired cluster bootstrap* over test
  images. Every method and its baseline are scored on the same queries; per query we average the hit indicators
  ``1[rank < K]`` over the seeds the two share, resample *images* with replacement (an image's captions go with it,
  as the t2i queries of one image are not independent), and recompute ΔRSUM. The 2.5/97.5 percentiles are the 95 %
  confidence interval; the two-sided bootstrap p is ``2·min(P(Δ* ≤ 0), P(Δ* ≥ 0))``.
- **Training noise** (initialisation, data order): a *paired t-test over seeds* (seed s of the method against seed s
  of its baseline), with the t-based 95 % interval of the mean difference. With 3 seeds it has 2 degrees of freedom,
  so only consistent differences reach p < 0.05.

:func:`verdict` calls a difference measurable only when both agree: the bootstrap interval excludes 0 *and* every
seed's difference has the same sign (one seed: the bootstrap alone). A study compares many rows with their baselines
at once, so some differences reach p < 0.05 by chance; :func:`holm` adjusts the rows' bootstrap p for that (reported
next to the verdict, which it does not change).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["cluster_bootstrap_rsum", "holm", "mean_std", "paired_seed_test", "rsum_from_ranks", "verdict"]

KS = (1, 5, 10)


def rsum_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = KS) -> float:
    """RSUM (%) from 0-based best-positive ranks (``gapclip.evaluation.retrieval_ranks``)."""
    return float(sum(100.0 * (np.asarray(r) < k).mean() for r in (i2t_ranks, t2i_ranks) for k in ks))


def _mean_hits(ranks: Sequence[np.ndarray], ks: Sequence[int]) -> np.ndarray:
    """``[len(ks), Q]``: per query, the fraction of runs (seeds) with ``rank < K``."""
    stacked = np.stack([np.asarray(r) for r in ranks])  # [S, Q]
    return np.stack([(stacked < k).mean(axis=0) for k in ks])


def cluster_bootstrap_rsum(
    method: Sequence[tuple[np.ndarray, np.ndarray]],
    baseline: Sequence[tuple[np.ndarray, np.ndarray]],
    text_to_image: np.ndarray,
    *,
    ks: Sequence[int] = KS,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """ΔRSUM = RSUM(method) − RSUM(baseline) with a paired cluster-bootstrap 95 % interval over test images.

    Args:
        method / baseline: per seed, ``(i2t_ranks [N], t2i_ranks [M])``; the two lists are paired by position (seed
            s of each), so pass the seeds both have, in the same order.
        text_to_image: ``[M]`` image row of every caption.
        num_resamples: bootstrap replicates.
        seed: seed of the resampling.

    Returns:
        ``{"diff", "ci_low", "ci_high", "p", "num_resamples"}``; ``diff`` is the seed-averaged ΔRSUM on the full test
        split (equal to the mean over seeds of the per-seed ΔRSUM).
    """
    if len(method) != len(baseline) or not method:
        raise ValueError(f"need the same, non-zero number of paired runs, got {len(method)} and {len(baseline)}.")
    text_to_image = np.asarray(text_to_image)
    num_images = len(method[0][0])
    d_i2t = _mean_hits([m[0] for m in method], ks) - _mean_hits([b[0] for b in baseline], ks)  # [K, N]
    d_t2i = _mean_hits([m[1] for m in method], ks) - _mean_hits([b[1] for b in baseline], ks)  # [K, M]
    per_image_i2t = d_i2t.sum(axis=0)  # Σ_K, [N]
    per_image_t2i = np.zeros(num_images)
    np.add.at(per_image_t2i, text_to_image, d_t2i.sum(axis=0))  # Σ_K Σ_captions of the image
    captions = np.bincount(text_to_image, minlength=num_images).astype(float)

    def statistic(weights: np.ndarray) -> np.ndarray:
        # weights: [R, N] resampling counts (each row sums to N)
        return 100.0 * (weights @ per_image_i2t / num_images + (weights @ per_image_t2i) / (weights @ captions))

    point = float(statistic(np.ones((1, num_images)))[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=num_resamples).astype(float)
    replicates = statistic(weights)
    low, high = np.percentile(replicates, [2.5, 97.5])
    p = min(1.0, 2.0 * min((replicates <= 0).mean(), (replicates >= 0).mean()))
    return {"diff": point, "ci_low": float(low), "ci_high": float(high), "p": float(p), "num_resamples": num_resamples}


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p values (Holm 1979, "A simple sequentially rejective multiple test
    procedure"): with the m p values sorted, ``p_(1) ≤ … ≤ p_(m)``, the adjusted ``p̃_(i) = max_{j ≤ i} min(1, (m − j
    + 1)·p_(j))``. Rejecting where ``p̃ < α`` keeps the family-wise error rate at α under any dependence between the
    tests (the study's comparisons share their baseline, so they are not independent). Ties keep their input order.
    """
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted, running = {}, 0.0
    for rank, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * float(p)))
        adjusted[name] = running
    return adjusted


def paired_seed_test(method: Mapping[int, float], baseline: Mapping[int, float]) -> dict[str, float | int | None]:
    """Paired t-test over the seeds both have: mean difference, its t-based 95 % interval and the two-sided p.

    With one shared seed only the difference is returned (interval and p are ``None``); identical differences
    (zero spread) give p = 0 when the difference is non-zero.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("no seed in common between the method and its baseline.")
    diffs = np.array([method[s] - baseline[s] for s in seeds], dtype=float)
    result: dict[str, float | int | None] = {
        "diff": float(diffs.mean()), "n": len(seeds), "ci_low": None, "ci_high": None, "p": None,
        "same_sign": bool((diffs > 0).all() or (diffs < 0).all()),
    }
    if len(seeds) < 2:
        return result
    from scipy import stats

    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(seeds) - 1)) * sd / math.sqrt(len(seeds))
    result.update(ci_low=result["diff"] - half, ci_high=result["diff"] + half)
    if sd == 0.0:
        result["p"] = 1.0 if result["diff"] == 0.0 else 0.0
    else:
        result["p"] = float(stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def verdict(bootstrap: Mapping[str, float], seeds: Mapping[str, object]) -> str:
    """``"gain"``, ``"loss"`` or ``"no measurable difference"`` (rule in the module docstring)."""
    low, high = bootstrap["ci_low"], bootstrap["ci_high"]
    consistent = seeds["n"] < 2 or seeds["same_sign"]
    if low > 0 and consistent:
        return "gain"
    if high < 0 and consistent:
        return "loss"
    return "no measurable difference"
