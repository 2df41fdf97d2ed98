"""Training schemes of the distill stage (``distill.scheme``): each trains its models beside the
main student and the baselines and adds them as rows of the results table.

* ``mutual``: deep mutual learning (Zhang et al. 2018): ``distill.schemes.group_size`` students
  of the student's architecture trained together from scratch, each on its cross-entropy plus
  the KL divergence to the others' predictions (no teacher); rows ``mutual_1 .. mutual_M``.
* ``born_again``: born-again networks (Furlanello et al. 2018): ``distill.schemes.generations``
  models of the generalist's architecture; generation 1 learns from the generalist, generation
  ``g`` from generation ``g - 1``; rows ``born_again_1 .. born_again_G``.
* ``teacher_assistant`` (Mirzadeh et al. 2020): an assistant, the student's model at
  ``distill.schemes.assistant_width``, distilled from the run's teacher (``distill.teacher``),
  then the student distilled from the assistant; rows ``assistant`` and ``assistant_student``.

Every model gets the students' budget (``distill.epochs``, batch size, optimizer), the run's
seed and the KD objective at ``distill.temperature`` / ``distill.alpha`` (the extra
``distill.losses`` belong to the main student). Each training loop has one
:class:`orchestration.checkpoints.Checkpointer` under ``RUN/distill/schemes/<scheme>/``, so a
killed run resumes from the last epoch; a finished model (its ``row.json``) is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from distill.schemes import MutualGroup, assistant_width, mutual_one_epoch
from distill.train import TeacherFn, make_teacher, source_indexed_batches
from generalist.train import set_seed
from orchestration.artifacts import CHECKPOINTS, ROW, SCHEMES, STUDENT, generalist_metadata
from orchestration.builders import optimizer_and_schedule
from orchestration.checkpoints import Checkpointer, build_model, load_model
from orchestration.files import read_json
from orchestration.pipeline import StageContext, step_progress
from orchestration.student_train import evaluate_split
from orchestration.teachers import DistillError, Teachers, teacher_fns

__all__ = ["SchemeModel", "scheme_rows"]


@dataclass(frozen=True)
class SchemeModel:
    """One model a scheme trains: its row name, teacher (label and function), where it is saved."""

    name: str
    teacher: str                 # shown in the results table
    alpha: float                 # weight of the soft-target term
    teach: TeacherFn | None
    folder: str                  # relative to the stage dir
    spec: dict[str, Any]         # the model's architecture (a checkpoint's "model" spec)


TrainFn = Callable[[SchemeModel], dict[str, Any]]          # the stage's KD loop -> result row
FinishFn = Callable[[SchemeModel, nn.Module], dict[str, Any]]  # evaluate, save, write row.json


def scheme_rows(ctx: StageContext, teachers: Teachers, spec: dict[str, Any], *, train: TrainFn,
                finish: FinishFn) -> list[dict[str, Any]]:
    """The result rows of ``distill.scheme`` (none for ``standard``); ``train`` runs the stage's
    distillation loop for one model, ``finish`` evaluates, saves and records a trained one."""
    scheme = ctx.config.distill.scheme
    if scheme == "standard":
        return []
    ctx.console.print(f"  scheme {scheme}: {_describe(ctx)}")
    schemes = {"mutual": _mutual_rows, "born_again": _born_again_rows,
               "teacher_assistant": _assistant_rows}
    return schemes[scheme](ctx, teachers, spec, train, finish)


def _describe(ctx: StageContext) -> str:
    cfg = ctx.config.distill
    return {"mutual": f"{cfg.schemes.group_size} students learning from each other (T={cfg.schemes.mutual_temperature})",
            "born_again": f"{cfg.schemes.generations} generations of the generalist's architecture",
            "teacher_assistant": "an assistant between the generalist's and the student's width, "
                                 "then the student taught by it"}[cfg.scheme]


def _trained(ctx: StageContext, model: SchemeModel) -> TeacherFn:
    """The saved model of a finished scheme row as the next model's teacher (its logits online)."""
    network, _ = load_model(ctx.stage_dir / model.folder / STUDENT)
    return make_teacher(logits_model=network.to(ctx.device).eval())


# ------------------------------------------------------------------------- born again


def _born_again_rows(ctx, teachers: Teachers, spec, train: TrainFn, finish: FinishFn) -> list[dict[str, Any]]:
    cfg = ctx.config.distill
    architecture = dict(generalist_metadata(ctx.run_dir.path)["model"])
    teach, label, rows = make_teacher(logits_model=teachers.generalist), "generalist", []
    for generation in range(1, cfg.schemes.generations + 1):
        model = SchemeModel(f"born_again_{generation}", label, cfg.alpha, teach,
                            f"{SCHEMES}/born_again/generation_{generation}", architecture)
        rows.append(train(model))
        teach, label = _trained(ctx, model), model.name
    return rows


