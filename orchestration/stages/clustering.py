"""Stage 2, clustering: confusable class groups from the generalist's holdout predictions.

Reads top to bottom: run the generalist over the holdout split once, block by block
(:mod:`orchestration.covariance_job`: in this process for in-memory data, on Ray Data actors for
a streaming source), accumulating the covariance of its softmax outputs and (for the default
``clustering.affinity: confusion``) the soft confusion of two halves of the holdout examples;
group the classes (:class:`AffinityGroups`: spectral clustering of the confusion affinity, the
number of groups chosen by the excess confusion it captures on the other half, unrelated groups
dissolved, optional overlap; or the covariance columns with :class:`ConfusableGroups`); judge
the grouping by the share of holdout confusion mass it keeps inside groups against random groups
of the same sizes; measure its stability across seeds; write ``groups.json`` (what the
specialists stage reads) plus the review artifacts: a table with class names, a reordered
covariance heatmap, a group-size histogram, and per group a montage and a page
(:mod:`orchestration.review`). With ``clustering.groups_file`` the edited groups replace the
computed ones (:mod:`orchestration.groups_record`); with ``clustering.require_approval`` the
pipeline waits after this stage for ``specdistill groups RUN --approve``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from clustering import (
    ConfusableGroups,
    covariance_heatmap,
    group_size_histogram,
    group_table,
    stability_score,
)
from clustering.affinity_groups import AffinityGroups
from clustering.confusion import grouping_quality
from clustering.review import ConfusionCounts
from generalist.data import DataError, Split
from generalist.data.source import ExampleSource, InMemorySource
from generalist.data.splits import derive_seed
from orchestration.artifacts import (
    COVARIANCE,
    GROUPS,
    GROUPS_TABLE,
    HOLDOUT_CONFUSION,
    generalist_metadata,
    load_generalist,
)
from orchestration.config import ConfigError
from orchestration.covariance_job import (
    SPLIT,
    HoldoutPartial,
    PassSettings,
    block_starts,
    holdout_statistics,
    local_statistics,
)
from orchestration.files import read_json, sha256_file, write_json
from orchestration.groups_edit import SOURCE_COMPUTED, SOURCE_EDITED
from orchestration.groups_record import (
    CONFUSION,
    GROUPS_COMPUTED,
    GROUPS_DIFF,
    GROUPS_DIFF_MD,
    SOURCE_TAG,
    add_confusion_shares,
    approval_message,
    edit_outputs,
)
from orchestration.parallel import connect
from orchestration.pipeline import Stage, StageContext, StageResult, task_progress
from orchestration.review import (
    IMAGES_PER_CLASS,
    MONTAGE_CLASSES,
    MONTAGES,
    log_review,
    review_entries,
)
from orchestration.tables import groups_table, table_cell

NAME = "clustering"


@dataclass
class HoldoutStats:
    """What one pass of the generalist over the holdout split gives."""

    cov: Any                                  # (K, K) covariance, or sparse top-k co-prediction
    confusion: list[np.ndarray] = field(default_factory=list)   # soft confusion of 2 halves
    copred: list[np.ndarray] = field(default_factory=list)      # E[p p^T] of the 2 halves
    # The holdout confusion counts, sparse: ``true``, ``predicted`` class ids and ``count``
    # (examples of ``true`` the generalist predicted as ``predicted``), any K.
    hard_counts: dict[str, np.ndarray] = field(default_factory=dict)

    @cached_property
    def total_confusion(self) -> np.ndarray | None:
        """The soft confusion of the whole holdout split (summed once: K x K, read several times)."""
        return self.confusion[0] + self.confusion[1] if self.confusion else None


@dataclass(frozen=True)
class Grouping:
    """The groups, however they were found."""

    groups: list[np.ndarray]
    unassigned: np.ndarray
    n_groups: int
    method: str
    normalize: str | None
    overlapping: bool
    stability: float
    scores: dict[int, float] = field(default_factory=dict)


def run(ctx: StageContext) -> StageResult:
    cfg, source = ctx.config.clustering, ctx.source()
    n_holdout = source.size(SPLIT)
    if n_holdout == 0:
        raise DataError(
            "the holdout split is empty: clustering needs held-out examples; "
            "raise data.options.holdout_per_class (built-in sets) or holdout_fraction"
        )
    _check_affinity(cfg)
    class_names = generalist_metadata(ctx.run_dir.path)["class_names"]
    stats = _holdout_pass(ctx, source, len(class_names))
    grouping = _group(ctx, stats)
    rows = group_table(stats.cov, grouping.groups, class_names) if _dense(stats.cov) else []
    if rows and stats.total_confusion is not None:
        add_confusion_shares(rows, stats.total_confusion)
    metrics = _metrics(grouping, stats, rows, n_holdout)
    outputs = _write_outputs(ctx, stats, grouping, rows, class_names, metrics)
    _log_review(ctx, stats.cov, grouping, rows, class_names, metrics)
    groups_source = SOURCE_COMPUTED
    if cfg.groups_file:
        outputs, metrics, groups_source = _apply_groups_file(ctx, Path(cfg.groups_file), outputs)
        rows = read_json(ctx.stage_dir / GROUPS_TABLE)
    ctx.logger.set_tags({SOURCE_TAG: groups_source})
    _log_group_pages(ctx, source, class_names, groups_source)
    _print_summary(ctx, grouping, metrics, rows)
    return StageResult(outputs=outputs, metrics=metrics, details={"groups_source": groups_source})


def _apply_groups_file(ctx: StageContext, path: Path, outputs: list[str]) -> tuple[list[str], dict[str, Any], str]:
    """Replace the computed groups by the edited ones of ``clustering.groups_file``."""
    written, diff = edit_outputs(ctx.stage_dir, path, generalist=ctx.upstream["generalist"].digest)
    for name in (GROUPS_DIFF_MD, GROUPS_DIFF):
        ctx.logger.log_artifact(ctx.stage_dir / name, "edit")
    ctx.console.print(f"  groups edited by {path}: {len(diff['moved_classes'])} classes moved (groups_diff.md)")
    metrics = read_json(ctx.stage_dir / GROUPS)["metrics"]
    return sorted({*outputs, *written}), metrics, SOURCE_EDITED


def _log_group_pages(ctx: StageContext, source: ExampleSource, class_names: list[str], groups_source: str) -> None:
    """Per-group montages and pages and their overview, for the groups the specialists train on."""
    groups = [g["classes"] for g in read_json(ctx.stage_dir / GROUPS)["groups"]]
    with np.load(ctx.stage_dir / HOLDOUT_CONFUSION) as loaded:
        counts = ConfusionCounts(**loaded)
    train = _montage_examples(source, groups, class_names, counts)
    log_review(ctx.logger, groups, class_names, counts, train, groups_source)


def _montage_examples(source: ExampleSource, groups: list[list[int]], class_names: list[str],
                      counts: ConfusionCounts) -> Split:
    """The first IMAGES_PER_CLASS training examples of each class a montage shows (the first
    MONTAGE_CLASSES classes of the MONTAGES groups with the most confusion), in split order."""
    shown = {c for entry in review_entries(groups, class_names, counts)[:MONTAGES]
             for c in groups[entry["id"]][:MONTAGE_CLASSES]}
    positions = [source.class_positions("train", [c])[:IMAGES_PER_CLASS] for c in sorted(shown)]
    return source.take("train", np.sort(np.concatenate([np.zeros(0, np.int64), *positions])))


def groups_file_digest(config) -> dict[str, str]:
    """The edited groups file's content as a clustering input: editing it re-runs the stage."""
    path = config.clustering.groups_file
    if not path:
        return {}
    if not Path(path).exists():
        raise ConfigError(f"clustering.groups_file={path} does not exist; write it with "
                          "`specdistill groups RUN --export FILE`, or set clustering.groups_file=null")
    return {"groups_file": sha256_file(Path(path))}


