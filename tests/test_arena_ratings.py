"""Arena ratings against independent references: synthetic votes from known strengths, the
study's own scikit-learn construction (``scoring.py:compute_mle_elo``), a direct per-vote
likelihood maximisation with scipy, and a hand-computed online Elo."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from scipy.stats import kendalltau

from basque_jax.arena.ratings import compute_ratings, online_elo

N_MODELS = 8
TRUE_ELO = np.linspace(780.0, 1220.0, N_MODELS)  # mean 1000, ~63 points apart
NAMES = [f"model{i}" for i in range(N_MODELS)]  # sorted order == index order


def synthetic_votes(n_votes: int, seed: int, tie_rate: float = 0.0) -> list[tuple[str, str, str]]:
    """Votes drawn from the Bradley-Terry model with strengths TRUE_ELO (uniform pairs)."""
    rng = np.random.default_rng(seed)
    votes = []
    for _ in range(n_votes):
        i, j = rng.choice(N_MODELS, 2, replace=False)
        if rng.random() < tie_rate:
            votes.append((NAMES[i], NAMES[j], "tie" if rng.random() < 0.5 else "both_bad"))
            continue
        p_i = 1 / (1 + 10 ** ((TRUE_ELO[j] - TRUE_ELO[i]) / 400))
        votes.append((NAMES[i], NAMES[j], "a" if rng.random() < p_i else "b"))
    return votes


def by_name(report: dict, key: str = "rating") -> np.ndarray:
    table = {r["name"]: r[key] for r in report["models"]}
    return np.array([table[n] for n in NAMES], dtype=float)


@pytest.fixture(scope="module")
def votes() -> list[tuple[str, str, str]]:
    return synthetic_votes(5000, seed=7, tie_rate=0.15)


def test_recovers_the_order_of_known_strengths(votes):
    report = compute_ratings(votes, bootstrap=0)
    fitted = by_name(report)
    tau = kendalltau(fitted, TRUE_ELO).statistic
    assert tau >= 0.9, (tau, fitted)
    assert report["votes"] == 5000
    assert [r["rating"] for r in report["models"]] == sorted(fitted, reverse=True)
    assert abs(fitted.mean() - 1000) < 1e-6  # anchored at mean 1000
    assert sum(r["votes"] for r in report["models"]) == 2 * 5000
    assert sum(r["ties"] + r["both_bad"] for r in report["models"]) == 2 * sum(
        w in ("tie", "both_bad") for _, _, w in votes)


def study_mle_elo(votes) -> np.ndarray:
    """The study's ``compute_mle_elo`` (FastChat's): scikit-learn logistic regression on
    +-log(10) features, wins weighted 2 and ties (incl. both bad) 1 in each direction."""
    from sklearn.linear_model import LogisticRegression

    index = {n: i for i, n in enumerate(NAMES)}
    win = np.zeros((N_MODELS, N_MODELS))
    for a, b, w in votes:
        i, j = index[a], index[b]
        if w == "a":
            win[i, j] += 2
        elif w == "b":
            win[j, i] += 2
        else:
            win[i, j] += 1
            win[j, i] += 1
    rows, ys, weights = [], [], []
    for i in range(N_MODELS):
        for j in range(N_MODELS):
            if i == j:
                continue
            x = np.zeros(N_MODELS)
            x[i], x[j] = math.log(10), -math.log(10)
            rows += [x, x]
            ys += [1.0, 0.0]
            weights += [win[i, j], win[j, i]]
    # The study: LogisticRegression(fit_intercept=False, penalty=None). penalty=None is
    # spelled C=inf in scikit-learn >= 1.8; newton-cg for a tight optimum.
    lr = LogisticRegression(fit_intercept=False, C=np.inf, solver="newton-cg", tol=1e-12,
                            max_iter=10_000)
    lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(weights))
    return 400 * lr.coef_[0] + 1000


def direct_mle_elo(votes) -> np.ndarray:
    """Per-vote Bradley-Terry log-likelihood (a tie = half a win each way), maximised with
    BFGS over mean-zero strengths."""
    index = {n: i for i, n in enumerate(NAMES)}
    a = np.array([index[v[0]] for v in votes])
    b = np.array([index[v[1]] for v in votes])
    score = np.array([{"a": 1.0, "b": 0.0}.get(v[2], 0.5) for v in votes])

    def objective(free):
        beta = np.append(free, -free.sum())  # Elo / 400 units, sum zero
        d = math.log(10) * (beta[a] - beta[b])
        p = expit(d)
        nll = -(score * log_expit(d) + (1 - score) * log_expit(-d)).sum()
        g_d = -(score - p) * math.log(10)
        grad = np.zeros(N_MODELS)
        np.add.at(grad, a, g_d)
        np.add.at(grad, b, -g_d)
        return nll, grad[:-1] - grad[-1]

    res = minimize(objective, np.zeros(N_MODELS - 1), jac=True, method="BFGS",
                   options={"gtol": 1e-10, "maxiter": 10_000})
    return 1000 + 400 * np.append(res.x, -res.x.sum())


def test_matches_the_studys_logistic_regression_and_a_direct_fit(votes):
    ours = by_name(compute_ratings(votes, bootstrap=0))
    np.testing.assert_allclose(ours, study_mle_elo(votes), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours, direct_mle_elo(votes), atol=1e-6, rtol=0)


def test_bootstrap_intervals_contain_the_truth():
    votes = synthetic_votes(5000, seed=11)  # no ties: the generating model is exactly BT
    report = compute_ratings(votes, bootstrap=200, ci=0.95, seed=3)
    low, high, rating = by_name(report, "ci_low"), by_name(report, "ci_high"), by_name(report)
    assert np.all(low <= rating) and np.all(rating <= high)
    truth = TRUE_ELO
    covered = (low <= truth) & (truth <= high)
    assert covered.sum() >= 6, (low, TRUE_ELO, high)  # 95 % intervals: expect ~7.6 of 8
    widths = high - low
    assert np.all((widths > 20) & (widths < 120)), widths  # ~ +-1.96 * 15 Elo at 1250 votes
    again = compute_ratings(votes, bootstrap=200, ci=0.95, seed=3)
    assert again["models"] == report["models"]  # seeded: reproducible


def test_online_elo_hand_computed():
    votes = [("x", "y", "a"), ("y", "z", "tie"), ("z", "x", "b")]
    # K = 32 from 1000, by hand (E = 1 / (1 + 10 ** ((R_other - R_self) / 400))):
    # (1) x beats y at even odds: x = 1016, y = 984.
    # (2) y ties z (1000): E_y = 1 / (1 + 10 ** 0.04) = 0.4769904; y = 984 + 32 * 0.0230096
    #     = 984.736307, z = 1000 - 32 * 0.0230096 = 999.263693.
    # (3) x beats z: E_x = 1 / (1 + 10 ** ((999.263693 - 1016) / 400)) = 0.5240669;
    #     x = 1016 + 32 * 0.4759331 = 1031.229860, z = 999.263693 - 15.229860 = 984.033833.
    ratings = online_elo(votes, k=32)
    assert ratings == pytest.approx({"x": 1031.229860, "y": 984.736307, "z": 984.033833},
                                    abs=1e-5)
    assert sum(ratings.values()) == pytest.approx(3000)  # zero-sum updates
    report = compute_ratings(votes, bootstrap=0, k=32)
    assert by_name_of(report, "online_elo") == pytest.approx(ratings)
    assert report["online_elo"]["k"] == 32
    assert compute_ratings(votes, bootstrap=0)["online_elo"]["k"] == 4.0  # FastChat's K


def by_name_of(report: dict, key: str) -> dict[str, float]:
    return {r["name"]: r[key] for r in report["models"]}


def test_online_elo_depends_on_order_but_bradley_terry_does_not(votes):
    first = compute_ratings(votes[:800], bootstrap=0)
    reverse = compute_ratings(votes[:800][::-1], bootstrap=0)
    assert by_name_of(first, "rating") == pytest.approx(by_name_of(reverse, "rating"), abs=1e-6)
    assert by_name_of(first, "online_elo") != pytest.approx(by_name_of(reverse, "online_elo"))


def test_degenerate_votes_are_flagged_not_hidden():
    votes = [("x", "y", "a"), ("y", "x", "b"), ("y", "x", "a"), ("x", "z", "a"), ("x", "z", "b")]
    votes += [("w", "x", "a")] * 3 + [("p", "q", "tie")]  # w only wins; p, q never meet x/y/z
    report = compute_ratings(votes, bootstrap=10, models=["unused"])
    assert by_name_of(report, "unbounded") == {"x": False, "y": False, "z": False, "w": True,
                                               "p": True, "q": True, "unused": False}
    ratings = by_name_of(report, "rating")
    assert ratings["unused"] is None
    assert (ratings["x"] + ratings["y"] + ratings["z"]) / 3 == pytest.approx(1000, abs=1e-6)
    assert ratings["w"] > 2000  # where the fit stopped, far above the group
    # the finite group's ratings are the ones it would get without the others
    alone = compute_ratings(votes[:5], bootstrap=0)
    for name in "xyz":
        assert ratings[name] == pytest.approx(by_name_of(alone, "rating")[name], abs=1e-3)
    assert report["warnings"] and report["warnings"][0].startswith("p, q, w: not linked")
