"""Stage 4, ensemble: combine the generalist with its specialists and evaluate like the paper.

Reads top to bottom: load the generalist, the clustering stage's groups and the trained
specialists (checked against each other), choose the specialists' temperature on the holdout
split and route the test split through the ensemble, both read block by block from the stage's
:class:`~generalist.data.source.ExampleSource` (:mod:`orchestration.ensemble_pass`: in this
process for in-memory data, on Ray Data actors for a streaming source; each specialist runs only
on the examples whose generalist top-``n`` class is in its group; a frozen shared trunk runs
once), then report generalist vs ensemble top-1, the
conditional accuracy on covered examples and the paper's Table 4 breakdown by the number of
specialists covering the true class. Writes ``evaluation.json``, ``table4.json`` and
``table4.md``; logs the metrics and the table to the stage's MLflow run. Then (``ensemble.cache``)
computes the soft-target cache of ``ensemble.cache.split`` with Ray Data into ``cache/``
(:mod:`orchestration.soft_cache`; Ray as configured in the ``ray`` section), whose
``manifest.json`` is an output of the stage.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from generalist.data.source import ExampleSource, InMemorySource
from orchestration.artifacts import (
    CACHE_DIR,
    COMBINATION,
    EVALUATION,
    MANIFEST,
    TABLE4,
    TABLE4_MD,
    load_ensemble,
    load_same_compute,
)
from orchestration.config import EnsembleConfig, leaf_keys
from orchestration.ensemble_pass import Pool, Scorer, holdout_nll, predict_test
from orchestration.files import write_json
from orchestration.parallel import connect
from orchestration.pipeline import Stage, StageContext, StageResult
from orchestration.soft_cache import build_cache, data_identity
from orchestration.tables import format_number, table4_table
from specialists.ensemble import RoutedEnsemble, evaluate_predictions

NAME = "ensemble"
# Where and how fast the cache is computed, not what it holds: changing these never re-runs the stage.
EXECUTION_KEYS = ("cache.actors", "cache.gpus_per_actor")


def run(ctx: StageContext) -> StageResult:
    cfg, source = ctx.config.ensemble, ctx.source()
    loaded = load_ensemble(ctx.run_dir.path, top_n=cfg.top_n, tol=cfg.tol, max_iter=cfg.max_iter,
                           device=ctx.device)
    pool = _pool(ctx, source)
    ensemble, temperature_record = _combine_at(ctx, loaded.ensemble, source, pool)
    ctx.console.print(
        f"  generalist + {len(ensemble.specialists)} specialists, top_n={cfg.top_n}, "
        f"{'shared frozen trunk (heads only)' if ensemble.shared_trunk else 'full specialists'}; "
        f"{source.size('test'):,} test examples"
    )
    test = _predict(ctx, ensemble, source, pool)
    report = evaluate_predictions(test["labels"], test["general"], test["combined"], ensemble.membership,
                                  test["same_compute"])
    report.update(_routing_stats(test["n_active"], test["seconds"], ensemble))
    report.update(temperature_record)
    outputs = _write_outputs(ctx, report) + [COMBINATION]
    _log(ctx, report)
    print_report(ctx.console, report)
    metrics = _metrics(report)
    if cfg.cache.enabled:
        cache_outputs, cache_metrics = _build_cache(ctx, source)
        outputs, metrics = outputs + cache_outputs, {**metrics, **cache_metrics}
    return StageResult(outputs=outputs, metrics=metrics)


def _pool(ctx: StageContext, source: ExampleSource) -> Pool:
    """In this process for in-memory data (Ray Data's start-up costs more than scoring it); for
    a streaming source, ``ensemble.cache.actors`` Ray Data actors of ``gpus_per_actor`` GPUs."""
    if isinstance(source, InMemorySource):
        return Pool()
    cfg, ray_cfg = ctx.config.ensemble.cache, ctx.config.ray
    where = connect(ray_cfg.address, local_num_cpus=ray_cfg.local_num_cpus)
    ctx.console.print(f"  evaluation on {where}: {cfg.actors} Ray Data actors, {cfg.gpus_per_actor:g} GPU each")
    return Pool(ctx.run_dir.path.resolve(), cfg.actors, cfg.gpus_per_actor)


def _predict(ctx: StageContext, ensemble: RoutedEnsemble, source: ExampleSource, pool: Pool) -> dict[str, Any]:
    """The test labels, the top-1 of the generalist, of the ensemble and of the same-compute
    generalist (None if the specialists stage trained none), and the active specialists per
    example, (N,) each; ``seconds`` spent in the ensemble."""
    loaded = load_same_compute(ctx.run_dir.path)
    same_compute = None if loaded is None else loaded[0].to(ctx.device)
    scorer = Scorer(ensemble, same_compute, ctx.config.ensemble.batch_size, ctx.device)
    test = predict_test(scorer, source, pool=pool)
    for change in test.unconverged:
        ctx.console.print(f"  [yellow]warning[/] fixed point not converged in {ensemble.max_iter} "
                          f"iterations (max change {change:.2e}); raise ensemble.max_iter")
    return {**test.arrays(), "seconds": test.seconds}


TEMPERATURES = (1.0, 1.25, 1.5, 2.0, 3.0)


def _combine_at(ctx: StageContext, ensemble: RoutedEnsemble, source: ExampleSource,
                pool: Pool) -> tuple[RoutedEnsemble, dict[str, Any]]:
    """The ensemble at ``ensemble.specialist_temperature`` (or the one of TEMPERATURES with the
    best holdout log-likelihood of q), recorded in ``combination.json`` for every later user."""
    fixed = ctx.config.ensemble.specialist_temperature
    scorer = Scorer(ensemble, None, ctx.config.ensemble.batch_size, ctx.device)
    scores = {} if fixed is not None else holdout_nll(scorer, source, TEMPERATURES, pool=pool)
    chosen = fixed if fixed is not None else min(scores, key=scores.get)
    write_json(ctx.stage_dir / COMBINATION, {"specialist_temperature": chosen,
                                             "holdout_nll": {str(t): v for t, v in scores.items()}})
    if scores:
        ctx.console.print(f"  specialists combined at temperature {chosen:g} (holdout NLL of q: "
                          + ", ".join(f"T={t:g} {v:.4f}" for t, v in scores.items()) + ")")
    return replace(ensemble, specialist_temperature=chosen), {"specialist_temperature": chosen}


def _build_cache(ctx: StageContext, source: ExampleSource) -> tuple[list[str], dict[str, Any]]:
    """The soft-target cache of ``ensemble.cache.split``: its manifest (an output) and metrics."""
    cfg, ray_cfg = ctx.config.ensemble.cache, ctx.config.ray
    where = connect(ray_cfg.address, local_num_cpus=ray_cfg.local_num_cpus)
    ctx.console.print(f"  soft-target cache of the {cfg.split} split ({source.size(cfg.split):,} examples) "
                      f"on {where}: {cfg.actors} actors, {cfg.gpus_per_actor:g} GPU each")
    manifest = build_cache(
        ctx.run_dir.path, source, ctx.stage_dir / CACHE_DIR,
        identity=data_identity(ctx.config, cfg.split, source),
        top_k=cfg.top_k, dense_max_classes=cfg.dense_max_classes,
        shard_size=cfg.shard_size, num_actors=cfg.actors,
        gpus_per_actor=cfg.gpus_per_actor, batch_size=ctx.config.ensemble.batch_size, console=ctx.console,
    )
    layout = ("dense float16 log q" if manifest["layout"] == "dense"
              else f"top-{manifest['top_k']} float16 log q + int32 ids + residual")
    ctx.console.print(
        f"  cache: {manifest['n_examples']:,} examples, {layout} (K={manifest['num_classes']}), "
        f"{manifest['bytes_per_example']} bytes/example, {manifest['seconds']:.1f}s "
        f"({manifest['examples_per_s']:,.0f} examples/s) -> {ctx.stage_dir / CACHE_DIR}"
    )
    metrics = {"cache_bytes_per_example": manifest["bytes_per_example"],
               "cache_examples_per_s": manifest["examples_per_s"]}
    ctx.logger.log_metrics(metrics)
    ctx.logger.log_artifact(ctx.stage_dir / CACHE_DIR / MANIFEST, CACHE_DIR)
    return [f"{CACHE_DIR}/{MANIFEST}"], metrics


def _routing_stats(n_active: torch.Tensor, seconds: float, ensemble: RoutedEnsemble) -> dict[str, Any]:
    return {
        "n_specialists": len(ensemble.specialists),
        "top_n": ensemble.top_n,
        "shared_trunk": ensemble.shared_trunk,
        "mean_active_specialists": float(n_active.double().mean()),
        "fraction_routed": float((n_active > 0).double().mean()),
        "examples_per_s": len(n_active) / max(seconds, 1e-9),
    }


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_outputs(ctx: StageContext, report: dict[str, Any]) -> list[str]:
    write_json(ctx.stage_dir / EVALUATION, {k: _json_safe(v) for k, v in report.items()})
    write_json(ctx.stage_dir / TABLE4, report["table4"])
    (ctx.stage_dir / TABLE4_MD).write_text(table4_table(report["table4"]).markdown())
    return [EVALUATION, TABLE4, TABLE4_MD]


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("generalist_top1", "ensemble_top1", "same_compute_top1", "n_covered", "covered_generalist_top1",
            "covered_ensemble_top1", "covered_same_compute_top1", "n_examples", "n_specialists",
            "mean_active_specialists", "mean_covering_specialists", "fraction_routed", "examples_per_s")
    return {k: report[k] for k in keys
            if k in report and (isinstance(report[k], int) or math.isfinite(report[k]))}


def _log(ctx: StageContext, report: dict[str, Any]) -> None:
    log, rows = ctx.logger, report["table4"]
    log.log_metrics(_metrics(report))
    log.log_artifact(ctx.stage_dir / EVALUATION)
    table = {key: [r[key] for r in rows] for key in rows[0]}
    log.log_table(table, TABLE4)
    log.log_text(table4_table(rows).markdown(), TABLE4_MD)


def print_report(console, report: dict[str, Any]) -> None:
    """Top-1 summary and the Table 4 breakdown of the ensemble stage."""
    console.print(
        f"  test top1: generalist {format_number(report['generalist_top1'])} -> ensemble "
        f"{format_number(report['ensemble_top1'])} on {report['n_examples']:,} examples; covered by a "
        f"specialist: {report['n_covered']:,}, conditional top1 {format_number(report['covered_generalist_top1'])} "
        f"-> {format_number(report['covered_ensemble_top1'])}; {report['mean_active_specialists']:.2f} active "
        f"specialists per example"
    )
    if "same_compute_top1" in report:
        console.print(f"  same-compute generalist (trained on for what the specialists saw): test top1 "
                      f"{format_number(report['same_compute_top1'])}; ensemble minus same-compute "
                      f"{report['ensemble_top1'] - report['same_compute_top1']:+.4f}")
    console.print(table4_table(report["table4"]).rich())


STAGE = Stage(
    name=NAME,
    config_keys=leaf_keys(EnsembleConfig, NAME, exclude=EXECUTION_KEYS),
    upstream=("generalist", "clustering", "specialists"),
    run=run,
)
