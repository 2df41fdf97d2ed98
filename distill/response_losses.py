"""Response-based losses beyond Hinton's KD: they compare the two models' predictions.

* DKD, decoupled knowledge distillation (Zhao et al. 2022): the KD term split into a
  target-class part (TCKD: the binary "true class vs the rest" distributions) and a
  non-target part (NCKD: the distributions over the other classes, renormalised), weighted
  separately by ``alpha`` and ``beta``.
* DIST (Huang et al. 2022): one minus the Pearson correlation of the softened predictions,
  per example across classes (inter-class relation) and per class across the batch
  (intra-class relation), weighted by ``beta`` and ``gamma``.

The teacher is given as logits ``z_t (B, K)`` or as probabilities ``q (B, K)`` at T = 1 (the
ensemble's q), exactly as for :func:`distill.losses.kd_loss_terms`; probabilities are softened
to ``softmax(log q / T)`` (exact zeros stay zero). The teacher side is detached. Both losses
are registered in :data:`distill.registry.LOSSES` as terms of kind ``"logits"``: the
objective calls them with ``(student_logits, labels, teacher_logits, teacher_probs)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import teacher_log_probs
from distill.registry import LOSSES
from distill.targets import check_temperature

__all__ = ["DISTLoss", "DKDLoss", "dist_loss", "dkd_loss", "dkd_parts", "pearson_rows"]


def _check_pair(student_logits: Tensor, log_p_t: Tensor, what: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != log_p_t.shape:
        raise ValueError(f"{what}: student logits {tuple(student_logits.shape)} and teacher "
                         f"{tuple(log_p_t.shape)} must both be (B, K) with the same B and K")


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``(B, K) -> (B,)``: ``sum_k p log(p / q)`` from log-probabilities; entries with ``p == 0``
    contribute 0 (their -inf logs are replaced before the product, so no NaN reaches a gradient)."""
    absent = p == 0
    return (p * (log_p.masked_fill(absent, 0.0) - log_q.masked_fill(absent, 0.0))).sum(dim=1)


def dkd_parts(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)`` of decoupled KD, each ``T^2 * KL`` averaged over the batch.

    With ``p = softmax(z / T)`` and ``g`` the true class of a row:
    TCKD = ``T^2 * KL([p_t,g, 1 - p_t,g] || [p_s,g, 1 - p_s,g])``;
    NCKD = ``T^2 * KL(p^_t || p^_s)`` where ``p^_j = p_j / (1 - p_g)`` over ``j != g``.

    Args:
        student_logits: ``(B, K)``.
        labels: ``(B,)`` int64 true classes.
        teacher_logits / teacher_probs: exactly one, ``(B, K)``.
        temperature: ``T > 0``.

    Returns:
        Two scalars. Gradient scale: like KD, the ``T^2`` factor keeps the gradient w.r.t. the
        student logits roughly independent of T; both are batch means (independent of B).
    """
    log_p_t = teacher_log_probs(teacher_logits, teacher_probs, temperature=temperature)  # (B, K)
    _check_pair(student_logits, log_p_t, "dkd")
    if labels.shape != student_logits.shape[:1] or labels.is_floating_point():
        raise ValueError(f"dkd: labels must be (B,) class indices, got {tuple(labels.shape)}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)  # (B, K)
    target = F.one_hot(labels, student_logits.shape[1]).bool()  # (B, K)
    binary_t = _binary(log_p_t, target)  # (B, 2) log [p_g, 1 - p_g]
    binary_s = _binary(log_p_s, target)
    tckd = _kl_rows(binary_t.exp(), binary_t, binary_s).mean()
    rest_t = F.log_softmax(log_p_t.masked_fill(target, float("-inf")), dim=1)  # (B, K), -inf at g
    rest_s = F.log_softmax(log_p_s.masked_fill(target, float("-inf")), dim=1)
    nckd = _kl_rows(rest_t.exp(), rest_t, rest_s).mean()
    return tckd * temperature**2, nckd * temperature**2


def _binary(log_p: Tensor, target: Tensor) -> Tensor:
    """``(B, K)`` log-probabilities -> ``(B, 2)``: log of the true class's mass and of the rest."""
    log_true = log_p.masked_fill(~target, float("-inf")).logsumexp(dim=1)
    log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_true, log_rest], dim=1)


