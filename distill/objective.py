"""The distillation objective: Hinton's KD plus extra terms by name, each fed what it compares.

``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE + sum_i w_i * term_i``; the logit
terms are :func:`distill.losses.kd_loss_terms`, the extras a :class:`distill.registry.CombinedLoss`.

A term is ``"<loss>"`` or ``"<loss>:<tag>"`` (one loss on several layer pairs). What a registered
loss compares is declared by class attributes of its module (read by :func:`term_kind`):

* ``inputs = "features"`` (default): ``forward(student_features, teacher_features)`` on the
  activations of one ``(student path, teacher path)`` layer pair; ``multi_layer = True``:
  ``forward([student maps], [teacher maps])`` over two or more pairs (FSP);
  ``uses_ids = True``: ``forward(student, teacher, ids)`` with the batch's example ids (CRD);
  ``default_layers = (student path, teacher path)`` when the user names none (e.g. the pooled
  embeddings ``("pool", "pool")``); without it the layers must be named.
* ``inputs = "logits"``: ``forward(student_logits, labels, teacher_logits, teacher_probs)`` (DKD, DIST).
* ``sized(layers, student_shapes, teacher_shapes, num_examples) -> kwargs``: constructor arguments
  from the term's layer pairs and their probed activation shapes (channel counts of a regressor or connector, a memory bank's size).
* ``needs_fit = True``: part of it trains before the student does: ``fit(epoch_maps)`` with
  ``epoch_maps(epoch)`` yielding the teacher's activations at the term's layer, returning a loss
  per epoch (:func:`prepare_objective`; factor transfer's paraphraser).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.features import FeatureExtractor
from distill.losses import check_alpha, kd_loss_terms
from distill.registry import LOSSES, CombinedLoss, list_losses
from distill.targets import check_temperature

__all__ = [
    "DistillObjective",
    "LayerPairs",
    "TeacherOutput",
    "TermKind",
    "build_objective",
    "extra_loss_names",
    "feature_pairs",
    "pair_paths",
    "prepare_objective",
    "probe_feature_shapes",
    "term_kind",
]

LayerPairs = tuple[tuple[str, str], ...]  # ((student path, teacher path), ...) of one term


@dataclass(frozen=True)
class TeacherOutput:
    """What the teacher says about one batch; ``probs`` or ``logits`` (not both) for the KD term."""

    probs: Tensor | None = None  # (B, K) probabilities at T = 1 (ensemble q, cached targets)
    logits: Tensor | None = None  # (B, K) logits of a teacher network
    features: Mapping[str, Tensor] = field(default_factory=dict)  # teacher module path -> activations


@dataclass(frozen=True)
class TermKind:
    """What a registered loss compares (see the module docstring)."""

    inputs: str
    multi_layer: bool
    uses_ids: bool
    default_layers: tuple[str, str] | None
    needs_fit: bool


def term_kind(term: str) -> TermKind:
    """The :class:`TermKind` of the loss a term names (``"hint:b2"`` -> the ``hint`` loss)."""
    factory = LOSSES.get(term.split(":", 1)[0])
    return TermKind(getattr(factory, "inputs", "features"), getattr(factory, "multi_layer", False),
                    getattr(factory, "uses_ids", False), getattr(factory, "default_layers", None),
                    getattr(factory, "needs_fit", False))


def extra_loss_names() -> list[str]:
    """Registered losses usable as extra terms (all but ``kd``, the objective's own term)."""
    return [name for name in list_losses() if name != "kd"]


# ------------------------------------------------------------------------------ layers


def feature_pairs(
    losses: Mapping[str, float],
    layers: Sequence[str] = (),
    *,
    term_layers: Mapping[str, Sequence[Any]] | None = None,
    embedding: tuple[str, str] | None = None,
) -> dict[str, LayerPairs]:
    """Term name -> its ``((student path, teacher path), ...)`` layer pairs (``()`` for logit terms).

    A term's layers are, first found: ``term_layers[term]`` (one ``[student, teacher]`` pair or a
    list of pairs), ``layers`` (one pair shared by every feature term: ``distill.hint_layers``),
    the loss's ``default_layers`` (``embedding`` replaces a ``("pool", "pool")`` default). ValueError
    for unknown names (listing the known ones), missing or malformed layers.
    """
    term_layers = dict(term_layers or {})
    if "kd" in losses:
        raise ValueError("the kd term is always part of the objective (weight alpha, temperature T); "
                         "list only extra losses")
    unknown = sorted(t for t in losses if t.split(":", 1)[0].lower() not in extra_loss_names())
    if unknown:
        raise ValueError(f"unknown extra loss {unknown[0]!r}; known extra losses: {', '.join(extra_loss_names())}")
    stray = sorted(set(term_layers) - set(losses))
    if stray:
        raise ValueError(f"layers are given for terms {stray} that are not among the losses {sorted(losses)}")
    if layers and len(layers) != 2:
        raise ValueError(f"layers must be [student module path, teacher module path], got {list(layers)}")
    return {term: _term_pairs(term, term_layers.get(term), layers, embedding) for term in losses}


def _term_pairs(term: str, named: Sequence[Any] | None, shared: Sequence[str],
                embedding: tuple[str, str] | None) -> LayerPairs:
    kind = term_kind(term)
    if kind.inputs == "logits":
        if named:
            raise ValueError(f"the {term} loss compares the models' predictions; it takes no layers")
        return ()
    if named:
        pairs = _as_pairs(term, named)
    elif shared:
        pairs = ((shared[0], shared[1]),)
    elif kind.default_layers is not None and not kind.multi_layer:
        default = kind.default_layers
        pairs = (embedding if embedding is not None and default == ("pool", "pool") else default,)
    else:
        example = "[[blocks.0, blocks.0], [blocks.1, blocks.1]]" if kind.multi_layer else "[blocks.1, blocks.1]"
        raise ValueError(f"the {term} loss compares feature maps: name the layers as "
                         f"[student module path, teacher module path], e.g. {example}")
    if kind.multi_layer and len(pairs) < 2:
        raise ValueError(f"the {term} loss relates two or more layers of each model: give a list of "
                         f"[student, teacher] pairs in network order, got {[list(p) for p in pairs]}")
    if not kind.multi_layer and len(pairs) != 1:
        raise ValueError(f"the {term} loss takes one [student, teacher] layer pair, got "
                         f"{[list(p) for p in pairs]}; use tagged terms ({term}:a, {term}:b) for more")
    return pairs


def _as_pairs(term: str, named: Sequence[Any]) -> LayerPairs:
    """``[s, t]`` or ``[[s, t], ...]`` -> ``((s, t), ...)``."""
    items = [named] if all(isinstance(p, str) for p in named) else list(named)
    if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
               and all(isinstance(x, str) for x in p) for p in items):
        raise ValueError(f"layers of {term} must be [student module path, teacher module path] or a "
                         f"list of such pairs, got {list(named)}")
    return tuple((p[0], p[1]) for p in items)


