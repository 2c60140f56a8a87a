"""The metrics of record (docs/metrics.md), pinned on a hand-computed table and checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from moe_testbed.routing import metrics as M

# Hand example: E = 4 experts, D = 2 domains, 20 routed slots.
#            d0  d1
#   e0        6   0     load 6/20 = 0.30
#   e1        2   2     load 4/20 = 0.20
#   e2        0   9     load 9/20 = 0.45
#   e3        1   0     load 1/20 = 0.05
#   m_d       9  11
N_EC = np.array([[6, 0], [2, 2], [0, 9], [1, 0]])
F = np.array([0.30, 0.20, 0.45, 0.05])


def test_load():
    np.testing.assert_allclose(M.load(N_EC), F)


def test_utilization_hand():
    # 1/E = 0.25: min(.30,.25) + min(.20,.25) + min(.45,.25) + min(.05,.25) = .25 + .20 + .25 + .05 = 0.75
    assert M.utilization(F) == pytest.approx(0.75)


def test_entropy_hand():
    # H = -(.3 ln .3 + .2 ln .2 + .45 ln .45 + .05 ln .05)
    #   = .361192 + .321888 + .359328 + .149787 = 1.192195;  / ln 4 (1.386294) = 0.859987
    h = -(0.3 * math.log(0.3) + 0.2 * math.log(0.2) + 0.45 * math.log(0.45) + 0.05 * math.log(0.05))
    assert h == pytest.approx(1.192195, abs=1e-6)
    assert M.load_entropy(F) == pytest.approx(h / math.log(4))
    assert M.load_entropy(F) == pytest.approx(0.859987, abs=1e-6)
    assert M.load_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(0.5)  # 0 log 0 = 0: ln 2 / ln 4


def test_maxvio_hand():
    # max f * E - 1 = 0.45 * 4 - 1 = 0.8
    assert M.max_vio(F) == pytest.approx(0.8)


def test_dead_hand():
    # threshold 0.1 / 4 = 0.025: e3 has 0.05 -> alive; nobody dead.  With [.5,.48,.02,0]: e2 and e3 dead -> 2/4.
    assert M.dead_share(F) == 0.0
    assert M.dead_share([0.5, 0.48, 0.02, 0.0]) == 0.5


def test_purity_hand():
    # max per expert: 6 + 2 + 9 + 1 = 18 of 20 -> 0.9
    assert M.purity(N_EC) == pytest.approx(0.9)


def test_chance_purity_hand():
    # m = (9, 11), M = 20: max 11/20 = 0.55; the chance table f_e * m_d / M has the same purity.
    assert M.chance_purity(N_EC) == pytest.approx(0.55)
    assert M.purity(M.chance_counts(N_EC)) == pytest.approx(0.55)
    np.testing.assert_allclose(M.chance_counts(N_EC).sum(axis=1), N_EC.sum(axis=1))
    np.testing.assert_allclose(M.chance_counts(N_EC).sum(axis=0), N_EC.sum(axis=0))


def test_nmi_hand():
    # p(e,d) = n / 20; p(e) = F; p(d) = (.45, .55)
    # I = .30 ln(.30/(.30*.45)) + .10 ln(.10/(.20*.45)) + .10 ln(.10/(.20*.55))
    #   + .45 ln(.45/(.45*.55)) + .05 ln(.05/(.05*.45))
    #   = .30*.798508 + .10*.105361 + .10*(-.095310) + .45*.597837 + .05*.798508 = 0.549509
    # H(e) = 1.192195 (above), H(d) = -(.45 ln .45 + .55 ln .55) = .688139
    # NMI = .549509 / ((1.192195 + .688139) / 2) = 0.584481
    mi = 0.30 * math.log(1 / 0.45) + 0.10 * math.log(0.10 / 0.09) + 0.10 * math.log(0.10 / 0.11)
    mi += 0.45 * math.log(1 / 0.55) + 0.05 * math.log(1 / 0.45)
    assert mi == pytest.approx(0.549509, abs=1e-6)
    assert M.nmi(N_EC) == pytest.approx(mi / ((1.192195 + 0.688139) / 2), abs=1e-6)
    assert M.nmi(N_EC) == pytest.approx(0.584481, abs=1e-6)


def test_specialization_hand():
    # Reference on the same data: domain 0 (9 slots) -> experts {0, 1}, domain 1 (11 slots) -> {2, 3}
    # n_ref = [[4.5, 0], [4.5, 0], [0, 5.5], [0, 5.5]], disjoint groups -> P_ref = 1
    # S = (0.9 - 0.55) / (1 - 0.55) = 0.35 / 0.45 = 0.777...
    ref = M.reference_counts([9, 11], [[0, 1], [2, 3]], 4)
    np.testing.assert_allclose(ref, [[4.5, 0], [4.5, 0], [0, 5.5], [0, 5.5]])
    assert M.purity(ref) == 1.0
    assert M.specialization(M.purity(N_EC), M.purity(ref), M.chance_purity(N_EC)) == pytest.approx(7 / 9)


def test_reference_counts_overlap():
    # E = 3 < D * k = 4: d0 -> {0, 1}, d1 -> {1, 2}, 10 slots each
    # n_ref = [[5, 0], [5, 5], [0, 5]]: purity = (5 + 5 + 5) / 20 = 0.75 < 1
    ref = M.reference_counts([10, 10], [[0, 1], [1, 2]], 3)
    np.testing.assert_allclose(ref, [[5, 0], [5, 5], [0, 5]])
    assert M.purity(ref) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="out of range"):
        M.reference_counts([1, 1], [[0], [3]], 3)
    with pytest.raises(ValueError, match="2 domains"):
        M.reference_counts([1, 1], [[0]], 3)


def test_drop_rate_and_gate_mass_hand():
    # 20 routed + 5 dropped = 25 slots: 5 / 25 = 0.2.  Gate mass: 14.4 summed over 16 tokens -> 0.9
    assert M.drop_rate(20, 5) == pytest.approx(0.2)
    assert M.gate_mass(14.4, 16) == pytest.approx(0.9)


def test_routing_scalars_keys_and_values():
    counts = np.stack([N_EC, N_EC[::-1]])  # L1 is L0 with experts relabelled: same metrics
    ref = np.stack([M.reference_counts([9, 11], [[0, 1], [2, 3]], 4)] * 2)
    out = M.routing_scalars(
        counts,
        ["L1", "L3"],
        drops_LC=[[5, 0], [0, 0]],
        gate_mass_sum_LC=[[7.2, 7.2], [8.0, 8.0]],
        tokens_LC=[[8, 8], [8, 8]],
        ref_counts_LEC=ref,
        prefix="val/",
    )
    metrics = ["util", "purity", "nmi", "entropy", "maxvio", "dead", "drop_rate", "gate_mass", "specialization"]
    metrics += ["purity_ref", "purity_chance"]
    assert set(out) == {f"val/{m}/{n}" for m in metrics for n in ("L1", "L3", "mean")}
    assert out["val/util/L1"] == pytest.approx(0.75)
    assert out["val/purity/L3"] == pytest.approx(0.9)
    assert out["val/specialization/mean"] == pytest.approx(7 / 9)
    assert out["val/drop_rate/L1"] == pytest.approx(0.2)  # 5 / 25
    assert out["val/drop_rate/mean"] == pytest.approx(0.1)  # (0.2 + 0) / 2
    assert out["val/gate_mass/L1"] == pytest.approx(0.9)  # 14.4 / 16
    assert out["val/gate_mass/mean"] == pytest.approx(0.95)  # (0.9 + 1.0) / 2
    assert out["val/purity_chance/L1"] == pytest.approx(0.55)
    assert out["val/purity_ref/L1"] == 1.0


def test_routing_scalars_optional_keys_and_torch():
    out = M.routing_scalars(torch.tensor(np.stack([N_EC])), ["L0"])
    assert set(out) == {f"{m}/{n}" for m in ("util", "purity", "nmi", "entropy", "maxvio", "dead", "purity_chance")
                        for n in ("L0", "mean")}  # fmt: skip
    assert out["purity/L0"] == pytest.approx(0.9)
    # gate mass needs both sums and token counts
    assert "gate_mass/L0" not in M.routing_scalars(np.stack([N_EC]), ["L0"], gate_mass_sum_LC=[[1.0, 1.0]])
    assert M.routing_scalars(np.zeros((0, 4, 2)), []) == {}
    with pytest.raises(ValueError):
        M.routing_scalars(np.stack([N_EC]), ["L0", "L1"])


def test_empty_layer_is_nan_not_crash():
    counts = np.stack([np.zeros((4, 2), dtype=np.int64), N_EC])
    ref = np.stack([np.zeros((4, 2)), M.reference_counts([9, 11], [[0, 1], [2, 3]], 4)])
    out = M.routing_scalars(counts, ["L0", "L1"], [[0, 0], [0, 0]], [[0.0, 0.0], [1.0, 1.0]], [[0, 0], [1, 1]], ref)
    for key in ("util", "purity", "nmi", "entropy", "maxvio", "dead", "drop_rate", "gate_mass", "specialization"):
        assert math.isnan(out[f"{key}/L0"]), key
    assert out["util/mean"] == pytest.approx(0.75)  # the mean skips the empty layer
    all_empty = M.routing_scalars(np.zeros((2, 4, 2)), ["L0", "L1"])
    assert math.isnan(all_empty["util/mean"])


def test_specialization_undefined_when_reference_is_chance():
    # One domain: every router is as pure as the reference (1 = 1) -> NaN
    n = np.array([[3], [5]])
    ref = M.reference_counts([8], [[0, 1]], 2)
    assert M.purity(ref) == M.chance_purity(n) == 1.0
    assert math.isnan(M.specialization(M.purity(n), M.purity(ref), M.chance_purity(n)))


def _labels(n_EC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand a contingency table into one (expert, domain) label pair per slot."""
    e_idx, d_idx = np.nonzero(n_EC)
    reps = n_EC[e_idx, d_idx]
    return np.repeat(e_idx, reps), np.repeat(d_idx, reps)


