"""Confusable-group discovery for the specialist stage (DESIGN 2.1).

Accumulate the class covariance of the generalist's held-out predictions, cluster its
normalised columns into groups of confusable classes, and describe the groups.
"""

from clustering.accumulate import CovarianceAccumulator, SparseCoPredictionAccumulator
from clustering.groups import ConfusableGroups, resolve_method, stability_score
from clustering.plots import covariance_heatmap, group_size_histogram
from clustering.report import confusion_mass_share, group_table, reorder_by_groups
from clustering.selection import choose_n_groups
from clustering.synthetic import (
    covariance_from_labels,
    planted_covariance,
    planted_labels,
    simulate_topk_predictions,
)

__all__ = [
    "ConfusableGroups",
    "CovarianceAccumulator",
    "SparseCoPredictionAccumulator",
    "choose_n_groups",
    "confusion_mass_share",
    "covariance_from_labels",
    "covariance_heatmap",
    "group_size_histogram",
    "group_table",
    "planted_covariance",
    "planted_labels",
    "reorder_by_groups",
    "resolve_method",
    "simulate_topk_predictions",
    "stability_score",
]
