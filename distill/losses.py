"""Logit-based knowledge distillation (Hinton, Vinyals & Dean 2015): the one implementation of

    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y),  batch mean,

in :func:`kd_loss_terms`; :func:`kd_loss`, :class:`KDLoss` (the registered ``"kd"`` loss) and
:class:`distill.train.DistillObjective` (the pipeline's objective) all call it.

The teacher is given either as logits ``z_t (B, K)`` or as a probability distribution
``q (B, K)`` at temperature 1 (the specialist ensemble's combined distribution, or cached top-k
targets completed with :func:`distill.targets.complete_topk`). Probabilities are the teacher's
logits ``log q``, softened by :func:`distill.targets.log_soft_targets` (``softmax(log q / T)``;
exact zeros stay zero).

The teacher side is always detached: these losses never send gradients to the teacher.
Half-precision inputs are upcast to float32 before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import LOSSES
from distill.targets import check_temperature, log_soft_targets

__all__ = [
    "KDLoss",
    "check_alpha",
    "kd_loss",
    "kd_loss_terms",
    "soft_target_loss",
    "teacher_log_probs",
]

# Rows of ``teacher_probs`` may deviate this much from summing to one (fp16 caches);
# they are renormalised by the softmax.
PROB_SUM_TOLERANCE = 1e-2


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float; ValueError unless it lies in [0, 1]."""
    try:
        value = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(alpha, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (the weight of the soft-target term; 1 - alpha "
            f"weights the hard-label cross-entropy), got {alpha!r}"
        )
    return value


def _as_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_logits(student_logits: Tensor) -> None:
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a float tensor of shape (B, K), got dtype "
            f"{student_logits.dtype} and shape {tuple(student_logits.shape)}; "
            "flatten sequence logits with logits.reshape(-1, K)"
        )


def _check_labels(labels: Tensor, student_logits: Tensor) -> None:
    if labels.shape != student_logits.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer class indices of shape (B,)="
            f"{tuple(student_logits.shape[:1])}, got dtype {labels.dtype} and shape "
            f"{tuple(labels.shape)}; soft labels go in teacher_probs=..."
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
    """Softened teacher log-distribution, detached: ``log softmax(z_t / T)`` for logits,
    :func:`distill.targets.log_soft_targets` (``log softmax(log q / T)``) for probabilities.

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
    if teacher_probs is not None:
        probs = _as_float(teacher_probs.detach())
        if probs.dim() != 2:
            raise ValueError(f"teacher_probs must have shape (B, K), got {tuple(probs.shape)}")
        _check_probs(probs)
        return log_soft_targets(probs, temperature)
    assert teacher_logits is not None
    logits = _as_float(teacher_logits.detach())
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
    """The soft term ``T^2 * KL(p_t^T || p_s^T)``, summed over classes and averaged over the batch.

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
    log_p_t = teacher_log_probs(teacher_logits, teacher_probs, temperature=temperature)  # (B, K)
    if log_p_t.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher "
            f"{'logits' if teacher_logits is not None else 'probs'} {tuple(log_p_t.shape)} "
            "must have the same (B, K) shape; check the batch and the class order/count"
        )
    log_p_s = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)  # (B, K)
    p_t = log_p_t.exp()
    # xlogy(0, 0) = 0, so zero teacher probabilities contribute nothing.
    kl = (torch.special.xlogy(p_t, p_t) - p_t * log_p_s).sum(dim=-1)  # (B,)
    return kl.mean() * temperature**2


def kd_loss_terms(
    student_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinton distillation loss and its two terms.

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
        ``(total, terms)``: the scalar loss and its unweighted terms, detached, for logging:
        ``"ce"`` whenever labels are given (also at ``alpha == 1``, where it does not count)
        and ``"soft"`` (``T^2 * KL``) when ``alpha > 0``.
    """
    check_temperature(temperature)
    alpha = check_alpha(alpha)
    _check_logits(student_logits)
    logits = _as_float(student_logits)
    total = logits.new_zeros(())
    terms: dict[str, Tensor] = {}
    if labels is None and alpha < 1.0:
        raise ValueError(
            f"labels are required when alpha < 1 (got alpha={alpha}); pass (B,) class "
            "indices or use alpha=1.0 for label-free distillation"
        )
    if labels is not None:
        _check_labels(labels, logits)
        ce = F.cross_entropy(logits, labels)
        terms["ce"] = ce.detach()
        if alpha < 1.0:
            total = total + (1.0 - alpha) * ce
    if alpha > 0.0:
        soft = soft_target_loss(logits, teacher_logits, teacher_probs, temperature=temperature)
        terms["soft"] = soft.detach()
        total = total + alpha * soft
    return total, terms


def kd_loss(
    student_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """The scalar loss of :func:`kd_loss_terms` (same arguments)."""
    return kd_loss_terms(student_logits, labels, teacher_logits, teacher_probs,
                         temperature=temperature, alpha=alpha)[0]


@LOSSES.register("kd")
class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`.

    Args:
        temperature: ``T > 0``.
        alpha: soft-target weight in ``[0, 1]``.
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)

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
