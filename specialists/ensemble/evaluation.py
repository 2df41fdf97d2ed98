"""The paper's evaluation (section 5, Table 4) of an ensemble from top-1 predictions: top-1 of
the generalist and of the ensemble, conditional accuracy on the examples whose true class some
specialist covers, the breakdown by the number of specialists covering the true class, and the
accuracy per group."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specialists.ensemble.membership import GroupMembership


def _top1(correct: Tensor) -> float:
    return float(correct.double().mean()) if correct.numel() else float("nan")


def _relative(ens_correct: int, gen_correct: int) -> float | None:
    return (ens_correct - gen_correct) / gen_correct if gen_correct else None


def _table4(coverage: Tensor, gen_ok: Tensor, ens_ok: Tensor, base_ok: Tensor | None) -> list[dict[str, Any]]:
    rows = []
    for k in range(int(coverage.max()) + 1 if coverage.numel() else 1):
        mask = coverage == k
        n, gen, ens = int(mask.sum()), int(gen_ok[mask].sum()), int(ens_ok[mask].sum())
        row = {
            "specialists_covering": k, "n_examples": n,
            "generalist_correct": gen, "ensemble_correct": ens, "delta_correct": ens - gen,
            "generalist_top1": gen / n if n else None, "ensemble_top1": ens / n if n else None,
            "relative_accuracy_change": _relative(ens, gen),
        }
        if base_ok is not None:
            base = int(base_ok[mask].sum())
            row.update(same_compute_correct=base, delta_vs_same_compute=ens - base,
                       relative_vs_same_compute=_relative(ens, base))
        rows.append(row)
    return rows


def evaluate_predictions(
    labels: Tensor, general_pred: Tensor, ensemble_pred: Tensor, membership: GroupMembership,
    baseline_pred: Tensor | None = None,
) -> dict[str, Any]:
    """The paper's evaluation (section 5, Table 4) from top-1 predictions.

    Args:
        labels, general_pred, ensemble_pred: ``(N,)`` int true classes and the top-1 classes of
            the generalist and of the ensemble.
        membership: the specialists' ``(S, K)`` groups; the *coverage* of an example is the
            number of groups holding its true class (can exceed 1 with overlapping groups).
        baseline_pred: optional ``(N,)`` top-1 of the same-compute generalist (fine-tuned for
            what the specialists saw): ``same_compute_top1`` and, in Table 4 and per group, the
            ensemble against it too.

    Returns:
        ``n_examples``, ``generalist_top1``, ``ensemble_top1``, ``n_covered`` (coverage >= 1),
        ``covered_generalist_top1``, ``covered_ensemble_top1`` (conditional accuracy; NaN when
        nothing is covered) and ``table4``: one row per coverage ``k = 0 .. max`` with
        ``n_examples``, correct counts, ``delta_correct`` and ``relative_accuracy_change`` =
        ``delta_correct / generalist_correct`` (None when the generalist got none right),
        and ``per_group``: per specialist ``m``, the test examples whose true class is in
        ``S_m`` with the generalist's and the ensemble's top-1 on them (None when empty).
    """
    labels, general_pred, ensemble_pred = (t.reshape(-1).long().cpu() for t in (labels, general_pred, ensemble_pred))
    if not labels.shape == general_pred.shape == ensemble_pred.shape:
        raise ValueError(f"labels {tuple(labels.shape)}, general_pred {tuple(general_pred.shape)} and "
                         f"ensemble_pred {tuple(ensemble_pred.shape)} must all be (N,)")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < membership.num_classes:
        raise ValueError(f"labels must lie in [0, {membership.num_classes}) for the membership's K")
    coverage = membership.dense(dtype=torch.long).sum(dim=0)[labels]  # (N,) groups holding the label
    gen_ok, ens_ok = general_pred == labels, ensemble_pred == labels
    base_ok = None if baseline_pred is None else baseline_pred.reshape(-1).long().cpu() == labels
    covered = coverage > 0
    report = {
        "n_examples": int(labels.numel()),
        "generalist_top1": _top1(gen_ok),
        "ensemble_top1": _top1(ens_ok),
        "n_covered": int(covered.sum()),
        "covered_generalist_top1": _top1(gen_ok[covered]),
        "covered_ensemble_top1": _top1(ens_ok[covered]),
        "mean_covering_specialists": float(coverage.double().mean()) if coverage.numel() else float("nan"),
        "table4": _table4(coverage, gen_ok, ens_ok, base_ok),
        "per_group": _per_group(membership, labels, gen_ok, ens_ok, base_ok),
    }
    if base_ok is not None:
        report.update(same_compute_top1=_top1(base_ok), covered_same_compute_top1=_top1(base_ok[covered]))
    return report


def _per_group(membership: GroupMembership, labels: Tensor, gen_ok: Tensor, ens_ok: Tensor,
               base_ok: Tensor | None) -> list[dict[str, Any]]:
    rows = []
    for m, group in enumerate(membership.groups):
        mask = torch.isin(labels, torch.tensor(group, dtype=torch.long))
        n = int(mask.sum())
        row = {"group": m, "n_examples": n,
               "generalist_top1": _top1(gen_ok[mask]) if n else None,
               "ensemble_top1": _top1(ens_ok[mask]) if n else None}
        if base_ok is not None:
            row["same_compute_top1"] = _top1(base_ok[mask]) if n else None
        rows.append(row)
    return rows