@pytest.mark.parametrize("seed", range(20))
def test_purity_and_nmi_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    E, C = int(rng.integers(2, 12)), int(rng.integers(2, 7))
    # sparse-ish tables so that some experts or domains are empty, as in real routing
    n_EC = rng.integers(0, 30, size=(E, C)) * (rng.random((E, C)) < 0.6)
    if n_EC.sum() == 0:
        n_EC[0, 0] = 1
    experts, domains = _labels(n_EC)
    assert M.nmi(n_EC) == pytest.approx(normalized_mutual_info_score(domains, experts), abs=1e-9)
    cm_CE = contingency_matrix(domains, experts)  # classes x clusters (empty rows/columns dropped)
    assert M.purity(n_EC) == pytest.approx(cm_CE.max(axis=0).sum() / cm_CE.sum(), abs=1e-9)


@pytest.mark.parametrize(
    "n_EC",
    [np.array([[5, 0], [0, 0]]), np.array([[5, 3], [0, 0]]), np.array([[5, 0], [3, 0]]), np.array([[2, 2], [2, 2]])],
    ids=["one-expert-one-domain", "one-expert", "one-domain", "independent"],
)
def test_nmi_edge_cases_match_sklearn(n_EC):
    experts, domains = _labels(n_EC)
    assert M.nmi(n_EC) == pytest.approx(normalized_mutual_info_score(domains, experts), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_utilization_is_one_minus_tv_and_bounded(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, 20))
    f = rng.dirichlet(np.full(E, 0.3))
    tv = 0.5 * np.abs(f - 1.0 / E).sum()
    u = M.utilization(f)
    assert u == pytest.approx(1.0 - tv)
    assert 1.0 / E - 1e-12 <= u <= 1.0 + 1e-12
    assert 0.0 <= M.max_vio(f) <= E - 1 + 1e-12


def test_utilization_extremes():
    assert M.utilization(np.full(8, 1 / 8)) == pytest.approx(1.0)
    assert M.utilization(np.eye(8)[0]) == pytest.approx(1 / 8)


def test_reference_with_disjoint_groups_has_purity_one_and_full_utilization():
    rng = np.random.default_rng(0)
    E, C, k = 16, 8, 2
    groups = [list(range(d * k, (d + 1) * k)) for d in range(C)]
    ref = M.reference_counts(np.full(C, 1000), groups, E)
    assert M.purity(ref) == 1.0
    assert M.utilization(M.load(ref)) == pytest.approx(1.0)
    assert M.nmi(ref) == pytest.approx(2 * math.log(8) / (math.log(16) + math.log(8)))  # I = H(d); H(e) = ln 16
    # imbalanced domains keep purity 1
    assert M.purity(M.reference_counts(rng.integers(1, 100, C), groups, E)) == 1.0