def approval_gate(config, run_dir: Path, uri: str, experiment_id: str) -> str | None:
    """Stop after clustering until the groups are approved (``clustering.require_approval``)."""
    return approval_message(run_dir, uri, experiment_id) if config.clustering.require_approval else None


def _check_affinity(cfg) -> None:
    if cfg.affinity != "covariance" and cfg.sparse_top_k is not None:
        raise ConfigError(
            f"clustering.affinity={cfg.affinity} needs the dense K x K statistics, but "
            "clustering.sparse_top_k asks for the sparse large-K path; set clustering.affinity=covariance "
            "with sparse_top_k, or sparse_top_k=null")


def _dense(cov: Any) -> bool:
    return isinstance(cov, np.ndarray)


def _holdout_pass(ctx: StageContext, source: ExampleSource, num_classes: int) -> HoldoutStats:
    """Covariance of the holdout predictions (dense, or sparse top-k for very large K), and the
    soft confusion and co-prediction of two random halves of the holdout examples."""
    cfg = ctx.config.clustering
    settings = PassSettings(num_classes, cfg.batch_size, cfg.sparse_top_k)
    n = source.size(SPLIT)
    gen = torch.Generator().manual_seed(derive_seed(ctx.config.run.seed, 0xC1))
    half_of = (torch.randperm(n, generator=gen) % 2).numpy().astype(np.uint8) if settings.halves else None
    actors, gpus = _actor_pool(ctx, source)
    started = time.perf_counter()
    with task_progress(ctx, "holdout pass", len(block_starts(n, settings, max(1, actors))[1])) as advance:
        partial = _score(ctx, source, settings, half_of, actors, gpus, advance)
    where = f"on {actors} Ray Data actors" if actors else "in this process"
    ctx.console.print(f"  holdout pass: {n:,} examples, {num_classes:,} classes in "
                      f"{time.perf_counter() - started:.1f}s {where}; grouping them ({cfg.affinity} affinity, "
                      f"stability over {cfg.stability_seeds} seeds)")
    return HoldoutStats(partial.covariance(), partial.confusions(), partial.copredictions(),
                        partial.hard_counts())


