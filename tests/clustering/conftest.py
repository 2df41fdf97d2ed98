"""Shared fixtures: small planted covariances with known groups (pinned seeds)."""

import numpy as np
import pytest

from clustering import planted_covariance


@pytest.fixture(scope="session")
def easy_planted() -> tuple[np.ndarray, np.ndarray]:
    """(120, 120) low-rank-plus-noise covariance with 6 planted groups of 20, noise 0.5."""
    return planted_covariance(120, 6, noise=0.5, seed=0)


@pytest.fixture(scope="session")
def easy_softmax() -> tuple[np.ndarray, np.ndarray]:
    """(90, 90) covariance of simulated softmax predictions with 5 planted groups."""
    return planted_covariance(90, 5, noise=0.25, seed=3, kind="softmax", samples_per_class=20)
