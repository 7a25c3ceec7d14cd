"""The statistics of a comparison report: Student t (without scipy), intervals, z-scores, bootstrap.

- one seed: mean@k +- its standard error over test problems (evaluate.py: problems are the
  independent unit). This is evaluation noise only; it does not cover training randomness.
- several seeds: the mean over seeds of the final mean@k with a 95% Student-t interval,
  mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with ddof = 1): the seed is the independent unit, so
  the interval covers training and evaluation noise. Per-seed values are listed beside it.
- where the final evaluations logged their per-problem results (`eval_per_problem`): a 95% interval
  over seeds AND problems by a two-level bootstrap (resample seeds, then test problems; percentile
  interval of BOOTSTRAP_SAMPLES replicates, seeded), and, for each row against the best and against
  pre-RL, the difference with a PAIRED 95% bootstrap interval: both rows' seeds resampled
  independently, the test problems resampled jointly (every row was evaluated on the same problems),
  so the problems' shared difficulty cancels. A difference is significant when its interval excludes
  0. With 3 seeds the seed level of the bootstrap is coarse (it sees 3 values, and a resample of n
  values has (n - 1) / n of their variance): the intervals are then somewhat narrow.
- without per-problem results: a difference in combined standard errors, (a - b) / sqrt(se_a^2 +
  se_b^2) with se = the evaluation standard error (one seed) or sd / sqrt(n) (several seeds).

Student's t is written out here rather than taken from scipy: scipy is not a dependency, and two
functions do not justify adding it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["BOOTSTRAP_SAMPLES", "bootstrap_interval", "confidence_interval", "t_cdf", "t_quantile", "verdict",
           "z_score"]

BOOTSTRAP_SAMPLES = 4000


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom >= 1.

    Closed form for integer df (Abramowitz & Stegun 26.7.3 / 26.7.4), with theta = atan(t / sqrt(df)):
    A(t | df) = P(|T| <= |t|) =
      df odd:  (2 / pi) * (theta + sin(theta) * (cos(theta) + 2/3 cos^3(theta) + ...
                                                + (2*4*...*(df-3)) / (1*3*...*(df-2)) cos^(df-2)(theta)))
               (just 2 theta / pi for df = 1)
      df even: sin(theta) * (1 + 1/2 cos^2(theta) + 1*3/(2*4) cos^4(theta) + ...
                             + (1*3*...*(df-3)) / (2*4*...*(df-2)) cos^(df-2)(theta))
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        total, term = 0.0, c
        for j in range(1, df - 1, 2):  # terms cos, 2/3 cos^3, ...: j = 1, 3, ..., df - 2
            total += term
            term *= c * c * (j + 1) / (j + 2)
        a = 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    else:
        total, term = 0.0, 1.0
        for j in range(0, df - 1, 2):  # terms 1, 1/2 cos^2, 1*3/(2*4) cos^4, ...: j = 0, 2, ..., df - 2
            total += term
            term *= c * c * (j + 1) / (j + 2)
        a = s * total
    return 0.5 + math.copysign(a / 2.0, t)


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with integer df (bisection on t_cdf, to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2.0


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width) of the Student-t interval for the mean of `values` (n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval over seeds needs at least 2 values, got {n}")
    sd = statistics.stdev(values)  # ddof = 1
    return statistics.fmean(values), t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)


def z_score(a: float, se_a: float, b: float, se_b: float) -> float:
    """(a - b) in combined standard errors; +-inf when both are exact and differ, 0 when equal."""
    combined = math.hypot(se_a, se_b)
    if combined == 0.0:
        return 0.0 if a == b else math.copysign(math.inf, a - b)
    return (a - b) / combined


def verdict(z: float) -> str:
    """Plain words for a difference of z combined standard errors."""
    z = round(abs(z), 2)  # as printed: a z shown as 2.00 is not "under 2"
    if z < 1.0:
        return "well within noise: neither can be called better"
    if z < 2.0:
        return "suggestive, but under 2 standard errors: not a clear win"
    return "2 or more standard errors: a clear difference"


def bootstrap_interval(a, b=None, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): mean of a [S_a, P] (minus that of b [S_b, P], paired over the P
    problems) with a two-level bootstrap percentile interval: each side's seeds resampled
    independently, the problems resampled jointly for both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    problems = a.shape[1]
    if b is not None and b.shape[1] != problems:
        raise ValueError(f"paired rows need the same problems ({problems} vs {b.shape[1]})")
    take = rng.integers(0, problems, size=(samples, problems))  # [R, P]

    def replicate(m):
        per_seed = m[:, take].mean(-1).T  # [R, S]: each seed's mean over the resampled problems
        seeds = rng.integers(0, m.shape[0], size=(samples, m.shape[0]))  # [R, S]
        return np.take_along_axis(per_seed, seeds, axis=1).mean(-1)  # [R]

    stat = replicate(a) - (replicate(b) if b is not None else 0.0)
    estimate = float(a.mean() - (b.mean() if b is not None else 0.0))
    low, high = np.percentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return estimate, float(low), float(high)