def _actor_pool(ctx: StageContext, source: ExampleSource) -> tuple[int, float]:
    """Actors and GPUs per actor of the Ray Data pass: one actor per GPU of the cluster (none
    with ``run.device=cpu``), else one per CPU. ``(0, 0)`` for in-memory data, scored in this
    process: on 2 cores a pass on Ray Data actors costs 8 to 15 s of start-up (worker processes,
    torch, the model), scoring a few hundred examples here well under a second."""
    if isinstance(source, InMemorySource):
        return 0, 0.0
    import ray

    connect(ctx.config.ray.address, local_num_cpus=ctx.config.ray.local_num_cpus)
    resources = ray.cluster_resources()
    gpus = 0 if ctx.config.run.device == "cpu" else int(resources.get("GPU", 0))
    return (gpus, 1.0) if gpus else (max(1, int(resources.get("CPU", 1))), 0.0)


def _score(ctx: StageContext, source: ExampleSource, settings: PassSettings, half_of: np.ndarray | None,
           actors: int, gpus: float, advance) -> HoldoutPartial:
    if not actors:
        model = load_generalist(ctx.run_dir.path)[0].to(ctx.device)
        return local_statistics(model, source, settings=settings, half_of=half_of, device=ctx.device,
                                on_block=advance)
    return holdout_statistics(str(ctx.run_dir.path.resolve()), source, settings=settings, half_of=half_of,
                              actors=actors, gpus_per_actor=gpus, on_block=advance)


def _group(ctx: StageContext, stats: HoldoutStats) -> Grouping:
    cfg = ctx.config.clustering
    if cfg.affinity == "covariance":
        return _covariance_groups(ctx, stats.cov)
    if cfg.affinity == "confusion":
        chosen = stats.confusion
    elif cfg.affinity == "copred":
        chosen = stats.copred
    else:  # offdiag: the covariance of each half, negative entries clipped by the normalisation
        chosen = [_centred(c, conf) for c, conf in zip(stats.copred, stats.confusion, strict=True)]

    def fit(seed: int, n_groups: int | None) -> AffinityGroups:
        return AffinityGroups(n_groups=n_groups, overlap=cfg.overlap, min_group_size=cfg.min_group_size,
                              random_state=seed).fit(*stats.confusion, *chosen)

    est = fit(ctx.config.run.seed, cfg.n_groups)
    stability = _affinity_stability(cfg, est, fit, ctx.config.run.seed)
    return Grouping(est.groups_, est.unassigned_, int(est.n_groups_), f"spectral on {cfg.affinity}", None,
                    cfg.overlap > 0, stability, {int(k): float(v) for k, v in est.scores_.items()})


