"""Pure student-training components: the distillation objective, one epoch, evaluation, latency.

The student learns ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)``
(Hinton et al. 2015) plus optional feature/relational terms from :mod:`distill.registry`
(hint, attention, rkd, similarity) on activations captured by forward hooks. The teacher is a
function of the batch, ``teacher(x (B, C, H, W), ids (B,)) -> TeacherOutput``: a network run
online, a routed ensemble, or a lookup of cached soft targets by example id, so one epoch
loop serves every row of the distillation table.

No file I/O, no logging, no printing: progress goes through the callbacks the caller passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distill.features import FeatureExtractor
from distill.losses import check_alpha, kd_loss_terms
from distill.registry import CombinedLoss, list_losses
from distill.targets import check_temperature
from generalist.data.augment import AugmentSpec, augmented_batches
from generalist.train import iterate_batches, train_one_epoch

__all__ = [
    "FEATURE_LOSSES",
    "DistillEpochResult",
    "DistillObjective",
    "IndexedBatch",
    "TeacherFn",
    "TeacherOutput",
    "build_objective",
    "distill_one_epoch",
    "evaluate_predictor",
    "feature_pairs",
    "iterate_indexed_batches",
    "make_teacher",
    "probe_feature_shapes",
]

# Extra terms on a (student, teacher) activation pair; "kd" is the objective's own logit term.
FEATURE_LOSSES = ("attention", "hint", "rkd", "similarity")
_NEEDS_LAYERS = ("attention", "hint")  # spatial maps: the user names the layers


@dataclass(frozen=True)
class IndexedBatch:
    """One training batch: ``x (B, C, H, W)`` float in [0, 1], ``y (B,)`` int64, ``ids (B,)``
    int64 positions of the examples in their split (the soft-target cache's keys, on CPU)."""

    x: Tensor
    y: Tensor
    ids: Tensor


@dataclass(frozen=True)
class TeacherOutput:
    """What the teacher says about one batch; ``probs`` or ``logits`` (not both) for the KD term."""

    probs: Tensor | None = None  # (B, K) probabilities at T = 1 (ensemble q, cached targets)
    logits: Tensor | None = None  # (B, K) logits of a teacher network
    features: Mapping[str, Tensor] = field(default_factory=dict)  # teacher module path -> activations


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
) -> Iterator[IndexedBatch]:
    """:func:`generalist.train.iterate_batches` (same order for the same ``(seed, epoch)``) that
    also yields each example's position in ``images``, for per-example cached targets."""
    positions = torch.arange(images.shape[0])
    batches = iterate_batches(images, positions, batch_size=batch_size, shuffle=shuffle,
                              seed=seed, epoch=epoch, device=device)
    for x, ids in batches:
        ids = ids.cpu()
        yield IndexedBatch(x, labels[ids].to(x.device).long(), ids)


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


# ---------------------------------------------------------------------------- objective


def feature_pairs(
    losses: Mapping[str, float],
    layers: Sequence[str] = (),
    *,
    embedding: tuple[str, str] = ("pool", "pool"),
) -> dict[str, tuple[str, str]]:
    """Term name -> ``(student module path, teacher module path)`` for the extra losses.

    ``hint`` and ``attention`` compare the maps at ``layers = [student path, teacher path]``;
    ``rkd`` and ``similarity`` use ``layers`` when given, else the pooled ``embedding`` of both
    models. ValueError for names that are not feature losses (the message lists them).
    """
    if "kd" in losses:
        raise ValueError("the kd term is always part of the objective (weight alpha, temperature T); "
                         "list only extra losses")
    unknown = sorted(set(losses) - set(FEATURE_LOSSES))
    if unknown:
        known = ", ".join(n for n in list_losses() if n in FEATURE_LOSSES)
        raise ValueError(f"unknown extra loss {unknown[0]!r}; known extra losses: {known}")
    if layers and len(layers) != 2:
        raise ValueError(f"layers must be [student module path, teacher module path], got {list(layers)}")
    pairs: dict[str, tuple[str, str]] = {}
    for name in losses:
        if layers:
            pairs[name] = (layers[0], layers[1])
        elif name in _NEEDS_LAYERS:
            raise ValueError(f"the {name} loss compares feature maps: name the layers as "
                             "[student module path, teacher module path], e.g. [blocks.1, blocks.1]")
        else:
            pairs[name] = embedding
    return pairs


@torch.no_grad()
def probe_feature_shapes(model: nn.Module, paths: Sequence[str], x: Tensor) -> dict[str, torch.Size]:
    """Shapes of the activations at ``paths`` for input ``x`` (eval mode; training flag restored).
    ValueError naming close matches for a path that is not a module of ``model``."""
    paths = tuple(dict.fromkeys(paths))
    if not paths:
        return {}
    was_training = model.training
    model.eval()
    try:
        with FeatureExtractor(model, paths) as hooks:
            model(x)
    finally:
        model.train(was_training)
    missing = [p for p in paths if p not in hooks.features]
    if missing:
        raise ValueError(f"modules {missing} did not run in {type(model).__name__}'s forward pass; "
                         "hook modules that forward() calls")
    return {p: hooks.features[p].shape for p in paths}