def pair_paths(pairs: Mapping[str, LayerPairs]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The distinct student paths and teacher paths of all terms, in order of appearance."""
    flat = [pair for term_pairs in pairs.values() for pair in term_pairs]
    return tuple(dict.fromkeys(s for s, _ in flat)), tuple(dict.fromkeys(t for _, t in flat))


def _available(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
    return ", ".join(names)


@torch.no_grad()
def probe_feature_shapes(model: nn.Module, paths: Sequence[str], x: Tensor,
                         role: str = "model") -> dict[str, torch.Size]:
    """Shapes of the activations at ``paths`` for input ``x`` (eval mode; training flag restored).
    ValueError naming the path, the ``role`` (student / teacher) and the available layers for a
    path that is not a module of ``model``."""
    paths = tuple(dict.fromkeys(paths))
    if not paths:
        return {}
    known = dict(model.named_modules())
    for path in paths:
        if path not in known:
            raise ValueError(f"unknown {role} layer {path!r}: {type(model).__name__} has no module of "
                             f"that name; available: {_available(model)} (and their submodules, "
                             f"e.g. blocks.1.0)")
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


# --------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE + sum_i w_i * extra_i``.

    ``extra`` (may be None) is a :class:`CombinedLoss` whose terms get the inputs their
    :func:`term_kind` declares, from the activations at ``pairs[term]``; its learnable parts
    (regressors, connectors, embedding heads) are submodules, so optimise
    ``objective.parameters()`` too.
    """

    def __init__(self, *, temperature: float, alpha: float, extra: CombinedLoss | None = None,
                 pairs: Mapping[str, LayerPairs] | None = None) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.extra = extra
        self.pairs = {term: tuple(p) for term, p in (pairs or {}).items()}
        terms = set(extra.weights) if extra is not None else set()
        if terms != set(self.pairs):
            raise ValueError(f"extra loss terms {sorted(terms)} and feature pairs {sorted(self.pairs)} "
                             "must name the same terms")
        self.kinds = {term: term_kind(term) for term in self.pairs}

    @property
    def student_paths(self) -> tuple[str, ...]:
        return pair_paths(self.pairs)[0]

    @property
    def teacher_paths(self) -> tuple[str, ...]:
        return pair_paths(self.pairs)[1]

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or bool(self.pairs)

    def forward(self, student_logits: Tensor, labels: Tensor, teacher: TeacherOutput,
                student_features: Mapping[str, Tensor] | None = None,
                ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(B, K)`` logits, ``(B,)`` labels, the batch's ``TeacherOutput``, the student's
        activations, the examples' ids ``(B,)`` (for terms that use them) ->
        ``(total, {"ce", "soft", <extra terms>})``; the terms are unweighted and detached
        (``soft`` already includes ``T^2``). The logit terms are computed in float32."""
        if self.alpha > 0 and teacher.probs is None and teacher.logits is None:
            raise ValueError(f"alpha={self.alpha} needs teacher probs or logits for the batch")
        logits = student_logits.float()
        total, terms = kd_loss_terms(logits, labels, teacher.logits, teacher.probs,
                                     temperature=self.temperature, alpha=self.alpha)
        if self.extra is not None:
            inputs = {term: self._inputs(term, logits, labels, teacher, student_features, ids)
                      for term in self.pairs}
            extra_total, extra_terms = self.extra(inputs)
            total = total + extra_total
            terms.update(extra_terms)
        return total, terms

    def _inputs(self, term: str, logits: Tensor, labels: Tensor, teacher: TeacherOutput,
                student_features: Mapping[str, Tensor] | None, ids: Tensor | None) -> Any:
        kind = self.kinds[term]
        if kind.inputs == "logits":
            return {"student_logits": logits, "labels": labels, "teacher_logits": teacher.logits,
                    "teacher_probs": teacher.probs}
        s = [_feature(student_features, p, "student").float() for p, _ in self.pairs[term]]
        t = [_feature(teacher.features, p, "teacher").float() for _, p in self.pairs[term]]
        if kind.multi_layer:
            return (s, t)
        if kind.uses_ids:
            if ids is None:
                raise ValueError(f"the {term} term needs the batch's example ids; pass ids=...")
            return (s[0], t[0], ids)
        return (s[0], t[0])


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
    pairs: Mapping[str, LayerPairs] | None = None,
    student_shapes: Mapping[str, torch.Size] | None = None,
    teacher_shapes: Mapping[str, torch.Size] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    num_examples: int | None = None,
) -> DistillObjective:
    """The objective with its extra terms sized to the probed activation shapes.

    A term's constructor gets its loss's ``sized(...)`` arguments (channels from the shapes, the
    training set's size ``num_examples``) updated with ``options[term]`` (``distill.loss_options``).
    Every term then runs once on random activations of the probed shapes, so a pair of maps it
    cannot match raises ValueError naming both shapes, before any training.
    """
    losses, pairs, options = dict(losses or {}), dict(pairs or {}), dict(options or {})
    stray = sorted(set(options) - set(losses))
    if stray:
        raise ValueError(f"options are given for terms {stray} that are not among the losses {sorted(losses)}")
    if not losses:
        return DistillObjective(temperature=temperature, alpha=alpha)
    student_shapes, teacher_shapes = dict(student_shapes or {}), dict(teacher_shapes or {})
    kwargs = {}
    for term in losses:
        factory = LOSSES.get(term.split(":", 1)[0])
        sized = getattr(factory, "sized", None)
        shapes_s = [student_shapes[s] for s, _ in pairs[term]]
        shapes_t = [teacher_shapes[t] for _, t in pairs[term]]
        kwargs[term] = {**(sized(pairs[term], shapes_s, shapes_t, num_examples) if sized else {}),
                        **dict(options.get(term, {}))}
    objective = DistillObjective(temperature=temperature, alpha=alpha, pairs=pairs,
                                 extra=CombinedLoss(losses, loss_kwargs=kwargs))
    _check_terms(objective, student_shapes, teacher_shapes)
    return objective


@torch.no_grad()
def _check_terms(objective: DistillObjective, student_shapes, teacher_shapes) -> None:
    """Run a copy of the objective once on random activations and logits of the probed shapes
    (batch of 4), so nothing it keeps (running statistics, a memory bank) sees the random data."""
    trial = copy.deepcopy(objective)
    classes = 3
    student = {p: torch.randn(4, *student_shapes[p][1:]) for p in objective.student_paths}
    teacher = {p: torch.randn(4, *teacher_shapes[p][1:]) for p in objective.teacher_paths}
    logits = torch.randn(4, classes)
    trial(logits, torch.arange(4) % classes, TeacherOutput(logits=torch.randn(4, classes), features=teacher),
          student, torch.arange(4))


def prepare_objective(objective: DistillObjective, epoch_batches: Callable[[int], Iterable[Any]],
                      teacher: Callable[[Tensor, Tensor], TeacherOutput] | None) -> dict[str, list[float]]:
    """Train the parts of terms that learn before the student does: factor transfer's
    paraphraser, on the teacher's activations at the term's layer for ``epoch_batches(epoch)``
    (``IndexedBatch`` es). Returns term -> per-epoch reconstruction loss (empty when no term needs it)."""
    history: dict[str, list[float]] = {}
    if objective.extra is None:
        return history
    for term, (_, teacher_path) in ((t, p[0]) for t, p in objective.pairs.items()
                                    if objective.kinds[t].needs_fit):
        if teacher is None:
            raise ValueError(f"the {term} term learns from the teacher's activations first: pass teacher=...")

        def maps(epoch: int, path: str = teacher_path) -> Iterable[Tensor]:
            return (teacher(b.x, b.ids).features[path] for b in epoch_batches(epoch))

        history[term] = objective.extra.term_module(term).fit(maps)
    return history