def _centred(copred: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """Covariance of one half from its co-prediction: E[p p^T] - mean mean^T (clipped later)."""
    mean = confusion.sum(axis=0) / confusion.sum()
    return copred - np.outer(mean, mean)


def _affinity_stability(cfg, est: AffinityGroups, fit, seed: int) -> float:
    """Mean pairwise ARI of the disjoint clusters over ``stability_seeds`` seeds (same k)."""
    if cfg.stability_seeds < 2:
        return float("nan")
    labels = [est.labels_] + [fit(seed + s, est.n_groups_).labels_ for s in range(1, cfg.stability_seeds)]
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    return float(np.mean([adjusted_rand_score(a, b) for a, b in pairs]))


def _covariance_groups(ctx: StageContext, cov: Any) -> Grouping:
    cfg = ctx.config.clustering
    est = ConfusableGroups(n_groups=cfg.n_groups, method=cfg.method, normalize=cfg.normalize,
                           group_size=cfg.group_size, min_group_size=cfg.min_group_size,
                           random_state=ctx.config.run.seed).fit(cov)
    return Grouping(est.groups_, est.unassigned_, int(est.n_groups_), est.method_, est.normalize_,
                    cfg.group_size is not None, _stability(cfg, cov, est))


def _metrics(grouping: Grouping, stats: HoldoutStats, rows: list[dict[str, Any]], n_holdout: int) -> dict[str, Any]:
    metrics = {
        "n_groups": grouping.n_groups,
        "n_specialist_groups": len(grouping.groups),
        "n_unassigned": int(len(grouping.unassigned)),
        "stability_ari": grouping.stability,
        "mass_captured": float(sum(r["mass_share"] for r in rows)),
        "holdout_examples": n_holdout,
        "mean_group_size": float(np.mean([len(g) for g in grouping.groups])),
        "class_coverage": float(sum(len(g) for g in grouping.groups) / stats.cov.shape[0]),
    }
    if stats.total_confusion is not None:
        metrics.update(grouping_quality(stats.total_confusion, grouping.groups))
    return metrics


def _print_summary(ctx: StageContext, grouping: Grouping, metrics: dict[str, Any], rows) -> None:
    quality = ""
    if "captured_share" in metrics:
        quality = (f"; they hold {metrics['captured_share']:.1%} of the holdout confusion mass, random groups "
                   f"of the same sizes {metrics['random_share']:.1%} ({metrics['ratio_to_random']:.1f}x)")
    ctx.console.print(
        f"  {len(grouping.groups)} groups ({grouping.method}), {len(grouping.unassigned)} classes "
        f"unassigned, stability ARI {grouping.stability:.3f}{quality}")
    print_groups(ctx.console, rows, limit=12)


def _stability(cfg, cov, estimator) -> float:
    if cfg.stability_seeds < 2:
        return float("nan")
    seeds = tuple(range(cfg.stability_seeds))
    method = estimator.method_
    return float(stability_score(cov, n_groups=estimator.n_groups_, method=method,
                                 normalize=estimator.normalize_, seeds=seeds))


def _groups_record(grouping: Grouping, class_names, metrics) -> dict[str, Any]:
    return {
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "method": grouping.method,
        "normalize": grouping.normalize,
        "n_groups": grouping.n_groups,
        "overlapping": grouping.overlapping,
        "selection_scores": {str(k): v for k, v in grouping.scores.items()},
        "groups": [
            {"id": i, "classes": [int(c) for c in g], "names": [class_names[c] for c in g]}
            for i, g in enumerate(grouping.groups)
        ],
        "unassigned": [int(c) for c in grouping.unassigned],
        "metrics": metrics,
        "source": SOURCE_COMPUTED,
    }


def _write_outputs(ctx, stats: HoldoutStats, grouping: Grouping, rows, class_names, metrics) -> list[str]:
    (ctx.stage_dir / GROUPS_COMPUTED).unlink(missing_ok=True)   # left by an edit of an earlier attempt
    write_json(ctx.stage_dir / GROUPS, _groups_record(grouping, class_names, metrics))
    write_json(ctx.stage_dir / GROUPS_TABLE, rows)
    np.savez(ctx.stage_dir / HOLDOUT_CONFUSION, **stats.hard_counts)
    outputs = [GROUPS, GROUPS_TABLE, HOLDOUT_CONFUSION]
    if _dense(stats.cov):
        np.save(ctx.stage_dir / COVARIANCE, stats.cov)
        outputs.append(COVARIANCE)
    if stats.total_confusion is not None:
        np.save(ctx.stage_dir / CONFUSION, stats.total_confusion)
        outputs.append(CONFUSION)
    return outputs


def _log_review(ctx, cov, grouping: Grouping, rows, class_names, metrics) -> None:
    log = ctx.logger
    log.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    log.set_tags({"specdistill.method": grouping.method, "specdistill.normalize": str(grouping.normalize)})
    log.log_artifact(ctx.stage_dir / GROUPS)
    if rows:
        table = {key: [table_cell(r[key]) for r in rows] for key in rows[0]}
        log.log_table(table, GROUPS_TABLE)
        log.log_text(groups_table(rows).markdown(), "groups.md")
    if _dense(cov):
        log.log_figure(covariance_heatmap(cov, grouping.groups, class_names), "covariance_heatmap.png")
    log.log_figure(group_size_histogram(grouping.groups), "group_sizes.png")


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
    extra_inputs=groups_file_digest,
    gate=approval_gate,
)
