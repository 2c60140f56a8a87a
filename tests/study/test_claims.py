"""study/claims.py: the claim grammar and the verdicts (holds, reversed, not separated) on known values."""

import pytest

from moe_testbed.study import StudyError
from moe_testbed.study.claims import evaluate, parse_claim

HIGH = {0: 0.30, 1: 0.32, 2: 0.31}
MID = {0: 0.20, 1: 0.23, 2: 0.21}
NOISY = {0: 0.10, 1: 0.40, 2: 0.22}


def verdict(text, metric_values, moe=None):
    claim = parse_claim(text, "test")
    return evaluate(claim, {claim.metric: metric_values, **({} if not claim.metric2 else {})}, moe or [])


def test_order_holds_is_reversed_or_not_separated():
    v = verdict("a > b on specialization", {"a": HIGH, "b": MID})
    assert v.verdict == "holds" and v.effect.estimate == pytest.approx(0.0967, abs=1e-3) and v.effect.low > 0
    assert verdict("b > a on specialization", {"a": HIGH, "b": MID}).verdict == "reversed"
    assert verdict("a > n on specialization", {"a": HIGH, "n": NOISY}).verdict == "not separated"
    chain = verdict("a > b > n on specialization", {"a": HIGH, "b": MID, "n": NOISY})
    assert chain.verdict == "not separated" and "b - n" in chain.detail  # one link does not separate


def test_order_on_a_loss_means_lower_is_better():
    losses = {"moe": {0: 5.8, 1: 5.85, 2: 5.82}, "dense": {0: 6.1, 1: 6.15, 2: 6.12}}
    assert verdict("moe > dense on loss", losses).verdict == "holds"
    assert verdict("dense > moe on val/loss", losses).verdict == "reversed"


def test_equivalence_within_a_margin():
    a, b = {0: 5.80, 1: 5.81, 2: 5.79}, {0: 5.82, 1: 5.82, 2: 5.80}
    assert verdict("a ~ b on loss within 0.05", {"a": a, "b": b}).verdict == "holds"
    far = {0: 6.3, 1: 6.31, 2: 6.29}
    assert verdict("a ~ far on loss within 0.05", {"a": a, "far": far}).verdict == "reversed"
    assert verdict("a ~ n on loss within 0.05", {"a": a, "n": {0: 5.7, 1: 5.95, 2: 5.8}}).verdict == "not separated"


def test_indistinct_holds_until_a_pair_separates():
    assert verdict("a = n on specialization", {"a": HIGH, "n": NOISY}).verdict == "holds"
    v = verdict("a = b on specialization", {"a": HIGH, "b": MID})
    assert v.verdict == "reversed" and "a - b" in v.detail
    # Pooled over a chain, a noisy configuration widens every interval (one residual variance):
    assert verdict("a = b = n on specialization", {"a": HIGH, "b": MID, "n": NOISY}).verdict == "holds"


def test_a_chain_pools_its_seed_noise_which_two_seeds_alone_cannot_separate():
    a, b, c = {0: 0.40, 1: 0.45}, {0: 0.30, 1: 0.33}, {0: 0.20, 1: 0.22}
    pair = verdict("a > b on specialization", {"a": a, "b": b})  # paired t on 2 seeds: t(0.975, 1) = 12.7
    assert pair.verdict == "not separated"
    chain = verdict("a > b > c on specialization", {"a": a, "b": b, "c": c})  # df = (3 - 1)(2 - 1) = 2
    assert chain.verdict == "holds" and chain.effect.how == "blocked t"


def test_correlation_across_runs():
    spec = {f"c{i}": {0: 0.1 * i, 1: 0.1 * i + 0.01} for i in range(6)}
    loss = {f"c{i}": {0: 6.0 - 0.1 * i, 1: 6.0 - 0.1 * i - 0.005} for i in range(6)}
    claim = parse_claim("corr(specialization, loss) < 0", "test")
    values = {"val/specialization/mean": spec, "val/loss": loss}
    v = evaluate(claim, values, list(spec))
    assert v.verdict == "holds" and v.effect.estimate < -0.9 and v.effect.n == 12
    other = parse_claim("corr(specialization, loss) > 0 over c0, c1, c2, c3", "test")
    assert evaluate(other, values, list(spec)).verdict == "reversed"


def test_missing_configuration_is_na_and_bad_claims_are_user_errors():
    assert verdict("a > gone on specialization", {"a": HIGH}).verdict == "n/a"
    with pytest.raises(StudyError, match="cannot read claim"):
        parse_claim("a beats b", "spec.yaml claims[0]")
    with pytest.raises(StudyError, match="a string or a mapping"):
        parse_claim({"text": "a > b on x"}, "spec.yaml claims[1]")
    c = parse_claim({"claim": "a > b on purity", "source": "paper"}, "x")
    assert (c.metric, c.configs, c.source) == ("val/purity/mean", ["a", "b"], "paper")


def test_one_seed_gives_no_interval_and_no_separation():
    v = verdict("a > b on specialization", {"a": {0: 0.3}, "b": {0: 0.2}})
    assert v.verdict == "not separated" and "no interval" in v.detail
