"""Comparisons over seeds: mean difference with a 95 % Student-t interval and a verdict.

A claim "A beats B" is judged on the runs of both sides. Where the runs share a seed (same data order,
same head init, same labeled split) the comparison is paired: the per-seed differences d_i = a_i - b_i
get a one-sample t interval, mean(d) +- t_{1-alpha/2, n-1} * sd(d) / sqrt(n) (Student 1908; any
statistics text, e.g. Moore & McCabe, "matched pairs t procedures"). Where they do not, Welch's
interval for two independent samples with the Welch-Satterthwaite degrees of freedom (Welch 1947).

The verdict reads the interval: ``holds`` when it lies above 0, ``reversed`` below 0, ``inside noise``
when it contains 0; with fewer than two pairs there is no interval (``too few seeds``).

Pure Python (math): the t quantile is the inverse of the t CDF, which is a regularized incomplete
beta function evaluated by its continued fraction (Press et al., Numerical Recipes, Sec. 6.4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

HOLDS, NOISE, REVERSED, TOO_FEW = "holds", "inside noise", "reversed", "too few seeds"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x = {x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df = {df} must be > 0")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p = {p} outside (0, 1)")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample sd / sqrt(n)); the s.e. is None for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass(frozen=True)
class Interval:
    """A mean difference (a - b) with its confidence interval and how it was computed."""

    diff: float
    low: float | None
    high: float | None
    df: float | None
    n: int
    test: str  # "paired t" | "Welch t"
    level: float = 0.95

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def verdict(low: float | None, high: float | None) -> str:
    """``holds`` (interval above 0), ``reversed`` (below 0), ``inside noise`` (contains 0), or
    ``too few seeds`` when there is no interval."""
    if low is None or high is None:
        return TOO_FEW
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return NOISE


def paired_t_interval(a: list[float], b: list[float], level: float = 0.95) -> Interval:
    """Paired t interval of mean(a_i - b_i): pairs are (a[i], b[i]), e.g. two inits on the same seed."""
    if len(a) != len(b):
        raise ValueError(f"paired_t_interval: {len(a)} values against {len(b)}; pairs need equal lengths")
    diffs = [x - y for x, y in zip(a, b)]
    mean, se = mean_se(diffs)
    n = len(diffs)
    if se is None:
        return Interval(mean, None, None, None, n, "paired t", level)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    return Interval(mean, mean - half, mean + half, float(n - 1), n, "paired t", level)


def welch_t_interval(a: list[float], b: list[float], level: float = 0.95) -> Interval:
    """Welch's interval of mean(a) - mean(b) for independent samples with unequal variances; the
    degrees of freedom are Welch-Satterthwaite's (s_a^2/n_a + s_b^2/n_b)^2 / sum((s^2/n)^2 / (n - 1))."""
    ma, sea = mean_se(a)
    mb, seb = mean_se(b)
    diff = ma - mb
    n = min(len(a), len(b))
    if sea is None or seb is None:
        return Interval(diff, None, None, None, n, "Welch t", level)
    va, vb = sea**2, seb**2  # s^2 / n of each side
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, None, n, "Welch t", level)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Interval(diff, diff - half, diff + half, df, n, "Welch t", level)
