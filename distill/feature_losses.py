"""Feature-based and relational distillation losses.

* hint (FitNets, Romero et al. 2015): a learned 1x1-conv / linear regressor maps the
  student's features to the teacher's shape, then MSE.
* attention transfer (Zagoruyko & Komodakis 2017): distance between L2-normalised
  spatial attention maps.
* RKD (Park et al. 2019): distance-wise and angle-wise relational losses.
* similarity-preserving (Tung & Mori 2019): distance between row-normalised batch
  Gram matrices.

Arguments are ``(student_features, teacher_features)``; the teacher side is always
detached.  ``B`` is the batch size; ``(B, C, H, W)`` are conv feature maps and
``(B, D)`` flat features.  Anything with more than two dims is flattened to
``(B, D)`` by the relational losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import LOSSES

__all__ = [
    "AttentionTransferLoss",
    "HintLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "attention_loss",
    "attention_map",
    "hint_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
]

_EPS = 1e-12
SPATIAL_MODES = ("strict", "pool", "interpolate")


def _check_batch(student: Tensor, teacher: Tensor, what: str, min_batch: int = 1) -> None:
    if student.dim() < 2 or teacher.dim() < 2:
        raise ValueError(
            f"{what}: features need a batch dim plus at least one feature dim, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "have different batch sizes; feed both models the same batch"
        )
    if student.shape[0] < min_batch:
        raise ValueError(
            f"{what} needs a batch of at least {min_batch} samples, got "
            f"{student.shape[0]}; use a larger batch"
        )


# --------------------------------------------------------------------------- hint


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """MSE between already-regressed student features and teacher features.

    Args:
        student_features: any shape ``S`` (the regressor's output).
        teacher_features: the same shape ``S``.

    Returns:
        Scalar mean squared error over all elements.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint: regressed student features {tuple(student_features.shape)} and "
            f"teacher features {tuple(teacher_features.shape)} must have the same shape"
        )
    return F.mse_loss(student_features, teacher_features.detach())


@LOSSES.register("hint")
class HintLoss(nn.Module):
    """FitNets hint loss with a learned 1x1-conv (or linear) regressor.

    The regressor is a parameter of this module: add ``hint.parameters()`` to the
    student's optimizer.  For ``(B, C, H, W)`` features it acts as a 1x1 conv, for
    ``(B, D)`` features as a linear layer (same weights).  MSE is averaged over all
    elements (FitNets writes ``1/2 * ||.||^2``; scale the weight if you need that).

    Args:
        student_channels: ``C_s`` (or ``D_s``) of the student features.
        teacher_channels: ``C_t`` (or ``D_t``) of the teacher features.
        spatial: what to do when ``(H, W)`` differ: ``"strict"`` raises ValueError,
            ``"pool"`` adaptive-average-pools the larger map to the smaller size,
            ``"interpolate"`` bilinearly resizes the regressed student map to the
            teacher's size.
        student_name / teacher_name: module paths of the hooked layers, used only in
            error messages.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        spatial: str = "strict",
        student_name: str = "student",
        teacher_name: str = "teacher",
    ) -> None:
        super().__init__()
        for label, value in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"hint: {label} must be a positive int, got {value!r}")
        if spatial not in SPATIAL_MODES:
            raise ValueError(f"hint: spatial must be one of {SPATIAL_MODES}, got {spatial!r}")
        self.spatial = spatial
        self.student_name = student_name
        self.teacher_name = teacher_name
        self.regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    @classmethod
    def sized(cls, layers: Sequence[tuple[str, str]], student: Sequence[torch.Size],
              teacher: Sequence[torch.Size], num_examples: int | None) -> dict[str, int | str]:
        """Constructor arguments from the probed shapes of the layer pair (channels: dim 1)."""
        return {"student_channels": int(student[0][1]), "teacher_channels": int(teacher[0][1]),
                "student_name": f"student {layers[0][0]}", "teacher_name": f"teacher {layers[0][1]}"}

    def _mismatch(self, student: Tensor, teacher: Tensor, why: str, fix: str) -> ValueError:
        return ValueError(
            f"hint: cannot match student features {tuple(student.shape)} from "
            f"'{self.student_name}' to teacher features {tuple(teacher.shape)} from "
            f"'{self.teacher_name}': {why}; {fix}"
        )

    def regress(self, student_features: Tensor) -> Tensor:
        """``(B, C_s, H, W) -> (B, C_t, H, W)`` or ``(B, D_s) -> (B, D_t)``."""
        if student_features.dim() == 2:
            weight = self.regressor.weight.flatten(1)
            return F.linear(student_features, weight, self.regressor.bias)
        return self.regressor(student_features)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Student ``(B, C_s, H_s, W_s)`` or ``(B, D_s)``, teacher ``(B, C_t, H_t, W_t)``
        or ``(B, D_t)`` -> scalar MSE."""
        s, t = student_features, teacher_features
        c_s, c_t = self.regressor.in_channels, self.regressor.out_channels
        if s.dim() not in (2, 4) or s.dim() != t.dim():
            raise self._mismatch(
                s,
                t,
                "features must both be (B, C, H, W) or both (B, D)",
                "hook layers of the same kind or flatten both",
            )
        if s.shape[0] != t.shape[0]:
            raise self._mismatch(s, t, "batch sizes differ", "feed both models the same batch")
        if s.shape[1] != c_s or t.shape[1] != c_t:
            raise self._mismatch(
                s,
                t,
                f"the regressor was built for {c_s} -> {c_t} channels",
                f"build HintLoss(student_channels={s.shape[1]}, teacher_channels={t.shape[1]})",
            )
        out = self.regress(s)
        t = t.detach()
        if s.dim() == 4 and out.shape[2:] != t.shape[2:]:
            if self.spatial == "strict":
                raise self._mismatch(
                    s,
                    t,
                    f"spatial sizes {tuple(s.shape[2:])} and {tuple(t.shape[2:])} "
                    "differ and no spatial adapter is configured",
                    "pass spatial='pool' or spatial='interpolate', or hook layers with "
                    "equal spatial size",
                )
            if self.spatial == "interpolate":
                out = F.interpolate(out, size=t.shape[2:], mode="bilinear", align_corners=False)
            else:
                size = (min(out.shape[2], t.shape[2]), min(out.shape[3], t.shape[3]))
                out, t = F.adaptive_avg_pool2d(out, size), F.adaptive_avg_pool2d(t, size)
        return hint_loss(out, t)

    def extra_repr(self) -> str:
        return f"'{self.student_name}' -> '{self.teacher_name}', spatial={self.spatial!r}"


