"""The claims' statistics against worked examples: Student's sleep data (Cushny & Peebles 1905), whose
paired and Welch intervals are the ones R's ``t.test`` documents, and closed forms of the t CDF."""

from __future__ import annotations

import math

import pytest

from components.evaluation.stats import (
    HOLDS,
    NOISE,
    REVERSED,
    TOO_FEW,
    betainc,
    mean_se,
    paired_t_interval,
    t_cdf,
    t_ppf,
    verdict,
    welch_t_interval,
)

# R: sleep$extra by group (extra hours of sleep for 10 patients under two drugs)
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


@pytest.mark.parametrize("t", [-7.0, -1.0, -0.3, 0.0, 0.5, 2.0, 30.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize(
    "df, q",
    [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163), (30, 2.042272456), (1000, 1.962339081)],
)
def test_t_quantiles_match_the_printed_tables(df, q):
    assert t_ppf(0.975, df) == pytest.approx(q, abs=1e-7)
    assert t_ppf(0.025, df) == pytest.approx(-q, abs=1e-7)


def test_incomplete_beta_symmetry_and_a_closed_form():
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(1 - betainc(3.0, 2.0, 0.6), abs=1e-12)
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-12)  # uniform
    assert betainc(2.0, 1.0, 0.3) == pytest.approx(0.09, abs=1e-12)  # x^a for b = 1


def test_paired_interval_on_the_sleep_data_is_rs():
    """R: t.test(extra ~ group, data = sleep, paired = TRUE): mean difference -1.58, df 9,
    95 % CI -2.4598858 to -0.7001142."""
    ci = paired_t_interval(DRUG1, DRUG2)
    assert ci.diff == pytest.approx(-1.58, abs=1e-12) and ci.df == 9 and ci.n == 10 and ci.test == "paired t"
    assert (ci.low, ci.high) == (pytest.approx(-2.4598858, abs=1e-6), pytest.approx(-0.7001142, abs=1e-6))
    assert ci.verdict == REVERSED
    flipped = paired_t_interval(DRUG2, DRUG1)
    assert flipped.verdict == HOLDS and flipped.low == pytest.approx(0.7001142, abs=1e-6)


def test_welch_interval_on_the_sleep_data_is_rs():
    """R: t.test(extra ~ group, data = sleep) (Welch): df 17.776, 95 % CI -3.3654832 to 0.2054832."""
    ci = welch_t_interval(DRUG1, DRUG2)
    assert ci.diff == pytest.approx(0.75 - 2.33, abs=1e-12) and ci.df == pytest.approx(17.776, abs=1e-3)
    assert (ci.low, ci.high) == (pytest.approx(-3.3654832, abs=1e-6), pytest.approx(0.2054832, abs=1e-6))
    assert ci.verdict == NOISE  # the same data unpaired: the drugs' difference is inside the noise


def test_mean_se_and_the_verdicts_at_the_edges():
    assert mean_se([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3 / 4)))
    assert mean_se([3.0]) == (3.0, None)
    one = paired_t_interval([2.0], [1.0])
    assert one.diff == 1.0 and one.low is None and one.verdict == TOO_FEW
    assert (
        verdict(0.1, 0.5) == HOLDS
        and verdict(-0.5, -0.1) == REVERSED
        and verdict(-0.1, 0.1) == NOISE
        and verdict(0.0, 1.0) == NOISE
    )
    same = paired_t_interval([3.0, 4.0], [1.0, 2.0])  # the same difference on every seed: no spread
    assert (same.low, same.high, same.verdict) == (2.0, 2.0, HOLDS)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_interval([1.0, 2.0], [1.0])
