"""Relation-based losses: they compare how the two models relate the examples of a batch to each
other, so student and teacher embeddings may have different widths.

* PKT, probabilistic knowledge transfer (Passalis & Tefas 2018): each model's cosine
  similarities, mapped to [0, 1] and normalised per row into conditional probabilities
  ``p(j | i)``; the loss is the KL divergence of the student's from the teacher's.
* CC, correlation congruence (Peng et al. 2019): the ``(B, B)`` correlation matrix of the
  L2-normalised embeddings, with the Gaussian RBF kernel ``exp(-2 gamma) sum_p (2 gamma)^p / p!
  (e_i . e_j)^p`` (its Taylor expansion for unit vectors, to order ``P``) or the bilinear
  form ``e_i . e_j``; the loss is ``||C_s - C_t||_F^2 / B^2``.
* IRG, instance relationship graph (Liu et al. 2019): vertices are the instances' features and
  edges their squared pairwise distances (divided by the largest); the loss is
  ``vertex_weight * MSE(f_s, f_t) + edge_weight * MSE(E_s, E_t)``. The paper's third term, the
  transformation of the graph between layers, is not included.

Inputs are ``(B, ...)`` activations flattened to ``(B, D)``; the teacher side is detached.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import LOSSES

__all__ = [
    "CCLoss",
    "IRGLoss",
    "PKTLoss",
    "cc_loss",
    "correlation_matrix",
    "irg_edges",
    "irg_loss",
    "pkt_loss",
]

_PKT_EPS = 1e-7
CC_KERNELS = ("gaussian", "bilinear")


def _flat_pair(student: Tensor, teacher: Tensor, what: str, min_batch: int = 2) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: features need the same batch size and a feature dim, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{what} relates the examples of a batch: needs at least {min_batch}, "
                         f"got {student.shape[0]}")
    return student.flatten(1), teacher.detach().flatten(1)


# ---------------------------------------------------------------------------------- PKT


def _pkt_probabilities(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)``: ``(cos(x_i, x_j) + 1) / 2``, each row divided by its sum."""
    unit = x / (x.norm(dim=1, keepdim=True) + _PKT_EPS)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """``mean_{i,j} p_t(j|i) log((p_t(j|i) + eps) / (p_s(j|i) + eps))`` with ``eps = 1e-7``,
    the mean over all ``B^2`` pairs (the authors' code).

    Args:
        student_features: ``(B, ...)`` -> ``(B, D_s)``.
        teacher_features: ``(B, ...)`` -> ``(B, D_t)``.

    Returns:
        Scalar >= 0 (up to eps). Gradient scale: the probabilities are ~``1/B`` each and the
        mean divides by ``B^2``, so the loss shrinks like ``1/B^2`` for a fixed geometry (hence
        the large weights in use: 30,000 in RepDistiller's CIFAR-100 scripts).
    """
    s, t = _flat_pair(student_features, teacher_features, "pkt")
    p_s, p_t = _pkt_probabilities(s), _pkt_probabilities(t)
    return (p_t * torch.log((p_t + _PKT_EPS) / (p_s + _PKT_EPS))).mean()