# ------------------------------------------------------------------------ teacher assistant


def _assistant_rows(ctx, teachers: Teachers, spec, train: TrainFn, finish: FinishFn) -> list[dict[str, Any]]:
    cfg = ctx.config.distill
    try:
        width = assistant_width(cfg.width, ctx.config.generalist.width, cfg.schemes.assistant_width)
    except ValueError as exc:
        raise DistillError(f"distill.scheme=teacher_assistant: {exc}") from None
    label = "generalist" if cfg.teacher == "generalist" else f"ensemble ({cfg.targets})"
    assistant = SchemeModel("assistant", label, cfg.alpha, teacher_fns(teachers, ())[cfg.teacher],
                            f"{SCHEMES}/teacher_assistant/assistant", {**spec, "width": width})
    rows = [train(assistant)]
    student = SchemeModel("assistant_student", "assistant", cfg.alpha, _trained(ctx, assistant),
                          f"{SCHEMES}/teacher_assistant/student", spec)
    return [*rows, train(student)]


# ---------------------------------------------------------------------------- mutual


def _mutual_rows(ctx, teachers: Teachers, spec, train: TrainFn, finish: FinishFn) -> list[dict[str, Any]]:
    cfg = ctx.config.distill
    size = cfg.schemes.group_size
    models = [SchemeModel(f"mutual_{i}", f"peers (mutual learning, {size} students)", 0.0, None,
                          f"{SCHEMES}/mutual/student_{i}", spec) for i in range(1, size + 1)]
    if all((ctx.stage_dir / m.folder / ROW).exists() for m in models):
        ctx.console.print("  mutual: finished earlier, kept")
        return [read_json(ctx.stage_dir / m.folder / ROW) for m in models]
    set_seed(ctx.config.run.seed)   # the members draw different initial weights from one seed
    group = MutualGroup([build_model(spec) for _ in models]).to(ctx.device)
    steps = math.ceil(ctx.source().size("train") / cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(group, cfg.optimizer, steps_per_epoch=steps, epochs=cfg.epochs)
    stateful = {"optimizer": optimizer, "scheduler": scheduler}
    checkpoints = Checkpointer(ctx.stage_dir / SCHEMES / "mutual" / CHECKPOINTS)
    for epoch in range(_resume(ctx, checkpoints, group, stateful), cfg.epochs):
        batches = ((b.x, b.y) for b in source_indexed_batches(
            ctx.source(), "train", batch_size=cfg.batch_size, shuffle=True, seed=ctx.config.run.seed,
            epoch=epoch, device=ctx.device))
        with step_progress(ctx, epoch, steps) as advance:
            result = mutual_one_epoch(group, batches, optimizer, scheduler,
                                      temperature=cfg.schemes.mutual_temperature, on_step=advance)
        _end_mutual_epoch(ctx, group, models, result, epoch)
        checkpoints.save(epoch + 1, group, stateful, metadata={"model": spec, "row": "mutual"})
    return [finish(m, member) for m, member in zip(models, group.members, strict=True)]


def _resume(ctx: StageContext, checkpoints: Checkpointer, group: nn.Module, stateful: dict[str, Any]) -> int:
    """The epoch to continue after; a corrupt snapshot restarts the group from its initial state."""
    snapshot, failed = checkpoints.resume_or_restart(group, stateful)
    if failed is not None:
        ctx.console.print(f"[yellow]warning[/] mutual: cannot resume ({failed}); training from scratch")
        return 0
    if snapshot is None:
        return 0
    ctx.console.print(f"  mutual: resuming after epoch {snapshot.epoch}")
    return snapshot.epoch


def _end_mutual_epoch(ctx: StageContext, group: MutualGroup, models: list[SchemeModel],
                      result: dict[str, float], epoch: int) -> None:
    """Each member's holdout top-1; logged as ``mutual_<i>/...`` and printed on one line."""
    cfg, shown = ctx.config.distill, []
    for i, (model, member) in enumerate(zip(models, group.members, strict=True), start=1):
        member.eval()
        top1 = evaluate_split(ctx, member, "holdout")["top1"]
        metrics = {"ce": result[f"ce_{i}"], "kl": result[f"kl_{i}"], "train_accuracy": result[f"acc_{i}"],
                   "holdout_top1": top1}
        ctx.logger.log_metrics({f"{model.name}/{k}": v for k, v in metrics.items()}, step=epoch + 1)
        shown.append(f"{model.name} holdout top1 {top1:.3f}")
    ctx.console.print(f"  mutual epoch {epoch + 1}/{cfg.epochs}  loss {result['loss']:.4f}  " + "  ".join(shown))
