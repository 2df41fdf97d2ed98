"""Pure student-training components: the distillation objective, one epoch, evaluation, latency.

The student learns ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)``
(Hinton et al. 2015) plus optional response, feature and relation terms by name
(:mod:`distill.objective`, on activations captured by forward hooks). The teacher is a
function of the batch, ``teacher(x (B, C, H, W), ids (B,)) -> TeacherOutput``: a network run
online, a routed ensemble, or a lookup of cached soft targets by example id, so one epoch
loop serves every row of the distillation table.

No file I/O, no logging, no printing: progress goes through the callbacks the caller passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.features import FeatureExtractor
from distill.objective import (
    DistillObjective,
    TeacherOutput,
    build_objective,
    feature_pairs,
    pair_paths,
    prepare_objective,
    probe_feature_shapes,
)
from generalist.data.augment import AugmentSpec, augmented_batches
from generalist.data.source import ExampleSource, epoch_order, rank_batches
from generalist.train import iterate_batches, train_one_epoch

__all__ = [
    "DistillEpochResult",
    "DistillObjective",
    "IndexedBatch",
    "TeacherFn",
    "TeacherOutput",
    "build_objective",
    "distill_one_epoch",
    "evaluate_batches",
    "evaluate_predictor",
    "feature_pairs",
    "iterate_indexed_batches",
    "make_teacher",
    "pair_paths",
    "prepare_objective",
    "probe_feature_shapes",
    "source_indexed_batches",
]

@dataclass(frozen=True)
class IndexedBatch:
    """One training batch: ``x (B, C, H, W)`` float in [0, 1], ``y (B,)`` int64, ``ids (B,)``
    int64 positions of the examples in their split (the soft-target cache's keys, on CPU)."""

    x: Tensor
    y: Tensor
    ids: Tensor


TeacherFn = Callable[[Tensor, Tensor], TeacherOutput]  # (x (B, C, H, W), ids (B,)) -> TeacherOutput


def iterate_indexed_batches(
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[IndexedBatch]:
    """:func:`generalist.train.iterate_batches` (same order for the same ``(seed, epoch)``) that
    also yields each example's position in ``images``, for per-example cached targets.

    With ``world_size`` w > 1, ``batch_size`` is the global batch and rank ``rank`` gets its
    ``batch_size // w`` slice of every complete global batch of that order
    (:func:`generalist.data.source.rank_batches`): the ranks' examples are disjoint and every
    rank takes the same number of steps."""
    order = epoch_order(images.shape[0], shuffle=shuffle, seed=seed, epoch=epoch)  # (N,)
    for ids in rank_batches(order, batch_size, rank, world_size):                  # (B / w,)
        yield _indexed(images[ids], labels[ids], ids, device)


def source_indexed_batches(
    source: ExampleSource,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[IndexedBatch]:
    """The batches of ``source.indexed_batches`` (``ids``: positions in ``split``) as
    :class:`IndexedBatch`; for an in-memory source the same as :func:`iterate_indexed_batches`
    over the split's arrays."""
    batches = source.indexed_batches(split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                     epoch=epoch, rank=rank, world_size=world_size)
    for images, labels, ids in batches:                  # (B, C, H, W) uint8, (B,), (B,) int64
        yield _indexed(images, labels, ids, device)


def _indexed(images: Tensor, labels: Tensor, ids: Tensor, device: str | torch.device) -> IndexedBatch:
    """One batch on ``device``, uint8 images scaled to [0, 1] after the move; ``ids`` stay on CPU."""
    x = images.to(device)                                                          # (B, C, H, W)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return IndexedBatch(x, labels.to(x.device).long(), ids)


def augmented_indexed(batches: Iterable[IndexedBatch], spec: AugmentSpec | None, *, seed: int,
                      epoch: int) -> Iterator[IndexedBatch]:
    """The batches with ``x`` augmented (:func:`generalist.data.augment.augmented_batches`) before
    anything sees it, so an online teacher scores the same view as the student (consistent
    teaching); cached targets are looked up by ``ids`` and stay those of the unaugmented image."""
    for x, batch in augmented_batches(((b.x, b) for b in batches), spec, seed=seed, epoch=epoch):
        yield IndexedBatch(x, batch.y, batch.ids)


# ----------------------------------------------------------------------------- teachers


def make_teacher(
    *,
    logits_model: nn.Module | None = None,
    probs_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    feature_model: nn.Module | None = None,
    feature_paths: Sequence[str] = (),
) -> TeacherFn:
    """A :data:`TeacherFn` from a teacher network's logits or from ``probs_fn(x, ids) -> (B, K)``.

    ``feature_paths`` are captured from ``feature_model`` (default ``logits_model``) with
    forward hooks. When ``probs_fn`` runs that model itself (a routed ensemble calling its
    generalist) the activations come for free; when it does not (a cache lookup) the model
    runs once more on ``x``. Everything runs under ``no_grad``; the models stay as they are
    (put them in eval mode).
    """
    if (logits_model is None) == (probs_fn is None):
        raise ValueError("give exactly one of logits_model (a teacher network) or probs_fn(x, ids)")
    feature_model = feature_model if feature_model is not None else logits_model
    paths = tuple(dict.fromkeys(feature_paths))
    if paths and feature_model is None:
        raise ValueError(f"feature_paths {list(paths)} need a feature_model to hook")

    @torch.no_grad()
    def teacher(x: Tensor, ids: Tensor) -> TeacherOutput:
        hooks = FeatureExtractor(feature_model, paths, detach=True) if paths else None
        with hooks or contextlib.nullcontext():
            if logits_model is not None:
                logits, probs = logits_model(x).float(), None
            else:
                logits, probs = None, probs_fn(x, ids).float()
            if hooks is not None and not _captured(hooks, paths, x.shape[0]):
                feature_model(x)
        return TeacherOutput(probs=probs, logits=logits, features=dict(hooks.features) if hooks else {})

    return teacher


def _captured(hooks: FeatureExtractor, paths: Sequence[str], batch: int) -> bool:
    return all(p in hooks.features and hooks.features[p].shape[0] == batch for p in paths)


# -------------------------------------------------------------------------------- epoch


@dataclass(frozen=True)
class DistillEpochResult:
    """One distillation epoch: mean total loss, mean of each term, top-1 against the labels."""

    epoch: int
    loss: float
    terms: dict[str, float]
    accuracy: float
    examples: int
    seconds: float
    examples_per_s: float


class _Meter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.correct = self.examples = 0

    def add(self, terms: Mapping[str, Tensor], logits: Tensor, labels: Tensor) -> None:
        batch = labels.shape[0]
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * batch
        self.correct += int((logits.detach().argmax(dim=1) == labels).sum())
        self.examples += batch

    def means(self) -> dict[str, float]:
        return {name: total / max(self.examples, 1) for name, total in self.sums.items()}


def distill_one_epoch(
    student: nn.Module,
    batches: Iterable[IndexedBatch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    objective: DistillObjective,
    teacher: TeacherFn | None,
    epoch: int,
    device: str | torch.device = "cpu",
    amp: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    features_of: nn.Module | None = None,
    objective_fn: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = None,
) -> DistillEpochResult:
    """Train ``student`` for one pass over ``batches`` on ``objective``.

    ``teacher(x, ids)`` runs on each batch before the student (None only when the objective
    needs no teacher: alpha = 0 and no extra terms). The optimizer must hold the student's and
    the objective's parameters. Stepping, mixed precision and the NaN guard are those of
    :func:`generalist.train.train_one_epoch`. Data-parallel: ``student`` and ``objective_fn`` may
    be DDP wrappers of the student (``features_of``, whose layers the objective's paths name) and
    of ``objective``.
    """
    if teacher is None and objective.needs_teacher:
        raise ValueError(f"alpha={objective.alpha} and extra terms {sorted(objective.pairs)} "
                         "need a teacher; pass teacher=...")
    meter = _Meter()
    paths = objective.student_paths
    hooks = FeatureExtractor(features_of or student, paths) if paths else None
    compute = objective_fn or objective
    empty = TeacherOutput()

    def loss_fn(logits: Tensor, target: tuple[Tensor, TeacherOutput, Tensor]) -> Tensor:
        labels, said, ids = target
        total, terms = compute(logits, labels, said, hooks.features if hooks else None, ids)
        meter.add(terms, logits, labels)
        return total

    pairs = ((b.x, (b.y, teacher(b.x, b.ids) if teacher is not None else empty, b.ids)) for b in batches)
    with hooks or contextlib.nullcontext():
        result = train_one_epoch(student, pairs, optimizer, scheduler, epoch=epoch, device=device,
                                 amp=amp, loss_fn=loss_fn, on_step=on_step)
    accuracy = meter.correct / meter.examples if meter.examples else float("nan")
    return DistillEpochResult(epoch, result.loss, meter.means(), accuracy, result.examples,
                              result.seconds, result.examples_per_s)


# --------------------------------------------------------------------- evaluation, latency


@torch.no_grad()
def evaluate_predictor(
    predict: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    topk: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of ``predict(x (B, C, H, W) in [0, 1]) -> scores (B, K)`` (logits or
    probabilities: only the ranking counts) over uint8 ``images (N, C, H, W)`` and ``labels (N,)``.

    ``k`` is clipped to ``K``. Returns ``{"top<k>": ..., "examples": N}``. Put models in eval mode.
    """
    batches = iterate_batches(images, labels, batch_size=batch_size, shuffle=False, device=device)
    return evaluate_batches(predict, batches, topk=topk)


@torch.no_grad()
def evaluate_batches(
    predict: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    topk: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """:func:`evaluate_predictor` over float batches ``(x (B, C, H, W) in [0, 1], y (B,))``
    already on the model's device (e.g. :func:`generalist.data.loader.loader`)."""
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be a non-empty tuple of ints >= 1, got {topk}")
    hits, examples = dict.fromkeys(topk, 0), 0
    for x, y in batches:
        scores = predict(x)  # (B, K)
        top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices == y[:, None]
        for k in topk:
            hits[k] += int(top[:, :k].any(dim=1).sum())
        examples += x.shape[0]
    if examples == 0:
        raise ValueError("no examples to evaluate")
    return {**{f"top{k}": hits[k] / examples for k in topk}, "examples": float(examples)}
