"""What teaches the students of the distill stage: the run's generalist and routed ensemble,
and the soft-target cache of the ensemble's q, checked against the data the students train on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.train import TeacherFn, make_teacher
from generalist.data.core import Split
from generalist.data.source import ExampleSource
from orchestration.artifacts import cache_dir, load_ensemble
from orchestration.pipeline import StageContext
from orchestration.soft_cache import data_identity
from specialists.ensemble import (
    CacheCorruptError,
    CacheMismatchError,
    RoutedEnsemble,
    SoftTargetCache,
    ensemble_forward,
)


class DistillError(ValueError):
    """The distill stage cannot run with this config or these upstream outputs; says what to change."""


@dataclass(frozen=True)
class Teachers:
    """The run's trained models, checked against the data."""

    generalist: nn.Module
    ensemble: RoutedEnsemble
    class_names: list[str]
    cache: SoftTargetCache | None       # when distill.targets=cache


def load_teachers(ctx: StageContext) -> Teachers:
    """Generalist + routed ensemble of this run, and the soft-target cache when it is used."""
    ecfg, source = ctx.config.ensemble, ctx.source()
    loaded = load_ensemble(ctx.run_dir.path, top_n=ecfg.top_n, tol=ecfg.tol, max_iter=ecfg.max_iter,
                           device=ctx.device)
    if list(loaded.class_names) != list(source.class_names):
        raise DistillError(
            f"the generalist of {ctx.run_dir.path} was trained on {len(loaded.class_names)} classes "
            f"but data set {source.name} has {len(source.class_names)} (or another order); the upstream "
            f"stages belong to another data set: restore the run's data.* settings or re-run them "
            f"(specdistill run CONFIG run.dir={ctx.run_dir.path})"
        )
    cache = _open_cache(ctx, loaded.class_names) if uses_cache(ctx) else None
    return Teachers(loaded.ensemble.generalist, loaded.ensemble, list(loaded.class_names), cache)


def uses_cache(ctx: StageContext) -> bool:
    cfg = ctx.config.distill
    return cfg.teacher == "ensemble" and cfg.targets == "cache"


def _open_cache(ctx: StageContext, class_names: list[str]):
    """The ensemble stage's cache of q over the train split, checked against this data."""
    path, split = cache_dir(ctx.run_dir.path), ctx.config.ensemble.cache.split
    online = "or train on targets computed online instead: distill.targets=online"
    if split != "train":
        raise DistillError(f"distill.targets=cache trains on the train split but the cache covers "
                           f"ensemble.cache.split={split}; set ensemble.cache.split=train and rebuild "
                           f"it (specdistill run CONFIG run.dir={ctx.run_dir.path} --from ensemble), {online}")
    try:
        cache = SoftTargetCache(path)
        train = labels_only(ctx.source(), "train")
        cache.check_compatible(class_names, data_identity(ctx.config, "train", train))
    except (FileNotFoundError, CacheCorruptError, CacheMismatchError) as exc:
        raise DistillError(f"distill.targets=cache: {exc}; {online}") from None
    return cache


def labels_only(source: ExampleSource, split: str) -> Split:
    """The labels of ``split`` as a Split with no pixels (``(N, 0, 0, 0)`` images), for
    :func:`~orchestration.soft_cache.data_identity`, which reads only labels and size. Nothing is
    decoded: bit ``b`` of every label comes from one ``class_positions`` call (the classes whose
    id has that bit set), so ``ceil(log2 K)`` calls recover them all."""
    labels = np.zeros(source.size(split), dtype=np.int64)                        # (N,)
    classes = np.arange(source.num_classes)                                      # (K,)
    for bit in range(max(source.num_classes - 1, 0).bit_length()):
        labels[source.class_positions(split, classes[(classes >> bit) & 1 == 1])] += 1 << bit
    return Split(torch.empty((labels.shape[0], 0, 0, 0), dtype=torch.uint8), torch.from_numpy(labels))


def teacher_fns(teachers: Teachers, teacher_paths: tuple[str, ...]) -> dict[str, TeacherFn]:
    """``generalist`` (its logits online) and ``ensemble`` (q from the cache or online), each
    with the generalist's activations at ``teacher_paths`` for the extra losses (the ensemble's
    features are its generalist's: the specialists only see some examples)."""
    generalist, ensemble, cache = teachers.generalist, teachers.ensemble, teachers.cache
    if cache is not None:
        def probs(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return cache.targets(ids, 1.0).to(x.device)
    else:
        def probs(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return ensemble_forward(ensemble, x).q
    return {
        "generalist": make_teacher(logits_model=generalist, feature_paths=teacher_paths),
        "ensemble": make_teacher(probs_fn=probs, feature_model=generalist, feature_paths=teacher_paths),
    }
