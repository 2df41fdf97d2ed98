"""Logit-based knowledge distillation (Hinton, Vinyals & Dean 2015).

The teacher can be given either as logits ``z_t`` of shape ``(B, K)`` or as a
probability distribution ``q`` of shape ``(B, K)`` at temperature 1 (for example the
specialist ensemble's combined distribution, or a cache of top-k probabilities plus
residual mass expanded with :func:`topk_to_probs`).  Probabilities are treated as the
teacher's logits ``log q`` and softened as ``softmax(log q / T)``.

The teacher side is always detached: these losses never send gradients to the teacher.
Half-precision inputs are upcast to float32 before the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KDLoss",
    "kd_loss",
    "soft_target_loss",
    "teacher_log_probs",
    "topk_to_probs",
]

# Rows of ``teacher_probs`` may deviate this much from summing to one (fp16 caches);
# they are renormalised by the softmax.
PROB_SUM_TOLERANCE = 1e-2


def _to_float(x: object) -> float | None:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def check_positive(what: str, value: object, hint: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``hint`` is appended to the message)."""
    number = _to_float(value)
    if isinstance(value, bool) or number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}{'; ' + hint if hint else ''}")


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless ``temperature`` is a finite number > 0."""
    check_positive("temperature", temperature, "pass e.g. temperature=4.0 (T=1 means no softening)")


def check_alpha(alpha: float) -> None:
    """Raise ValueError unless ``alpha`` lies in [0, 1]."""
    value = _to_float(alpha)
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (the weight of the soft-target term; 1 - alpha "
            f"weights the hard-label cross-entropy), got {alpha!r}"
        )


def _as_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_logits(student_logits: Tensor) -> None:
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a float tensor of shape (B, K), got dtype "
            f"{student_logits.dtype} and shape {tuple(student_logits.shape)}; "
            "flatten sequence logits with logits.reshape(-1, K)"
        )


def _check_probs(teacher_probs: Tensor) -> None:
    sums = teacher_probs.sum(dim=-1)
    negative = bool((teacher_probs < 0).any())
    off = bool(((sums - 1.0).abs() > PROB_SUM_TOLERANCE).any())
    if negative or off:
        raise ValueError(
            "teacher_probs must be probabilities (non-negative, rows summing to 1), got "
            f"min={teacher_probs.min().item():.4g} and row sums in "
            f"[{sums.min().item():.4g}, {sums.max().item():.4g}]; if these are logits "
            "pass them as teacher_logits=..., otherwise apply softmax first"
        )


def teacher_log_probs(
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
) -> Tensor:
    """Softened teacher log-distribution ``log softmax(z_t / T)``, detached.

    Args:
        teacher_logits: ``(B, K)`` teacher logits, or None.
        teacher_probs: ``(B, K)`` teacher probabilities at T=1, or None.  Exactly one of
            the two must be given.  Zero entries are allowed (they stay zero).
        temperature: softening temperature ``T > 0``.

    Returns:
        ``(B, K)`` float log-probabilities (``-inf`` where ``teacher_probs`` is zero).
    """
    check_temperature(temperature)
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError(
            "give exactly one of teacher_logits=(B, K) logits or teacher_probs=(B, K) "
            "probabilities, got " + ("both" if teacher_logits is not None else "neither")
        )
    if teacher_logits is not None:
        logits = _as_float(teacher_logits.detach())
    else:
        assert teacher_probs is not None
        probs = _as_float(teacher_probs.detach())
        if probs.dim() != 2:
            raise ValueError(f"teacher_probs must have shape (B, K), got {tuple(probs.shape)}")
        _check_probs(probs)
        logits = probs.log()
    if logits.dim() != 2:
        raise ValueError(f"teacher_logits must have shape (B, K), got {tuple(logits.shape)}")
    return F.log_softmax(logits / temperature, dim=-1)


def soft_target_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
) -> Tensor:
    """``T^2 * KL(p_t^T || p_s^T)``, summed over classes and averaged over the batch.

    The ``T^2`` factor keeps the gradient magnitude w.r.t. the student logits roughly
    independent of ``T`` (the KL gradient itself scales like ``1/T^2`` for large T).

    Args:
        student_logits: ``(B, K)`` student logits.
        teacher_logits / teacher_probs: exactly one, ``(B, K)``; see
            :func:`teacher_log_probs`.
        temperature: ``T > 0``.

    Returns:
        Scalar loss.
    """
    _check_logits(student_logits)
    log_p_t = teacher_log_probs(teacher_logits, teacher_probs, temperature=temperature)
    if log_p_t.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher "
            f"{'logits' if teacher_logits is not None else 'probs'} {tuple(log_p_t.shape)} "
            "must have the same (B, K) shape; check the batch and the class order/count"
        )
    log_p_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = log_p_t.exp()
    # xlogy(0, 0) = 0, so zero teacher probabilities contribute nothing.
    kl = (torch.special.xlogy(p_t, p_t) - p_t * log_p_s).sum(dim=-1)
    return kl.mean() * temperature**2


def kd_loss(
    student_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton distillation loss.

    ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``,
    both terms averaged over the batch (KL summed over classes).

    Args:
        student_logits: ``(B, K)`` student logits.
        labels: ``(B,)`` integer class indices, or None when ``alpha == 1``.
        teacher_logits: ``(B, K)`` teacher logits, or None.
        teacher_probs: ``(B, K)`` teacher probabilities at T=1, or None.  Exactly one
            teacher input is required unless ``alpha == 0``.
        temperature: ``T > 0``.
        alpha: soft-target weight in ``[0, 1]``.  ``alpha == 0`` is plain CE,
            ``alpha == 1`` pure soft-target distillation (no labels needed).

    Returns:
        Scalar loss.
    """
    check_temperature(temperature)
    check_alpha(alpha)
    _check_logits(student_logits)
    loss = student_logits.new_zeros((), dtype=_as_float(student_logits).dtype)
    if alpha < 1.0:
        if labels is None:
            raise ValueError(
                f"labels are required when alpha < 1 (got alpha={alpha}); pass (B,) class "
                "indices or use alpha=1.0 for label-free distillation"
            )
        if labels.shape != student_logits.shape[:1] or labels.is_floating_point():
            raise ValueError(
                f"labels must be integer class indices of shape (B,)="
                f"{tuple(student_logits.shape[:1])}, got dtype {labels.dtype} and shape "
                f"{tuple(labels.shape)}; soft labels go in teacher_probs=..."
            )
        loss = loss + (1.0 - alpha) * F.cross_entropy(_as_float(student_logits), labels)
    if alpha > 0.0:
        soft = soft_target_loss(
            student_logits, teacher_logits, teacher_probs, temperature=temperature
        )
        loss = loss + alpha * soft
    return loss


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`.

    Args:
        temperature: ``T > 0``.
        alpha: soft-target weight in ``[0, 1]``.
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        check_temperature(temperature)
        check_alpha(alpha)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor | None,
        teacher_logits: Tensor | None = None,
        teacher_probs: Tensor | None = None,
    ) -> Tensor:
        """``(B, K)`` logits, ``(B,)`` labels, ``(B, K)`` teacher -> scalar loss."""
        return kd_loss(
            student_logits,
            labels,
            teacher_logits,
            teacher_probs,
            temperature=self.temperature,
            alpha=self.alpha,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def topk_to_probs(
    values: Tensor,
    indices: Tensor,
    num_classes: int,
    residual: Tensor | None = None,
) -> Tensor:
    """Expand cached top-k teacher probabilities into a full ``(B, K)`` distribution.

    The residual mass (``1 - values.sum(-1)`` unless given) is spread uniformly over
    the ``K - k`` classes outside the top-k, so every class keeps a non-zero
    probability and the KL stays finite.

    Args:
        values: ``(B, k)`` top-k probabilities (non-negative).
        indices: ``(B, k)`` integer class indices of ``values``.
        num_classes: ``K >= k``.
        residual: optional ``(B,)`` mass outside the top-k.

    Returns:
        ``(B, K)`` probabilities in ``values``' dtype (float32 for half inputs).
    """
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"values and indices must both have shape (B, k), got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if indices.is_floating_point():
        raise ValueError(f"indices must be integer class ids, got dtype {indices.dtype}")
    k = values.shape[1]
    if not isinstance(num_classes, int) or num_classes < k:
        raise ValueError(
            f"num_classes must be an int >= k={k} (the number of cached entries), "
            f"got {num_classes!r}"
        )
    values = _as_float(values)
    if residual is None:
        residual = (1.0 - values.sum(dim=-1)).clamp_min(0.0)
    elif residual.shape != values.shape[:1]:
        raise ValueError(
            f"residual must have shape (B,)={tuple(values.shape[:1])}, got {tuple(residual.shape)}"
        )
    rest = num_classes - k
    fill = residual.to(values.dtype) / rest if rest > 0 else values.new_zeros(values.shape[0])
    probs = fill.unsqueeze(1).expand(-1, num_classes).clone()
    return probs.scatter(1, indices.long(), values)