class DistillObjective(nn.Module):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE + sum_i w_i * extra_i``: the
    logit terms are :func:`distill.losses.kd_loss_terms`, the extras a :class:`CombinedLoss`.

    ``extra`` (may be None) is a :class:`CombinedLoss` whose terms compare the student and
    teacher activations named by ``pairs[term] = (student path, teacher path)``; its learnable
    parts (the hint regressor) are submodules, so optimise ``objective.parameters()`` too.
    """

    def __init__(
        self,
        *,
        temperature: float,
        alpha: float,
        extra: CombinedLoss | None = None,
        pairs: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.extra = extra
        self.pairs = dict(pairs or {})
        terms = set(extra.weights) if extra is not None else set()
        if terms != set(self.pairs):
            raise ValueError(f"extra loss terms {sorted(terms)} and feature pairs {sorted(self.pairs)} "
                             "must name the same terms")

    @property
    def student_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for s, _ in self.pairs.values()))

    @property
    def teacher_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for _, t in self.pairs.values()))

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or bool(self.pairs)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher: TeacherOutput,
        student_features: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, K)`` logits, ``(B,)`` labels -> ``(total, {"ce", "soft", <extra terms>})``;
        the terms are unweighted and detached (``soft`` already includes ``T^2``). The logit
        terms are :func:`distill.losses.kd_loss_terms` (in float32)."""
        if self.alpha > 0 and teacher.probs is None and teacher.logits is None:
            raise ValueError(f"alpha={self.alpha} needs teacher probs or logits for the batch")
        total, terms = kd_loss_terms(student_logits.float(), labels, teacher.logits, teacher.probs,
                                     temperature=self.temperature, alpha=self.alpha)
        if self.extra is not None:
            inputs = {term: (_feature(student_features, s, "student").float(),
                             _feature(teacher.features, t, "teacher").float())
                      for term, (s, t) in self.pairs.items()}
            extra_total, extra_terms = self.extra(inputs)
            total = total + extra_total
            terms.update(extra_terms)
        return total, terms


def _feature(features: Mapping[str, Tensor] | None, path: str, side: str) -> Tensor:
    if not features or path not in features:
        raise ValueError(f"no {side} activations captured at {path!r}; hook that module "
                         f"(got {sorted(features or {})})")
    return features[path]


def build_objective(
    *,
    temperature: float,
    alpha: float,
    losses: Mapping[str, float] | None = None,
    pairs: Mapping[str, tuple[str, str]] | None = None,
    student_shapes: Mapping[str, torch.Size] | None = None,
    teacher_shapes: Mapping[str, torch.Size] | None = None,
) -> DistillObjective:
    """The objective with its extra terms sized to the probed activation shapes.

    Hint regressors map the student's channels to the teacher's; a spatial size they cannot
    map raises ValueError naming both shapes and both module paths, before any training.
    """
    losses, pairs = dict(losses or {}), dict(pairs or {})
    if not losses:
        return DistillObjective(temperature=temperature, alpha=alpha)
    student_shapes, teacher_shapes = dict(student_shapes or {}), dict(teacher_shapes or {})
    kwargs = {}
    for term in losses:
        s, t = pairs[term]
        if term == "hint":
            kwargs[term] = {"student_channels": int(student_shapes[s][1]),
                            "teacher_channels": int(teacher_shapes[t][1]),
                            "student_name": f"student {s}", "teacher_name": f"teacher {t}"}
    objective = DistillObjective(temperature=temperature, alpha=alpha, pairs=pairs,
                                 extra=CombinedLoss(losses, loss_kwargs=kwargs))
    _check_terms(objective, student_shapes, teacher_shapes)
    return objective


@torch.no_grad()
def _check_terms(objective: DistillObjective, student_shapes, teacher_shapes) -> None:
    """Run every extra term once on random activations of the probed shapes (batch of 4)."""
    assert objective.extra is not None
    inputs = {term: (torch.randn(4, *student_shapes[s][1:]), torch.randn(4, *teacher_shapes[t][1:]))
              for term, (s, t) in objective.pairs.items()}
    objective.extra(inputs)


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
) -> DistillEpochResult:
    """Train ``student`` for one pass over ``batches`` on ``objective``.

    ``teacher(x, ids)`` runs on each batch before the student (None only when the objective
    needs no teacher: alpha = 0 and no extra terms). The optimizer must hold the student's and
    the objective's parameters. Stepping, mixed precision and the NaN guard are those of
    :func:`generalist.train.train_one_epoch`.
    """
    if teacher is None and objective.needs_teacher:
        raise ValueError(f"alpha={objective.alpha} and extra terms {sorted(objective.pairs)} "
                         "need a teacher; pass teacher=...")
    meter = _Meter()
    paths = objective.student_paths
    hooks = FeatureExtractor(student, paths) if paths else None
    empty = TeacherOutput()

    def loss_fn(logits: Tensor, target: tuple[Tensor, TeacherOutput]) -> Tensor:
        labels, said = target
        total, terms = objective(logits, labels, said, hooks.features if hooks else None)
        meter.add(terms, logits, labels)
        return total

    pairs = ((b.x, (b.y, teacher(b.x, b.ids) if teacher is not None else empty)) for b in batches)
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
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be a non-empty tuple of ints >= 1, got {topk}")
    hits, examples = dict.fromkeys(topk, 0), 0
    for x, y in iterate_batches(images, labels, batch_size=batch_size, shuffle=False, device=device):
        scores = predict(x)  # (B, K)
        top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices == y[:, None]
        for k in topk:
            hits[k] += int(top[:, :k].any(dim=1).sum())
        examples += x.shape[0]
    if examples == 0:
        raise ValueError("no examples to evaluate")
    return {**{f"top{k}": hits[k] / examples for k in topk}, "examples": float(examples)}