def dkd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """``alpha * TCKD + beta * NCKD`` (:func:`dkd_parts`); defaults are the CIFAR-100 settings
    of the authors' code (mdistiller: alpha 1, beta 8, T 4; cross-entropy added beside it)."""
    tckd, nckd = dkd_parts(student_logits, labels, teacher_logits, teacher_probs,
                           temperature=temperature)
    return alpha * tckd + beta * nckd


@LOSSES.register("dkd")
class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss` (a ``"logits"`` term; ``alpha`` here is DKD's own
    target-class weight, not ``distill.alpha``).

    Args:
        alpha: weight of TCKD (>= 0).
        beta: weight of NCKD (>= 0).
        temperature: ``T > 0``.
    """

    inputs: ClassVar[str] = "logits"

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        for label, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"dkd: {label} must be >= 0, got {value!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
                teacher_probs: Tensor | None = None) -> Tensor:
        """``(B, K)`` logits, ``(B,)`` labels, ``(B, K)`` teacher -> scalar."""
        return dkd_loss(student_logits, labels, teacher_logits, teacher_probs, alpha=self.alpha,
                        beta=self.beta, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


# --------------------------------------------------------------------------------- DIST


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``(N, D), (N, D) -> (N,)``: Pearson correlation of each row of ``a`` with the same row of
    ``b`` (cosine similarity of the mean-centred rows; norms clamped at ``eps``)."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True),
                               dim=1, eps=eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST: ``T^2 * (beta * (1 - mean_b rho(y_s[b], y_t[b])) + gamma * (1 - mean_k rho(y_s[:, k], y_t[:, k])))``
    with ``y = softmax(z / T)`` and ``rho`` the Pearson correlation (:func:`pearson_rows`).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits / teacher_probs: exactly one, ``(B, K)``.
        beta: weight of the inter-class term (per example, across the K classes).
        gamma: weight of the intra-class term (per class, across the B examples; B >= 2).
        temperature: ``T > 0`` (the paper: 1 on ImageNet, 4 on CIFAR-100).

    Returns:
        Scalar in ``[0, 2 * T^2 * (beta + gamma)]``. Gradient scale: both terms are means, so
        independent of B and K in size; the ``T^2`` factor offsets the ``1/T`` of the softmax
        like KD's (the correlation is scale-free, so the gradient does not vanish at small T).
    """
    check_temperature(temperature)
    log_p_t = teacher_log_probs(teacher_logits, teacher_probs, temperature=temperature)
    _check_pair(student_logits, log_p_t, "dist")
    if student_logits.shape[0] < 2 and gamma > 0:
        raise ValueError("dist: the intra-class term needs a batch of at least 2 examples")
    y_s = F.softmax(student_logits.float() / temperature, dim=1)  # (B, K)
    y_t = log_p_t.exp()
    inter = 1.0 - pearson_rows(y_s, y_t).mean()
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@LOSSES.register("dist")
class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss` (a ``"logits"`` term).

    Args:
        beta: inter-class weight (>= 0).
        gamma: intra-class weight (>= 0).
        temperature: ``T > 0``.
    """

    inputs: ClassVar[str] = "logits"

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        for label, value in (("beta", beta), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"dist: {label} must be >= 0, got {value!r}")
        self.beta, self.gamma = float(beta), float(gamma)
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: Tensor, labels: Tensor | None = None,
                teacher_logits: Tensor | None = None, teacher_probs: Tensor | None = None) -> Tensor:
        """``(B, K)`` logits and teacher (labels unused) -> scalar."""
        return dist_loss(student_logits, teacher_logits, teacher_probs, beta=self.beta,
                         gamma=self.gamma, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
