"""study/stats.py: intervals on hand-checkable examples and against SciPy."""

import math

import numpy as np
import pytest
from scipy import stats

from moe_testbed.study.stats import difference_interval, mean_interval, spearman_interval, welch_interval


def test_mean_interval_hand_example():
    # 1, 2, 3: mean 2, s = 1, se = 1/sqrt(3); t(0.975, df=2) = 4.3027 (any t table)
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.estimate == 2.0 and iv.n == 3 and iv.how == "t"
    assert iv.high - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert iv.low == pytest.approx(2.0 - 4.302652729911275 / math.sqrt(3))


@pytest.mark.parametrize("seed", range(5))
def test_mean_interval_matches_scipy(seed):
    x = np.random.default_rng(seed).normal(5.0, 0.3, size=2 + seed)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    iv = mean_interval(list(x))
    assert (iv.low, iv.high) == pytest.approx((lo, hi))


def test_one_seed_has_no_interval_and_nan_is_skipped():
    iv = mean_interval([0.5, float("nan"), None])
    assert iv.estimate == 0.5 and math.isnan(iv.low) and iv.separated == 0


def test_paired_difference_uses_the_per_seed_differences():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 0.5, 1: 1.4, 2: 2.6}  # differences 0.5, 0.6, 0.4: mean 0.5, s = 0.1
    iv = difference_interval(a, b)
    assert iv.how == "paired t" and iv.estimate == pytest.approx(0.5)
    assert iv.high - 0.5 == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert iv.separated == 1  # a clearly above b, though unpaired the spreads overlap
    assert welch_interval(list(a.values()), list(b.values())).separated == 0


def test_welch_matches_scipy():
    rng = np.random.default_rng(7)
    x, y = rng.normal(1.0, 0.2, 5), rng.normal(0.8, 0.5, 4)
    iv = welch_interval(list(x), list(y))
    res = stats.ttest_ind(x, y, equal_var=False)
    ci = res.confidence_interval(0.95)
    assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high))
    assert difference_interval(dict(enumerate(x)), {i + 10: v for i, v in enumerate(y)}).how == "welch t"


def test_spearman_rho_and_fisher_interval():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    y = [2.0, 1.0, 4.0, 3.0, 7.0, 5.0, 6.0]
    iv = spearman_interval(x, y)
    assert iv.estimate == pytest.approx(stats.spearmanr(x, y).statistic)
    # by hand: rank differences -1, 1, -1, 1, -2, 1, 1, so rho = 1 - 6 * 10 / (7 * 48) = 23/28;
    # z = atanh(rho), se = sqrt((1 + rho^2/2) / (7 - 3))
    rho = 23 / 28
    z, se = math.atanh(rho), math.sqrt((1 + rho**2 / 2) / 4)
    assert iv.estimate == pytest.approx(rho)
    assert (iv.low, iv.high) == pytest.approx(
        (math.tanh(z - 1.959963984540054 * se), math.tanh(z + 1.959963984540054 * se))
    )
    assert spearman_interval([1, 2, 3], [3, 2, 1]).n == 3 and math.isnan(spearman_interval([1, 2, 3], [3, 2, 1]).low)


def test_blocked_differences_by_hand_and_equal_to_paired_for_two():
    from moe_testbed.study.stats import blocked_differences

    vals = {"a": {0: 3.0, 1: 5.0}, "b": {0: 2.0, 1: 3.0}, "c": {0: 1.0, 1: 1.0}}
    # residuals of the 3 x 2 table: config means 4, 2.5, 1; seed means 2, 3; grand mean 2.5
    # r = x - row - col + grand: a: -1+... -> a(-0.5, +0.5), b(0, 0), c(+0.5, -0.5); SS = 1.0, df = 2
    ab = blocked_differences(vals, [("a", "b"), ("b", "c")])[0]
    half = stats.t.ppf(0.975, 2) * math.sqrt(2 * 0.5 / 2)
    assert ab.estimate == pytest.approx(1.5) and ab.high - 1.5 == pytest.approx(half) and ab.how == "blocked t"
    two = blocked_differences({"a": vals["a"], "b": vals["b"]}, [("a", "b")])[0]
    paired = difference_interval(vals["a"], vals["b"])
    assert (two.low, two.high) == pytest.approx((paired.low, paired.high))
