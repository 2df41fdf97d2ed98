"""Stage 5, distill: a compact student learns the ensemble's soft targets (DESIGN §2.4, §2.5).

Reads top to bottom: load the teachers (the generalist, the routed ensemble, the soft-target
cache) and check them against the data; check the extra losses' layers on one batch; then
train each row of the comparison with the same architecture, budget and seed: the student
(``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` plus extra losses, targets
from the cache or the ensemble online), a student on hard labels only, one distilled from the
generalist alone, the models of ``distill.scheme`` (:mod:`orchestration.distill_schemes`), and
a data-free (DAFL) one. Each is evaluated at T = 1 on the test split
(top-1, top-5, parameters, per-example latency at batch 1) beside the generalist and the
ensemble. Writes ``student.safetensors`` + ``student.json`` (baselines under ``baselines/``),
``results.json`` and ``results.md``; logs per-epoch metrics prefixed by row and registers the
student in the MLflow model registry (alias ``candidate``). With ``ray.train.workers`` > 1 (or
``ray.train.use_gpu``) the student and the two baselines train on Ray Train workers, each
loading the teachers itself (:mod:`orchestration.student_train`); the scheme and data-free rows,
the evaluation and everything after it stay in the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.data_free_train import DataFreeSettings, DataFreeTrainer
from distill.latency import latencies_side_by_side
from distill.train import (
    build_objective,
    feature_pairs,
    pair_paths,
    probe_feature_shapes,
)
from generalist.data.source import ExampleSource
from generalist.models import count_parameters
from generalist.train import set_seed
from orchestration.artifacts import (
    BASELINES,
    CHECKPOINTS,
    METRICS,
    REGISTRY,
    RESULTS,
    RESULTS_MD,
    ROW,
    STUDENT,
    finished_row,
    load_evaluation,
    load_same_compute,
    stage_dir,
)
from orchestration.builders import precision_note
from orchestration.checkpoints import Checkpointer, CheckpointError, build_model, save_model
from orchestration.distill_schemes import SchemeModel, scheme_rows
from orchestration.files import read_json, write_json
from orchestration.model_card import model_card
from orchestration.onnx_export import ONNX_CHECK, export_student
from orchestration.pipeline import Stage, StageContext, StageResult
from orchestration.ray_train import SINGLE, check_replicas, on_ray_train, worker_context
from orchestration.student_train import (
    Row,
    evaluate_split,
    student_amp,
    train_on_workers,
    train_row,
)
from orchestration.tables import models_table
from orchestration.teachers import DistillError, Teachers, load_teachers, teacher_fns
from orchestration.tracking import TrackingError
from specialists.ensemble import (
    ensemble_forward,
)

NAME = "distill"
LATENCY_REPEATS = 20
LATENCY_ROUNDS = 5                       # round-robin rounds of the final latency comparison


def run(ctx: StageContext) -> StageResult:
    cfg, source = ctx.config.distill, ctx.source()
    teachers = load_teachers(ctx)
    spec = student_spec(ctx)
    pairs, shapes = check_extra_losses(ctx, teachers.generalist, spec)
    _print_plan(ctx, teachers, spec, pairs)
    on_workers = on_ray_train(ctx.config.ray.train)
    rows = [_train_row(ctx, row, spec, pairs, shapes, on_workers=on_workers)
            for row in plan_rows(ctx, teachers, pairs)]
    rows += scheme_rows(ctx, teachers, spec, train=lambda m: _train_row(ctx, _scheme_row(m), m.spec, {}, ({}, {})),
                        finish=lambda m, net: _finish_row(ctx, _scheme_row(m), ctx.stage_dir / m.folder, net, m.spec))
    if cfg.data_free.enabled:
        rows.append(_data_free_row(ctx, teachers, spec))
    rows = reference_rows(ctx, teachers) + rows
    measure_latencies_together(ctx, teachers, rows)
    onnx_files, onnx = export_student(ctx.stage_dir, split_images(source, "test"), ctx.console)
    outputs = _write_results(ctx, rows) + onnx_files
    registered = _register(ctx, teachers, spec, rows) if cfg.register_model else None
    if registered:
        outputs.append(REGISTRY)
    print_results(ctx.console, rows)
    metrics = {**_metrics(rows, registered), **onnx}
    ctx.logger.log_metrics(metrics)
    return StageResult(outputs=outputs, metrics=metrics,
                       details={"registered": registered, "data": source.describe()})


def split_images(source: ExampleSource, split: str, count: int | None = None) -> torch.Tensor:
    """The first ``count`` (default all) images of ``split``, (count, C, H, W) uint8, by ``take``."""
    size = source.size(split)
    return source.take(split, np.arange(size if count is None else min(count, size))).images


# -------------------------------------------------------------------------- student setup


def student_spec(ctx: StageContext) -> dict[str, Any]:
    cfg, source = ctx.config.distill, ctx.source()
    channels, height, _ = source.image_shape
    return {"name": cfg.student, "num_classes": source.num_classes, "in_channels": channels,
            "image_size": height, "width": cfg.width, "depth": cfg.depth}


def check_extra_losses(ctx: StageContext, generalist: nn.Module, spec: dict[str, Any]):
    """Layer pairs of ``distill.losses`` and their activation shapes, probed on 4 training
    images; DistillError (before any training) for unknown names, layers, shapes or options."""
    cfg = ctx.config.distill
    try:
        pairs = feature_pairs(cfg.losses, cfg.hint_layers, term_layers=cfg.layers)
        if not pairs:
            return {}, ({}, {})
        source = ctx.source()
        x = split_images(source, "train", 4).to(ctx.device).float() / 255.0
        student = build_model(spec).to(ctx.device)
        student_paths, teacher_paths = pair_paths(pairs)
        shapes = (probe_feature_shapes(student, student_paths, x, role="student"),
                  probe_feature_shapes(generalist, teacher_paths, x, role="teacher (generalist)"))
        build_objective(temperature=cfg.temperature, alpha=cfg.alpha, losses=cfg.losses, pairs=pairs,
                        student_shapes=shapes[0], teacher_shapes=shapes[1], options=cfg.loss_options,
                        num_examples=source.size("train"))
    except ValueError as exc:
        raise DistillError(f"distill.losses={dict(cfg.losses)} with distill.hint_layers="
                           f"{list(cfg.hint_layers)}, distill.layers={dict(cfg.layers)}: {exc}") from None
    return pairs, shapes


def plan_rows(ctx: StageContext, teachers: Teachers, pairs: dict) -> list[Row]:
    """The main student, then (distill.baselines) hard labels only and the generalist alone."""
    cfg = ctx.config.distill
    fns = teacher_fns(teachers, pair_paths(pairs)[1])
    label = "generalist" if cfg.teacher == "generalist" else f"ensemble ({cfg.targets})"
    rows = [Row(STUDENT, label, cfg.alpha, fns[cfg.teacher], True, "")]
    if cfg.baselines:
        rows.append(Row("hard_labels", "none (labels only)", 0.0, None, False, f"{BASELINES}/hard_labels"))
        if cfg.teacher != "generalist":
            rows.append(Row("generalist_kd", "generalist", cfg.alpha, fns["generalist"], True,
                            f"{BASELINES}/generalist_kd"))
    return rows


def _print_plan(ctx: StageContext, teachers: Teachers, spec: dict[str, Any], pairs: dict) -> None:
    cfg = ctx.config.distill
    student, teacher = count_parameters(build_model(spec)), count_parameters(teachers.generalist)
    ratio = teacher / student
    size = f"{ratio:.1f}x fewer" if ratio > 1 else f"{1 / ratio:.1f}x more"
    ctx.console.print(
        f"  student {cfg.student} width={cfg.width} depth={cfg.depth}: {student:,} parameters, "
        f"{size} than the generalist ({teacher:,}); teacher {cfg.teacher}"
        f"{f' ({cfg.targets} targets)' if cfg.teacher == 'ensemble' else ''}, T={cfg.temperature}, "
        f"alpha={cfg.alpha}, {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''} on "
        f"{ctx.source().size('train'):,} train examples"
    )
    ctx.console.print(f"  students train in {precision_note(ctx.device, student_amp(ctx), ctx.config.run.cpu_bf16)}; "
                      "the data-free one and every teacher in float32")
    if ratio <= 1:
        ctx.console.print("  [yellow]warning[/] the student is not smaller than the generalist; "
                          "lower distill.width or distill.depth")
    for term, layers in pairs.items():
        shown = ", ".join(f"student {s} -> generalist {t}" for s, t in layers) or "the predictions"
        ctx.console.print(f"  extra loss {term} (weight {cfg.losses[term]}): {shown}")
    if cfg.teacher == "generalist" and cfg.targets == "cache":
        ctx.console.print("  note: the cache holds the ensemble's targets; the generalist teaches online")


# ------------------------------------------------------------------------------ training


def _train_row(ctx: StageContext, row: Row, spec: dict[str, Any], pairs: dict, shapes: tuple, *,
               on_workers: bool = False) -> dict[str, Any]:
    """Train (or keep) one row and finish it in the driver; ``on_workers``: on Ray Train."""
    row_dir = ctx.stage_dir / row.folder
    if (kept := _finished_earlier(ctx, row.name, row_dir)) is not None:
        return kept
    if on_workers:
        student = train_on_workers(ctx, row, spec, pairs, shapes, row_worker)
    else:
        student = train_row(ctx, row, spec, pairs, shapes, SINGLE)["student"]
    return _finish_row(ctx, row, row_dir, student, spec)


def row_worker(payload: dict[str, Any]) -> None:
    """One Ray Train worker of a row: the teachers loaded from the run directory, the row
    rebuilt as the driver built it, :func:`train_row` as its rank, then a check that every rank
    holds the same weights (their sha256 is tagged on the stage's MLflow run)."""
    ctx, par = worker_context(payload)
    teachers = load_teachers(ctx)
    spec = payload["spec"]
    pairs, shapes = check_extra_losses(ctx, teachers.generalist, spec)
    row = next(r for r in plan_rows(ctx, teachers, pairs) if r.name == payload["row"])
    trained = train_row(ctx, row, spec, pairs, shapes, par)
    check_replicas(ctx.logger, par, trained, tag=f"specdistill.ray_train.{row.name}.weights_sha256")


def _finished_earlier(ctx: StageContext, name: str, row_dir: Path) -> dict[str, Any] | None:
    """The row's result when it finished earlier and its student files are whole; a damaged or
    missing student is reported and the row trains again from its last checkpoint."""
    kept, damage = finished_row(row_dir)
    if kept is not None:
        ctx.console.print(f"  {name}: finished earlier, kept ({row_dir / STUDENT}.safetensors)")
    elif damage is not None:
        ctx.console.print(f"  [yellow]warning[/] {name}: {damage}; training it again from its last checkpoint")
    return kept


def _scheme_row(model: SchemeModel) -> Row:
    """A scheme's model as a row of the comparison: logit KD only (no extra losses)."""
    return Row(model.name, model.teacher, model.alpha, model.teach, False, model.folder)


def _finish_row(ctx: StageContext, row: Row, row_dir: Path, student: nn.Module,
                spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate at T = 1 on the test split, save the student and its result row."""
    result = {"name": row.name, "teacher": row.teacher, **evaluate_model(ctx, student),
              "alpha": row.alpha, "path": f"{Path(row.folder) / STUDENT}.safetensors"}
    cfg = ctx.config.distill
    save_model(row_dir / STUDENT, student, {
        "model": spec, "class_names": list(ctx.source().class_names), "data": ctx.source().describe(),
        "teacher": row.teacher, "alpha": row.alpha, "temperature": cfg.temperature,
        "config": cfg.model_dump(mode="json"), "metrics": result,
    })
    write_json(row_dir / ROW, result)
    ctx.logger.log_metrics({f"{row.name}/test_{k}": result[k] for k in ("top1", "top5")})
    return result


def evaluate_model(ctx: StageContext, model: nn.Module | Callable, params: int | None = None) -> dict[str, Any]:
    """Test top-1/top-5 of ``model`` (scores for a float batch) and its parameters; its latency
    is measured later, for all models together (:func:`measure_latencies_together`)."""
    if isinstance(model, nn.Module):
        model.eval()
        params = count_parameters(model)
    scores = evaluate_split(ctx, model, "test")
    return {"top1": scores["top1"], "top5": scores["top5"], "params": params}


# ----------------------------------------------------------------------------- data-free


def _data_free_row(ctx: StageContext, teachers: Teachers, spec: dict[str, Any]) -> dict[str, Any]:
    """DAFL: a generator trained against the frozen generalist; the student sees only its samples
    (soft targets from the ensemble on those samples when the teacher is the ensemble)."""
    cfg, source, row_dir = ctx.config.distill, ctx.source(), ctx.stage_dir / BASELINES / "data_free"
    row = Row("data_free", f"{cfg.teacher} on generated images (DAFL)", 1.0, None, False,
              f"{BASELINES}/data_free")
    if (kept := _finished_earlier(ctx, row.name, row_dir)) is not None:
        return kept
    set_seed(ctx.config.run.seed)
    student = build_model(spec).to(ctx.device)
    ensemble = teachers.ensemble
    steps = cfg.data_free.steps_per_epoch * cfg.epochs
    ctx.console.print(f"  data_free: {cfg.data_free.generator_steps} generator steps, then {steps} "
                      f"student steps on generated images")
    settings = DataFreeSettings(
        image_shape=tuple(source.image_shape), num_classes=source.num_classes,
        generator_steps=cfg.data_free.generator_steps, student_steps=steps,
        batch_size=cfg.data_free.batch_size, latent_dim=cfg.data_free.latent_dim,
        temperature=cfg.temperature, lr=cfg.data_free.lr,
        seed=ctx.config.run.seed, feature_path="head", feature_capture="input",
        chunk_steps=cfg.data_free.steps_per_epoch)
    checkpoints = Checkpointer(row_dir / CHECKPOINTS)
    trainer = DataFreeTrainer(
        settings, teachers.generalist, student, device=ctx.device,
        teacher_probs=(lambda x: ensemble_forward(ensemble, x).q.float()) if cfg.teacher == "ensemble" else None,
        on_progress=_data_free_progress(ctx, {"generator": cfg.data_free.generator_steps, "student": steps}),
        on_chunk=lambda t: checkpoints.save(t.generator_steps_done + t.student_steps_done, t.student,
                                            {"trainer": t}, metadata={"model": spec}),
    )
    _resume_data_free(ctx, checkpoints, trainer)
    history = trainer.run()
    ctx.logger.log_metrics({"data_free/classes_covered": history["classes_covered"]})
    ctx.console.print(f"  data_free: the generator's samples cover {history['classes_covered']} of "
                      f"{source.num_classes} classes (teacher arg-max)")
    return _finish_row(ctx, row, row_dir, student, spec)


def _resume_data_free(ctx: StageContext, checkpoints: Checkpointer, trainer: DataFreeTrainer) -> None:
    """Continue a data-free row after its last saved chunk; a corrupt snapshot restarts it."""
    initial = trainer.state_dict()
    try:
        snapshot = checkpoints.resume(trainer.student, {"trainer": trainer})
    except CheckpointError as exc:
        ctx.console.print(f"[yellow]warning[/] data_free: cannot resume ({exc}); training from scratch")
        checkpoints.clear()
        trainer.load_state_dict(initial)
        return
    if snapshot is not None:
        ctx.console.print(f"  data_free: resuming after {trainer.generator_steps_done} generator and "
                          f"{trainer.student_steps_done} student steps")


def _data_free_progress(ctx: StageContext, totals: dict[str, int]):
    """DAFL progress: every report to MLflow (``data_free/<phase>_<metric>``), ~5 lines per phase."""
    next_line = {phase: total / 5 for phase, total in totals.items()}

    def on_progress(phase: str, step: int, metrics: dict[str, float]) -> None:
        ctx.logger.log_metrics({f"data_free/{phase}_{k}": v for k, v in metrics.items()}, step=step)
        if step >= next_line[phase] or step == totals[phase]:
            next_line[phase] = step + totals[phase] / 5
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            ctx.console.print(f"  data_free {phase} step {step}/{totals[phase]}  {shown}")

    return on_progress


# ---------------------------------------------------------------------- reference rows


def reference_rows(ctx: StageContext, teachers: Teachers) -> list[dict[str, Any]]:
    """The generalist and the ensemble on the same test split (top-1 from their stages)."""
    run_path, ensemble = ctx.run_dir.path, teachers.ensemble
    general = read_json(stage_dir(run_path, "generalist") / METRICS)
    general_row = {"name": "generalist", "teacher": "none (trained on labels)",
                   **evaluate_model(ctx, teachers.generalist)}
    general_row.update(top1=general["test_top1"], top5=general["test_top5"])
    heads_only = ensemble.shared_trunk   # shared trunk: a specialist adds only its head
    params = count_parameters(teachers.generalist) + sum(
        count_parameters(s.head) if heads_only else count_parameters(s) for s in ensemble.specialists)
    ensemble_row = {"name": "ensemble", "teacher": f"generalist + {len(ensemble.specialists)} specialists",
                    **evaluate_model(ctx, lambda x: ensemble_forward(ensemble, x).q, params)}
    evaluation = load_evaluation(run_path)
    ensemble_row["top1"] = evaluation["ensemble_top1"]
    rows = [general_row, ensemble_row]
    same = load_same_compute(run_path)
    if same is not None:  # the generalist's architecture: its size and latency
        rows.append({"name": "same_compute", "teacher": "generalist trained on for the specialists' examples",
                        **evaluate_model(ctx, same[0].to(ctx.device)), "same_latency_as": "generalist"})
    return rows


def measure_latencies_together(ctx: StageContext, teachers: Teachers, rows: list[dict[str, Any]]) -> None:
    """Every model's per-example latency at batch 1, measured side by side; sets ``latency_ms``
    on each row and logs ``<row>/test_latency_ms``.

    All models take turns (LATENCY_ROUNDS rounds of LATENCY_REPEATS calls each, under
    ``torch.inference_mode``) and each gets the median of its rounds, so the table compares
    them under the same conditions rather than under whatever the machine was doing when each
    finished training.
    """
    from orchestration.checkpoints import load_model

    ensemble = teachers.ensemble
    predictors: dict[str, Callable[[torch.Tensor], Any]] = {
        "generalist": teachers.generalist.eval(),
        "ensemble": lambda x: ensemble_forward(ensemble, x).q,
    }
    for row in rows:
        if "path" in row:
            model, _ = load_model(ctx.stage_dir / str(row["path"]).removesuffix(".safetensors"))
            predictors[row["name"]] = model.to(ctx.device)
    one = split_images(ctx.source(), "test", 1).to(ctx.device).float() / 255.0
    latency = latencies_side_by_side(predictors, one, rounds=LATENCY_ROUNDS, repeats=LATENCY_REPEATS)
    for row in rows:
        row["latency_ms"] = latency[row.pop("same_latency_as", row["name"])]
    ctx.logger.log_metrics({f"{row['name']}/test_latency_ms": row["latency_ms"] for row in rows})


# ------------------------------------------------------------------------------- outputs


def _write_results(ctx: StageContext, rows: list[dict[str, Any]]) -> list[str]:
    write_json(ctx.stage_dir / RESULTS, {"rows": rows, "temperature": ctx.config.distill.temperature,
                                         "alpha": ctx.config.distill.alpha})
    markdown = models_table(rows).markdown()
    (ctx.stage_dir / RESULTS_MD).write_text(markdown)
    ctx.logger.log_artifact(ctx.stage_dir / RESULTS)
    ctx.logger.log_text(markdown, RESULTS_MD)
    models = [f"{Path(r['path']).with_suffix('')}{ext}" for r in rows if "path" in r
              for ext in (".safetensors", ".json")]
    return [*models, RESULTS, RESULTS_MD]


def print_results(console, rows: list[dict[str, Any]]) -> None:
    console.print(models_table(rows, "Distillation: test accuracy, size and latency (T = 1)").rich())


def _register(ctx: StageContext, teachers: Teachers, spec: dict[str, Any],
              rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Log the main student with mlflow.pytorch into this stage's run; register it as candidate."""
    from orchestration.checkpoints import load_model
    from orchestration.model_registry import log_student

    cfg = ctx.config.distill
    student, meta = load_model(ctx.stage_dir / STUDENT)
    example = split_images(ctx.source(), "test", 2).float() / 255.0
    main = next(r for r in rows if r["name"] == STUDENT)
    metrics = {f"test_{k}": float(main[k]) for k in ("top1", "top5", "latency_ms", "params")}
    try:
        registered = log_student(
            ctx.logger.client, ctx.logger.run_id, student, example=example,
            class_names=teachers.class_names, metrics=metrics,
            params={f"distill.{k}": v for k, v in cfg.model_dump(mode="json").items()},
            extra_files=[ctx.stage_dir / f"{STUDENT}.json"], model_name=cfg.model_name,
            description=model_card(rows, teachers.class_names, main["teacher"], ctx.source().describe(),
                                   read_json(ctx.stage_dir / ONNX_CHECK)),
        ).to_dict()
    except TrackingError as exc:
        raise TrackingError(f"{exc}; the trained students are kept in {ctx.stage_dir}: re-run the same "
                            "command to register the student once MLflow answers (or distill.register_model=false)") from None
    write_json(ctx.stage_dir / REGISTRY, registered)
    ctx.console.print(f"  registered {registered['name']} version {registered['version']} as "
                      f"{registered['alias_uri']}")
    return registered


def _metrics(rows: list[dict[str, Any]], registered: dict[str, Any] | None) -> dict[str, Any]:
    by_name = {r["name"]: r for r in rows}
    main, general = by_name[STUDENT], by_name["generalist"]
    metrics = {f"{name}_top1": r["top1"] for name, r in by_name.items()}
    metrics.update(student_top5=main["top5"], student_params=main["params"],
                   student_latency_ms=main["latency_ms"], generalist_params=general["params"],
                   compression=general["params"] / main["params"])
    if registered:
        metrics["registered_version"] = int(registered["version"])
    return metrics


STAGE = Stage(
    name=NAME,
    config_keys=("distill", "data.augment", "run.seed", "run.cpu_bf16"),
    upstream=("generalist", "ensemble"),
    run=run,
)