# ------------------------------------------------------------- attention transfer


def attention_map(features: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis.

    Args:
        features: ``(B, C, H, W)`` activations.
        p: exponent (the paper uses 2).
        size: ``(H', W')`` to adaptive-average-pool the map to before normalising (None: keep
            ``(H, W)``).

    Returns:
        ``(B, H' * W')``: mean over channels of ``|A|^p``, flattened, L2-normalised per sample.
    """
    if features.dim() != 4:
        raise ValueError(f"attention: features must be (B, C, H, W), got {tuple(features.shape)}")
    energy = features.abs().pow(p).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if size is not None and tuple(energy.shape[2:]) != tuple(size):
        energy = F.adaptive_avg_pool2d(energy, size)
    return F.normalize(energy.flatten(1), dim=1, eps=_EPS)


def attention_loss(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss ``mean_b ||Q_s - Q_t||_2`` between the two sides' :func:`attention_map`.

    Channel counts may differ.  When ``(H, W)`` differ, the larger (unnormalised)
    attention map is adaptive-average-pooled to the smaller size before
    normalisation.  Note that the authors' code uses the squared difference averaged
    over ``H * W`` (with weight ``beta = 1e3``) instead of the paper's norm used here.

    Args:
        student_features: ``(B, C_s, H_s, W_s)``.
        teacher_features: ``(B, C_t, H_t, W_t)``.
        p: exponent of the attention map.

    Returns:
        Scalar loss (0 iff the normalised maps agree).
    """
    _check_batch(student_features, teacher_features, "attention")
    if student_features.dim() != 4 or teacher_features.dim() != 4:
        raise ValueError(
            f"attention: features must be (B, C, H, W), got student "
            f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}"
        )
    size = (min(student_features.shape[2], teacher_features.shape[2]),
            min(student_features.shape[3], teacher_features.shape[3]))
    q_s = attention_map(student_features, p, size)  # (B, H * W)
    q_t = attention_map(teacher_features.detach(), p, size)
    return torch.linalg.vector_norm(q_s - q_t, dim=1).mean()


