"""Stage 2, clustering: confusable class groups from the generalist's prediction covariance.

Reads top to bottom: run the generalist over the holdout split (labels unused), accumulate
the covariance of its softmax outputs batch by batch, cluster the normalised columns into
groups, measure the grouping's stability across seeds, and write ``groups.json`` (what the
specialists stage reads) plus the review artifacts: a table with class names and captured
confusion mass, a reordered covariance heatmap, and a group-size histogram.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clustering import (
    ConfusableGroups,
    CovarianceAccumulator,
    SparseCoPredictionAccumulator,
    covariance_heatmap,
    group_size_histogram,
    group_table,
    stability_score,
)
from generalist.data import DataError
from generalist.train import iterate_batches
from orchestration.artifacts import COVARIANCE, GROUPS, GROUPS_TABLE, load_generalist
from orchestration.files import write_json
from orchestration.pipeline import Stage, StageContext, StageResult
from orchestration.tables import groups_table, table_cell

NAME = "clustering"


def run(ctx: StageContext) -> StageResult:
    cfg, data = ctx.config.clustering, ctx.data()
    if len(data.holdout) == 0:
        raise DataError(
            "the holdout split is empty: clustering needs held-out examples; "
            "raise data.options.holdout_per_class (built-in sets) or holdout_fraction"
        )
    model, meta = load_generalist(ctx.run_dir.path)
    class_names = meta["class_names"]
    cov = _covariance(ctx, model.to(ctx.device), data.holdout.images, len(class_names))

    estimator = ConfusableGroups(
        n_groups=cfg.n_groups,
        method=cfg.method,
        normalize=cfg.normalize,
        group_size=cfg.group_size,
        min_group_size=cfg.min_group_size,
        random_state=ctx.config.run.seed,
    ).fit(cov)
    stability = _stability(cfg, cov, estimator)
    rows = group_table(cov, estimator.groups_, class_names) if _dense(cov) else []
    metrics = {
        "n_groups": estimator.n_groups_,
        "n_specialist_groups": len(estimator.groups_),
        "n_unassigned": int(len(estimator.unassigned_)),
        "stability_ari": stability,
        "mass_captured": float(sum(r["mass_share"] for r in rows)),
        "holdout_examples": len(data.holdout),
    }
    outputs = _write_outputs(ctx, cov, estimator, rows, class_names, metrics)
    _log_review(ctx, cov, estimator, rows, class_names, metrics)
    ctx.console.print(
        f"  {len(estimator.groups_)} groups ({estimator.method_}, {estimator.normalize_} columns), "
        f"{len(estimator.unassigned_)} classes unassigned, stability ARI {stability:.3f}, "
        f"confusion mass captured {metrics['mass_captured']:.1%}"
    )
    print_groups(ctx.console, rows, limit=12)
    return StageResult(outputs=outputs, metrics=metrics)


def _dense(cov: Any) -> bool:
    return isinstance(cov, np.ndarray)


@torch.no_grad()
def _covariance(ctx: StageContext, model: torch.nn.Module, images: torch.Tensor, num_classes: int):
    """Dense K x K covariance, or the sparse top-k co-prediction matrix for very large K."""
    cfg = ctx.config.clustering
    sparse = cfg.sparse_top_k is not None
    acc = (
        SparseCoPredictionAccumulator(num_classes, top_k=cfg.sparse_top_k)
        if sparse
        else CovarianceAccumulator(num_classes)
    )
    dummy = torch.zeros(len(images), dtype=torch.long)
    for x, _ in iterate_batches(images, dummy, batch_size=cfg.batch_size, shuffle=False, device=ctx.device):
        probs = torch.softmax(model(x).double(), dim=1).cpu()  # (B, K) at T = 1
        acc.update(probs.numpy())
    return acc.matrix() if sparse else acc.covariance()


def _stability(cfg, cov, estimator) -> float:
    if cfg.stability_seeds < 2:
        return float("nan")
    seeds = tuple(range(cfg.stability_seeds))
    method = estimator.method_
    return float(stability_score(cov, n_groups=estimator.n_groups_, method=method,
                                 normalize=estimator.normalize_, seeds=seeds))


def _groups_record(estimator, class_names, metrics) -> dict[str, Any]:
    return {
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "method": estimator.method_,
        "normalize": estimator.normalize_,
        "n_groups": int(estimator.n_groups_),
        "overlapping": estimator.group_size is not None,
        "groups": [
            {"id": i, "classes": [int(c) for c in g], "names": [class_names[c] for c in g]}
            for i, g in enumerate(estimator.groups_)
        ],
        "unassigned": [int(c) for c in estimator.unassigned_],
        "metrics": metrics,
    }


def _write_outputs(ctx, cov, estimator, rows, class_names, metrics) -> list[str]:
    write_json(ctx.stage_dir / GROUPS, _groups_record(estimator, class_names, metrics))
    write_json(ctx.stage_dir / GROUPS_TABLE, rows)
    outputs = [GROUPS, GROUPS_TABLE]
    if _dense(cov):
        np.save(ctx.stage_dir / COVARIANCE, cov)
        outputs.append(COVARIANCE)
    return outputs


def _log_review(ctx, cov, estimator, rows, class_names, metrics) -> None:
    log = ctx.logger
    log.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    log.set_tags({"specdistill.method": estimator.method_, "specdistill.normalize": estimator.normalize_})
    log.log_artifact(ctx.stage_dir / GROUPS)
    if rows:
        table = {key: [table_cell(r[key]) for r in rows] for key in rows[0]}
        log.log_table(table, GROUPS_TABLE)
        log.log_text(groups_table(rows).markdown(), "groups.md")
    if _dense(cov):
        log.log_figure(covariance_heatmap(cov, estimator.groups_, class_names), "covariance_heatmap.png")
    log.log_figure(group_size_histogram(estimator.groups_), "group_sizes.png")


def print_groups(console, rows: list[dict[str, Any]], limit: int | None = None) -> None:
    """The groups table in the terminal (the first ``limit`` groups)."""
    console.print(groups_table(rows[:limit] if limit else rows).rich())
    if limit and len(rows) > limit:
        console.print(f"  ... {len(rows) - limit} more groups (specdistill groups RUN shows all)")


STAGE = Stage(
    name=NAME,
    config_keys=("clustering", "run.seed"),
    upstream=("generalist",),
    run=run,
)
