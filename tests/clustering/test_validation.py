"""Every bad input raises ValueError naming the problem and the fix."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from clustering import (
    ConfusableGroups,
    CovarianceAccumulator,
    SparseCoPredictionAccumulator,
    choose_n_groups,
    confusion_mass_share,
    planted_covariance,
    stability_score,
)

PROBS = np.full((4, 5), 0.2)


@pytest.fixture(scope="module")
def cov() -> np.ndarray:
    return planted_covariance(40, 4, seed=0)[0]


@pytest.mark.parametrize("n_groups", [0, -3, 41])
def test_n_groups_out_of_range(cov: np.ndarray, n_groups: int) -> None:
    with pytest.raises(ValueError, match="n_groups"):
        ConfusableGroups(n_groups=n_groups).fit(cov)


def test_fewer_than_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        CovarianceAccumulator(1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SparseCoPredictionAccumulator(1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ConfusableGroups(n_groups=1).fit(np.ones((1, 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("acc_cls", [CovarianceAccumulator, SparseCoPredictionAccumulator])
def test_nonfinite_probabilities(acc_cls: type, bad: float) -> None:
    probs = PROBS.copy()
    probs[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        acc_cls(5).update(probs)


@pytest.mark.parametrize("acc_cls", [CovarianceAccumulator, SparseCoPredictionAccumulator])
def test_rows_that_are_not_probability_vectors(acc_cls: type) -> None:
    negative = PROBS.copy()
    negative[0] = [-0.1, 0.3, 0.3, 0.3, 0.2]
    with pytest.raises(ValueError, match="negative.*softmax"):
        acc_cls(5).update(negative)
    with pytest.raises(ValueError, match="sums to 1.1.*not 1"):
        acc_cls(5).update(PROBS * 1.1)
    with pytest.raises(ValueError, match="sums to 0.9995"):
        acc_cls(5).update(PROBS * 0.9995)
    acc_cls(5).update(PROBS * (1 + 5e-5))  # within the 1e-4 tolerance
    with pytest.raises(ValueError, match="5 columns but .* num_classes=6"):
        acc_cls(6).update(PROBS)
    with pytest.raises(ValueError, match="2-D"):
        acc_cls(5).update(PROBS[0])
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="softmax"):
        acc_cls(5).update(logits * 10)


def test_bad_topk_input() -> None:
    acc = SparseCoPredictionAccumulator(10, top_k=2)
    with pytest.raises(ValueError, match="top_k=2"):
        acc.update((np.full((3, 3), 0.1), np.zeros((3, 3), dtype=int)))
    with pytest.raises(ValueError, match="repeat a class"):
        acc.update((np.full((1, 2), 0.1), np.array([[4, 4]])))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        acc.update((np.full((1, 2), 0.1), np.array([[4, 10]])))
    with pytest.raises(ValueError, match="sum to more than 1"):
        acc.update((np.full((1, 2), 0.6), np.array([[1, 2]])))
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        SparseCoPredictionAccumulator(10, top_k=0)
    assert SparseCoPredictionAccumulator(10, top_k=20).top_k == 10  # keeps all classes


@pytest.mark.parametrize("acc_cls", [CovarianceAccumulator, SparseCoPredictionAccumulator])
def test_empty_holdout(acc_cls: type) -> None:
    acc = acc_cls(5)
    acc.update(np.zeros((0, 5)))
    method = acc.covariance if acc_cls is CovarianceAccumulator else acc.matrix
    with pytest.raises(ValueError, match="holdout split is empty.*held-out fraction"):
        method()
    acc.update(PROBS[:1])
    with pytest.raises(ValueError, match="ddof=1 needs more than 1"):
        method()


def test_mean_of_empty_accumulator() -> None:
    with pytest.raises(ValueError, match="holdout split is empty"):
        CovarianceAccumulator(3).mean()


@pytest.mark.parametrize("matrix", [np.ones((3, 4)), np.ones(5), sp.csr_matrix(np.ones((2, 3)))])
def test_non_square_covariance(matrix) -> None:
    with pytest.raises(ValueError, match="square"):
        ConfusableGroups(n_groups=2).fit(matrix)
    with pytest.raises(ValueError, match="square"):
        confusion_mass_share(matrix, [[0, 1]])


def test_non_symmetric_covariance(cov: np.ndarray) -> None:
    skewed = cov.copy()
    skewed[0, 5] += 0.01 * np.abs(cov).max()
    with pytest.raises(ValueError, match="not symmetric.*C.T"):
        ConfusableGroups(n_groups=4).fit(skewed)
    with pytest.raises(ValueError, match="not symmetric"):
        ConfusableGroups(n_groups=4).fit(sp.csr_matrix(skewed))
    with pytest.raises(ValueError, match="not symmetric"):
        choose_n_groups(skewed)


def test_nonfinite_or_negative_variance_covariance(cov: np.ndarray) -> None:
    bad = cov.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        ConfusableGroups(n_groups=4).fit(bad)
    neg = cov.copy()
    neg[3, 3] = -1.0
    with pytest.raises(ValueError, match="negative variance"):
        ConfusableGroups(n_groups=4).fit(neg)
    with pytest.raises(ValueError, match="zero variance"):
        ConfusableGroups(n_groups=2).fit(np.zeros((4, 4)))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "dbscan"}, "method='dbscan' is not supported"),
        ({"normalize": "zscore"}, "normalize='zscore' is not supported"),
        ({"group_size": 1}, "group_size=1 is below min_group_size=2"),
        ({"group_size": 50}, "group_size=50 exceeds the 40"),
        ({"max_iter": 0}, "max_iter must be an int >= 1"),
        ({"min_group_size": 0}, "min_group_size must be an int >= 1"),
    ],
)
def test_bad_estimator_parameters(cov: np.ndarray, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConfusableGroups(n_groups=4, **params).fit(cov)


def test_bad_selection_arguments(cov: np.ndarray) -> None:
    with pytest.raises(ValueError, match="distinct seeds"):
        stability_score(cov, n_groups=4, seeds=(0, 0))
    with pytest.raises(ValueError, match="candidate=60 is out of range"):
        choose_n_groups(cov, candidates=[2, 60])
    with pytest.raises(ValueError, match="rule='gap' is not supported"):
        choose_n_groups(cov, rule="gap")