@LOSSES.register("attention")
class AttentionTransferLoss(nn.Module):
    """Module form of :func:`attention_loss` for one pair of layers.

    Args:
        p: exponent of the attention map (paper: 2).
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"attention: p must be > 0, got {p!r}; the paper uses p=2")
        self.p = float(p)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, C_s, H_s, W_s)``, ``(B, C_t, H_t, W_t)`` -> scalar."""
        return attention_loss(student_features, teacher_features, p=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -------------------------------------------------------------------------- RKD


def _pairwise_distances(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)`` Euclidean distances with a zero diagonal."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(_EPS)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _normalised_distances(x: Tensor) -> Tensor:
    d = _pairwise_distances(x)
    n = x.shape[0]
    mean = d.sum() / (n * (n - 1))
    return d / mean.clamp_min(_EPS)


def rkd_distance_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD distance-wise loss.

    Pairwise Euclidean distances are divided by their mean over the ``B(B-1)``
    off-diagonal pairs; the loss is smooth-L1 (Huber, beta=1) between student and
    teacher, averaged over all ``B^2`` entries (the zero diagonal included), as in the
    authors' code.

    Args:
        student_features: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_features: ``(B, ...)``, flattened to ``(B, D_t)``; ``B >= 2``.

    Returns:
        Scalar loss.
    """
    _check_batch(student_features, teacher_features, "rkd distance loss", min_batch=2)
    t = _normalised_distances(teacher_features.detach().flatten(1))
    s = _normalised_distances(student_features.flatten(1))
    return F.smooth_l1_loss(s, t)


def _angles(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B, B)``: ``[i, j, k] = cos`` of the angle at ``x_i`` between
    ``x_j`` and ``x_k`` (0 where ``j == i`` or ``k == i``).  Memory ``O(B^2 D + B^3)``."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2, eps=_EPS)  # [i, j] = x_j - x_i
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """RKD angle-wise loss: smooth-L1 between the cosines of all triplet angles,
    averaged over the ``B^3`` entries of :func:`_angles` (authors' convention).

    Args:
        student_features: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_features: ``(B, ...)``, flattened to ``(B, D_t)``; ``B >= 3``.

    Returns:
        Scalar loss.
    """
    _check_batch(student_features, teacher_features, "rkd angle loss", min_batch=3)
    t = _angles(teacher_features.detach().flatten(1))
    s = _angles(student_features.flatten(1))
    return F.smooth_l1_loss(s, t)


@LOSSES.register("rkd")
class RKDLoss(nn.Module):
    """Relational KD: ``distance_weight * L_dist + angle_weight * L_angle``.

    Defaults are the paper's (``lambda_D = 25``, ``lambda_A = 50``); the authors'
    distillation script uses ``1`` and ``2`` (``--dist_ratio 1 --angle_ratio 2``).
    A weight of 0 skips that term (the angle term costs ``O(B^3)``).

    Args:
        distance_weight: weight of :func:`rkd_distance_loss` (>= 0).
        angle_weight: weight of :func:`rkd_angle_loss` (>= 0).
    """

    default_layers: ClassVar[tuple[str, str]] = ("pool", "pool")

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        for label, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if not value >= 0:
                raise ValueError(f"rkd: {label} must be >= 0, got {value!r}")
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, ...)``, ``(B, ...)`` -> scalar weighted loss."""
        loss = student_features.new_zeros(())
        if self.distance_weight > 0:
            loss = loss + self.distance_weight * rkd_distance_loss(
                student_features, teacher_features
            )
        if self.angle_weight > 0:
            loss = loss + self.angle_weight * rkd_angle_loss(student_features, teacher_features)
        return loss

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


# ------------------------------------------------------------ similarity-preserving


def _similarity(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B)``: row-L2-normalised Gram matrix ``normalize(F F^T)``."""
    return F.normalize(x @ x.t(), dim=1, eps=_EPS)


def similarity_preserving_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Similarity-preserving loss ``||G_s - G_t||_F^2 / B^2`` for one layer pair.

    Args:
        student_features: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_features: ``(B, ...)``, flattened to ``(B, D_t)``.

    Returns:
        Scalar loss.  (The paper sums this over layer pairs with weight
        ``gamma = 3000``.)
    """
    _check_batch(student_features, teacher_features, "similarity-preserving loss")
    g_s = _similarity(student_features.flatten(1))
    g_t = _similarity(teacher_features.detach().flatten(1))
    b = student_features.shape[0]
    return (g_s - g_t).pow(2).sum() / (b * b)


@LOSSES.register("similarity")
class SimilarityPreservingLoss(nn.Module):
    """Module form of :func:`similarity_preserving_loss` (no parameters)."""

    default_layers: ClassVar[tuple[str, str]] = ("pool", "pool")

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, ...)``, ``(B, ...)`` -> scalar."""
        return similarity_preserving_loss(student_features, teacher_features)