@LOSSES.register("pkt")
class PKTLoss(nn.Module):
    """Module form of :func:`pkt_loss`; defaults to the pooled embeddings (no parameters)."""

    default_layers: ClassVar[tuple[str, str]] = ("pool", "pool")

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, ...)``, ``(B, ...)`` -> scalar."""
        return pkt_loss(student_features, teacher_features)


# ----------------------------------------------------------------------------------- CC


def correlation_matrix(embeddings: Tensor, kernel: str = "gaussian", gamma: float = 0.4,
                       order: int = 2) -> Tensor:
    """``(B, D)`` unit-norm rows -> ``(B, B)`` correlations: ``E E^T`` (bilinear) or
    ``exp(-2 gamma) * sum_{p=0..order} (2 gamma)^p / p! * (E E^T)^p`` (gaussian)."""
    if kernel not in CC_KERNELS:
        raise ValueError(f"cc: kernel must be one of {CC_KERNELS}, got {kernel!r}")
    products = embeddings @ embeddings.t()  # (B, B)
    if kernel == "bilinear":
        return products
    series = sum((2 * gamma) ** p / math.factorial(p) * products.pow(p) for p in range(order + 1))
    return math.exp(-2 * gamma) * series


def cc_loss(student_features: Tensor, teacher_features: Tensor, *, kernel: str = "gaussian",
            gamma: float = 0.4, order: int = 2) -> Tensor:
    """``||C_s - C_t||_F^2 / B^2`` between :func:`correlation_matrix` of the L2-normalised
    embeddings (paper defaults: gaussian kernel, gamma 0.4, order 2).

    Args:
        student_features: ``(B, ...)`` -> ``(B, D_s)``.
        teacher_features: ``(B, ...)`` -> ``(B, D_t)``.

    Returns:
        Scalar. Gradient scale: a mean over the ``B^2`` entries of matrices bounded by 1
        (gaussian: by ``exp(-2 gamma) * sum (2 gamma)^p / p!``), independent of B and D.
    """
    s, t = _flat_pair(student_features, teacher_features, "cc")
    c_s = correlation_matrix(F.normalize(s, dim=1), kernel, gamma, order)
    c_t = correlation_matrix(F.normalize(t, dim=1), kernel, gamma, order)
    return (c_s - c_t).pow(2).sum() / s.shape[0] ** 2


@LOSSES.register("cc")
class CCLoss(nn.Module):
    """Module form of :func:`cc_loss`; defaults to the pooled embeddings.

    Args:
        kernel: ``"gaussian"`` (RBF, Taylor-expanded) or ``"bilinear"``.
        gamma: the RBF's ``gamma > 0``.
        order: Taylor order ``P >= 1``.
    """

    default_layers: ClassVar[tuple[str, str]] = ("pool", "pool")

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if kernel not in CC_KERNELS or not gamma > 0 or order < 1:
            raise ValueError(f"cc: kernel must be one of {CC_KERNELS}, gamma > 0 and order >= 1, got "
                             f"kernel={kernel!r}, gamma={gamma!r}, order={order!r}")
        self.kernel, self.gamma, self.order = kernel, float(gamma), int(order)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, ...)``, ``(B, ...)`` -> scalar."""
        return cc_loss(student_features, teacher_features, kernel=self.kernel, gamma=self.gamma,
                       order=self.order)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, gamma={self.gamma}, order={self.order}"


# ---------------------------------------------------------------------------------- IRG


def irg_edges(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)``: squared Euclidean distances (zero diagonal) divided by their maximum."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(1e-12)
    d2 = d2.masked_fill(torch.eye(x.shape[0], dtype=torch.bool, device=x.device), 0.0)
    return d2 / (d2.max() + 1e-12)


def irg_loss(student_features: Tensor, teacher_features: Tensor, *, vertex_weight: float = 1.0,
             edge_weight: float = 1.0) -> Tensor:
    """``vertex_weight * mean((f_s - f_t)^2) + edge_weight * mean((E_s - E_t)^2)`` (:func:`irg_edges`).

    Args:
        student_features: ``(B, ...)``; for the vertex term the same shape as the teacher's
            (the default layers are both models' ``head``: their logits).
        teacher_features: ``(B, ...)``.
        vertex_weight / edge_weight: >= 0; the vertex term is skipped at 0.

    Returns:
        Scalar. Gradient scale: the vertex term is an MSE over ``B * D`` entries (it scales with
        the square of the features' size); the edge term a mean over ``B^2`` entries in [0, 1].
    """
    s, t = _flat_pair(student_features, teacher_features, "irg")
    loss = edge_weight * F.mse_loss(irg_edges(s), irg_edges(t))
    if vertex_weight > 0:
        if student_features.shape != teacher_features.shape:
            raise ValueError(
                f"irg: the vertex term compares features of equal shape, got student "
                f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}; hook "
                "layers of one shape (e.g. both heads, the default) or set vertex_weight=0")
        loss = loss + vertex_weight * F.mse_loss(student_features, teacher_features.detach())
    return loss


@LOSSES.register("irg")
class IRGLoss(nn.Module):
    """Module form of :func:`irg_loss`; defaults to both models' logits (``head``).

    Args:
        vertex_weight: weight of the vertex (instance feature) term, >= 0.
        edge_weight: weight of the edge (pairwise distance) term, >= 0.
    """

    default_layers: ClassVar[tuple[str, str]] = ("head", "head")

    def __init__(self, vertex_weight: float = 1.0, edge_weight: float = 1.0) -> None:
        super().__init__()
        for label, value in (("vertex_weight", vertex_weight), ("edge_weight", edge_weight)):
            if not value >= 0:
                raise ValueError(f"irg: {label} must be >= 0, got {value!r}")
        self.vertex_weight, self.edge_weight = float(vertex_weight), float(edge_weight)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, ...)``, ``(B, ...)`` -> scalar."""
        return irg_loss(student_features, teacher_features, vertex_weight=self.vertex_weight,
                        edge_weight=self.edge_weight)

    def extra_repr(self) -> str:
        return f"vertex_weight={self.vertex_weight}, edge_weight={self.edge_weight}"
